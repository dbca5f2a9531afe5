# The two commands of a fresh machine: `make demo` (set up, train and evaluate on the bundled digits) and
# `make test` (set up, run the test suite). Both create the virtual environment .venv when it is missing.
# `make docs` builds the documentation site into site/ (offline, strict: any warning fails it).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-all docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -e ".[dev]"
	touch $@

# Training writes checkpoints/digits/version_<n>/ and links checkpoints/digits/last.ckpt to that run's last
# checkpoint, so the evaluation below always gets the model just trained (tests/test_train.py checks it).
demo: setup
	$(BIN)/python train.py fit --config configs/digits.yaml
	$(BIN)/python evaluate.py --config configs/eval_digits.yaml --ckpt_path checkpoints/digits/last.ckpt

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: PYTEST_ARGS :=
test-all: test

$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --progress-bar off -e ".[docs]"
	touch $@

# The site's generator and its strict build: a broken link, a page missing from the navigation or an
# unresolved API reference fails it (mkdocs.yml). NO_MKDOCS_2_WARNING silences the theme's notice about MkDocs 2.
docs: setup $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# Keeps checkpoints/cifar10_study/, the published models of the CIFAR-10 study.
clean:
	rm -rf $(VENV) logs .pytest_cache site
	find checkpoints -mindepth 1 -maxdepth 1 -type d ! -name cifar10_study -exec rm -rf {} +
