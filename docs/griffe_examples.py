"""A griffe extension for the API reference: the docstrings' `Example:` sections are doctest examples.

Google style names the section `Examples:`; griffe reads the singular `Example:` as an admonition and renders its
`>>>` lines as Markdown text (where `x[0][0]` becomes a broken link). The package writes `Example:`, so the
reference reads it as `Examples:` (pycon code blocks). Loaded by mkdocs.yml; the package itself is unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SECTION = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = SECTION.sub(r"\1Examples:", obj.docstring.value)
