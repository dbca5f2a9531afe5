"""Weight files: reading one safely, saying what it holds, and fitting its state dict into a module.

Every loader of the package reads through `read_weights_file` (`create_model(weights=...)`, `load_weights`,
`build_classifier` and so `load_classifier`, the evaluator and the figure and benchmark scripts), so no file
can run code when it is read: `torch.save` files are read with `torch.load(weights_only=True)`, which builds
tensors and plain Python values only, and `.safetensors` files hold tensors only. A file that needs more is
refused with an error that names what it holds and how to re-save it. `read_weights` keeps what a file holds
(`WeightsFile`: a `train.py` checkpoint's settings, the network's state dict), so that a loader reads it once;
`fit_state_dict` loads a state dict strictly, with an error that names the file and each mismatch.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

# What to do with a file that weights_only refuses. Loading it without weights_only runs whatever it holds,
# so that is only for a file whose origin one trusts, and only once, to re-save the tensors.
RESAVE_HINT = (
    "If you trust the file and where it came from, re-save its tensors once, e.g. "
    "`torch.save(model.state_dict(), 'weights.pt')` or "
    "`safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')` for the model it was made with "
    "(or `torch.load(path, weights_only=False)['state_dict']` for a Lightning checkpoint), and give that file; "
    "or allow the types it holds with torch.serialization.add_safe_globals([...])."
)

EXPECTED_FORMATS = (
    "a state dict saved with torch.save (.pt/.pth), a train.py checkpoint (.ckpt) or a .safetensors file"
)

# A torch.save file is a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle stream that starts
# with the PROTO opcode. A safetensors file starts with the 8-byte little-endian length of its JSON header.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


def read_weights_file(path: str | Path) -> Any:
    """The contents of a `torch.save` or `.safetensors` file, read so that the file cannot run code.

    The format is recognised from the file's first bytes (not its name): a `torch.save` file (zip archive or
    legacy pickle) is read with `torch.load(map_location="cpu", weights_only=True)`, a safetensors file with
    `safetensors.torch.load_file`. Everything comes back on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty, foreign or corrupt file, or one that holds Python objects besides tensors and
            plain values (which `weights_only` refuses, since building them could run code); the message names
            the file, what it holds and what was expected.

    Example:
        >>> state = read_weights_file("weights.safetensors")   # or a .pt state dict, or a train.py checkpoint
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} does not exist.")
    with path.open("rb") as file:
        head = file.read(16)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"Could not read {str(path)!r}: the file is empty (0 bytes); expected {EXPECTED_FORMATS}.")
    if _is_safetensors(head, size):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as error:  # safetensors reports a corrupt header or body as several error types
            raise ValueError(
                f"Could not read {str(path)!r}: it has a safetensors header but its contents are corrupt or "
                f"truncated ({error}); save the file again."
            ) from error
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        raise ValueError(
            f"Could not read {str(path)!r}: it is neither a torch.save file (a zip archive, starting with 'PK', "
            f"or a pickle) nor a safetensors file; its first bytes are {head[:8]!r} ({size} bytes in all). "
            f"Expected {EXPECTED_FORMATS}."
        )
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise ValueError(
            f"Could not read {str(path)!r}: it starts like a torch.save archive but is truncated or corrupt "
            f"({size} bytes); save it again."
        )
    try:
        # weights_only: tensors and plain Python values only, so that reading the file cannot run code from it.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(refusal_message(path, str(error))) from error
    except Exception as error:  # truncated archives and foreign pickles fail as RuntimeError, EOFError, ...
        raise ValueError(
            f"Could not read {str(path)!r} as a torch.save file: {type(error).__name__}: {error or 'no details'}. "
            f"Expected {EXPECTED_FORMATS}."
        ) from error


def _is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file starts like safetensors: a header length that fits in the file, then a JSON object.

    A torch.save file cannot pass: its first 8 bytes ('PK...' or a pickle's PROTO opcode) read as a length
    far beyond any file's size.
    """
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return 2 <= header_length <= size - 8 and head[8:9] == b"{"


def refusal_message(path: Path, detail: str) -> str:
    """Why `torch.load(weights_only=True)` refused `path`, in words: what the file holds and what to do."""
    found = re.search(r"GLOBAL ([\w.]+)", detail)
    if found:
        what = (
            f"it holds a Python object ({found.group(1)}) besides tensors and plain values, and building it "
            "could run code from the file"
        )
    else:
        operand = re.search(r"Unsupported operand (\d+)", detail)
        what = (
            "it is a pickle that torch.load(weights_only=True) cannot read"
            + (f" (pickle opcode {operand.group(1)})" if operand else "")
            + "; it was not written by torch.save, or holds more than tensors and plain values"
        )
    return (
        f"Refused to read {str(path)!r}: {what}. mglightning reads weight files with "
        f"torch.load(weights_only=True) (or safetensors) so that a file cannot run code. Expected "
        f"{EXPECTED_FORMATS}. {RESAVE_HINT}"
    )


# The hyperparameters of a train.py checkpoint that rebuild its network (`classifier_network`'s arguments).
CHECKPOINT_SETTINGS = ("arch", "num_classes", "image_size", "mean", "std")


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file holds, read once by `read_weights`.

    Args:
        path: the file (as given, for messages).
        state_dict: the network's tensors by name: a plain state dict's or a safetensors file's, a `train.py`
            checkpoint's network entries (`net.*`, without the prefix), another Lightning checkpoint's `state_dict`.
        hyper_parameters: the settings of a `train.py` checkpoint, which rebuild its network; None for any other
            file.
    """

    path: str | Path
    state_dict: dict[str, Tensor]
    hyper_parameters: Mapping[str, Any] | None = None


def read_weights(path: str | Path, *, checkpoint: bool = False) -> WeightsFile:
    """Read a weights file once, so that it cannot run code (`read_weights_file`), and decide what it holds.

    Args:
        path: a plain state dict (`torch.save(model.state_dict(), path)`), a `.safetensors` file or a checkpoint.
        checkpoint: the file must be a checkpoint written by `train.py`, with the settings that rebuild its network.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that `read_weights_file` refuses, one that holds no state dict (a mapping of names to
            tensors), or, with `checkpoint`, one that is not a `train.py` checkpoint of this version.
    """
    content = read_weights_file(path)
    hyper_parameters = _train_settings(content)
    if checkpoint:
        _check_train_checkpoint(content, hyper_parameters, path)
    return WeightsFile(path, _network_state_dict(content, hyper_parameters is not None, path), hyper_parameters)


def _check_train_checkpoint(content: Any, hyper_parameters: Mapping[str, Any] | None, path: str | Path) -> None:
    """Refuse what is not a `train.py` checkpoint with the settings that rebuild its network."""
    if hyper_parameters is None:
        found = sorted(content)[:5] if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"{str(path)!r} is not a mglightning classifier checkpoint: a train.py checkpoint holds `state_dict` "
            f"and `hyper_parameters` with the architecture (`arch`), this file holds {found}. Pass a checkpoint "
            "written by `python train.py fit`, or give a plain state dict as the classifier's `weights` together "
            "with its `arch` (or `module`)."
        )
    absent = [name for name in CHECKPOINT_SETTINGS if name not in hyper_parameters]
    if absent:
        raise ValueError(
            f"The train.py checkpoint {str(path)!r} lacks the hyperparameters {absent} that rebuild its network; "
            "it was not written by this version of train.py."
        )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a weights file: a plain state dict, a safetensors file or a `train.py` checkpoint."""
    return read_weights(path).state_dict


def _train_settings(content: Any) -> Mapping[str, Any] | None:
    """The hyperparameters of a checkpoint written by `train.py` (what `read_weights_file` returned); else None."""
    if (
        isinstance(content, dict)
        and isinstance(content.get("state_dict"), Mapping)
        and isinstance(content.get("hyper_parameters"), Mapping)
        and "arch" in content["hyper_parameters"]
    ):
        return content["hyper_parameters"]
    return None


def _network_state_dict(content: Any, train_checkpoint: bool, path: str | Path) -> dict[str, Tensor]:
    """The network's state dict in what `read_weights_file(path)` returned, checked to map names to tensors."""
    if train_checkpoint:
        network = content["state_dict"].items()
        content = {key[len("net."):]: value for key, value in network if key.startswith("net.")}
    elif isinstance(content, dict) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        raise ValueError(
            f"{str(path)!r} is not a state dict (a mapping of names to tensors): it holds a "
            f"{type(content).__name__}. Save one with `torch.save(model.state_dict(), path)`."
        )
    others = [
        f"{key!r} ({type(value).__name__})" for key, value in content.items() if not isinstance(value, Tensor)
    ]
    if others:
        raise ValueError(
            f"{str(path)!r} is not a state dict (a mapping of names to tensors): {len(others)} of its entries are "
            f"not tensors, e.g. {', '.join(others[:3])}. Save one with `torch.save(model.state_dict(), path)`."
        )
    return dict(content)


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> str | None:
    """How `state` fails to fit `model` (tensors of other shapes, missing and extra entries); None if it fits."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key}: {tuple(state[key].shape)} in the file, {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = []
    if reshaped:
        more = "; ..." if len(reshaped) > 3 else ""
        problems.append(f"{len(reshaped)} tensors have other shapes ({'; '.join(reshaped[:3])}{more})")
    if missing:
        problems.append(
            f"{len(missing)} entries of the model are missing from the file (e.g. {', '.join(missing[:3])})"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} entries of the file are not in the model (e.g. {', '.join(unexpected[:3])})"
        )
    return "; ".join(problems) if problems else None


def fit_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str | Path, hint: str = "") -> None:
    """`model.load_state_dict(state)` (strict), with an error naming the file and each kind of mismatch.

    Args:
        model: the module to load into.
        state: the state dict read from `path`.
        path: the file `state` came from (for the message).
        hint: what to check, appended to the message (e.g. the settings that build the model).
    """
    name = type(model).__name__
    problems = state_dict_mismatch(model, state)
    if problems:
        raise ValueError(
            f"The weights in {str(path)!r} do not fit the {name} built for them: {problems}."
            + (f" {hint}" if hint else "")
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # e.g. a tensor the model's own load_state_dict hook refuses
        raise ValueError(
            f"The weights in {str(path)!r} do not fit the {name} built for them: {error}"
            + (f" {hint}" if hint else "")
        ) from error
