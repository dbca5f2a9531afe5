"""Weights files from elsewhere: no loading entry point runs code from a file, and every refusal says why.

A malicious pickle (an object whose `__reduce__` creates a marker file when unpickled) goes through every public
way of loading weights: `read_weights_file`, `create_model(weights=)`, `load_weights`, `load_classifier`,
`build_classifier` with each `ClassifierSource` form, `evaluate.py`, the figure commands and resuming a training
(`train.py fit --ckpt_path`). The marker must never appear, and the error must say that the file was refused,
why, and how to re-save it. Then the messages for empty, foreign and mismatched files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import safetensors.torch
import torch
from torch import nn

import evaluate
import figures
import train
from mglightning import ClassifierSource, load_classifier
from mglightning.data import DigitsDataModule
from mglightning.models import build_classifier, create_model, load_weights, read_weights_file
from mglightning.modules import ClassifierModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA = dict(num_classes=10, image_size=16, in_chans=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
REFUSED = (
    r"Refused to read .*{name}.*a Python object \(exec\).*could run code.*torch\.save\(model\.state_dict\(\)"
    r".*safetensors"
)


class Payload:
    """Unpickling this object runs `exec`, which creates the marker file: what a malicious weights file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def tiny_train_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / "digits.yaml"),
        "--data.init_args.image_size", "16", "--data.init_args.batch_size", "32",
        "--model.model_kwargs", '{"activation": "softplus", "width": 4}',
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--test_after_fit", "false",
        *extra,
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real train.py checkpoint of a width-4 ResNet-18 on 16x16 digits (one training batch)."""
    tmp = tmp_path_factory.mktemp("train")
    train.cli_main(tiny_train_args(tmp))
    return (tmp / "ckpt" / "version_0" / "last.ckpt").resolve()


@pytest.fixture()
def marker(tmp_path) -> Path:
    path = tmp_path / "marker"
    assert not path.exists()
    return path


@pytest.fixture()
def malicious(tmp_path, marker, checkpoint) -> dict[str, Path]:
    """Malicious files: a state dict, and a train.py checkpoint, each with the payload among its values."""
    net = create_model("resnet18", width=4, num_classes=10, image_size=16)
    state = {**net.state_dict(), "payload": Payload(marker)}
    torch.save(state, tmp_path / "evil_state.pt")
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["payload"] = Payload(marker)
    torch.save(content, tmp_path / "evil.ckpt")
    # Check that the payload works: loading without weights_only runs it.
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return {"state": tmp_path / "evil_state.pt", "checkpoint": tmp_path / "evil.ckpt"}


def test_the_one_reader_refuses_both_files(malicious, marker):
    for path in malicious.values():
        with pytest.raises(ValueError, match=REFUSED.format(name=path.name)):
            read_weights_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["state", "checkpoint"])
def test_create_model_and_load_weights_refuse_it(malicious, marker, kind):
    path = malicious[kind]
    with pytest.raises(ValueError, match=REFUSED.format(name=path.name)):
        create_model("resnet18", width=4, num_classes=10, image_size=16, weights=str(path))
    with pytest.raises(ValueError, match=REFUSED.format(name=path.name)):
        load_weights(create_model("resnet18", width=4, num_classes=10, image_size=16), path)
    assert not marker.exists()


def test_load_classifier_and_every_classifier_source_refuse_it(malicious, marker):
    checkpoint, state = malicious["checkpoint"], malicious["state"]
    with pytest.raises(ValueError, match=REFUSED.format(name=checkpoint.name)):
        load_classifier(checkpoint)
    sources = [
        ClassifierSource(arch="resnet18", weights=str(state), model_kwargs={"width": 4}),
        ClassifierSource(arch="resnet18", weights=str(checkpoint), model_kwargs={"width": 4}),
        ClassifierSource(module=nn.Sequential(nn.Flatten(), nn.Linear(768, 10)), weights=str(state)),
        ClassifierSource(arch="timm/test_efficientnet", weights=str(state)),
        ClassifierSource(arch="timm/test_efficientnet", pretrained=True, weights=str(state)),
    ]
    for source in sources:
        with pytest.raises(ValueError, match=REFUSED.format(name=Path(source.weights).name)):
            build_classifier(source, **DATA)
    assert not marker.exists()


def test_evaluate_py_refuses_it(malicious, marker, tmp_path):
    path = malicious["checkpoint"]
    with pytest.raises(ValueError, match=REFUSED.format(name=path.name)):
        evaluate.cli_main([
            "--config", str(CONFIGS / "eval_digits.yaml"), "--ckpt_path", str(path),
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
        ])
    assert not marker.exists()


def test_the_figure_commands_refuse_it(malicious, marker, tmp_path):
    path = malicious["checkpoint"]
    with pytest.raises(ValueError, match=REFUSED.format(name=path.name)):
        figures.fig3(ckpt_path=str(path), data=DigitsDataModule(image_size=16), output_dir=str(tmp_path / "figs"))
    assert not marker.exists()


def test_resuming_a_training_refuses_it(malicious, marker, tmp_path):
    path = malicious["checkpoint"]
    with pytest.raises(ValueError, match=REFUSED.format(name=path.name)):
        train.cli_main(tiny_train_args(tmp_path, "--ckpt_path", str(path)))
    assert not marker.exists()


def test_nothing_in_the_repository_calls_torch_load_without_weights_only():
    """Every torch.load outside the one reader (and the tests) passes weights_only=True: a static guard."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted(root.glob("**/*.py")):
        if {"tests", ".venv", ".git"} & set(path.relative_to(root).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if keywords.get("weights_only") != "True":
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


# --- messages that name the file, what was found and what was expected -----------------------------------------


def test_an_empty_file_says_it_is_empty(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(ValueError, match=r"empty.ckpt.*empty \(0 bytes\).*expected a state dict.*safetensors"):
        load_classifier(empty)


def test_random_bytes_say_what_the_file_starts_with(tmp_path):
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(7, 200)))
    message = r"noise.ckpt.*neither a torch.save file.*nor a safetensors file; its first bytes are b'\\x07.*Expected"
    with pytest.raises(ValueError, match=message):
        load_classifier(noise)
    # Not the "holds Python objects besides tensors" of a file that weights_only refuses.
    with pytest.raises(ValueError) as error:
        read_weights_file(noise)
    assert "Python object" not in str(error.value)


def test_a_truncated_or_corrupt_file_says_so(tmp_path, checkpoint):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.ckpt.*truncated or corrupt"):
        load_classifier(truncated)
    header = tmp_path / "broken.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(100)}, header)
    header.write_bytes(header.read_bytes()[:-100])
    with pytest.raises(ValueError, match="broken.safetensors.*safetensors header.*corrupt or truncated"):
        read_weights_file(header)


def test_the_format_comes_from_the_contents_not_the_name(tmp_path):
    net = create_model("resnet18", width=4, num_classes=10, image_size=16)
    safetensors.torch.save_file(net.state_dict(), tmp_path / "weights.pt")  # safetensors under a .pt name
    loaded = create_model("resnet18", width=4, num_classes=10, image_size=16, weights=str(tmp_path / "weights.pt"))
    for name, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


def test_a_checkpoint_of_another_width_names_the_file_and_the_tensors(checkpoint):
    with pytest.raises(ValueError, match=rf"{checkpoint.name}.*do not fit the ResNet.*conv1.weight: \(4, 3, 3, 3\) "
                       r"in the file, \(8, 3, 3, 3\) in the model"):
        create_model("resnet18", width=8, num_classes=10, image_size=16, weights=str(checkpoint))


def test_loading_a_checkpoint_of_another_width_into_the_module_names_the_file_and_the_setting(checkpoint):
    # train.py refuses a --ckpt_path whose settings differ from the config's before it builds a trainer
    # (tests/test_checks_before_work.py); the Python API can still put a module and such a checkpoint together.
    data = DigitsDataModule(image_size=16)
    module = ClassifierModule(num_classes=10, image_size=16, mean=list(data.mean), std=list(data.std), lr=0.05,
                              model_kwargs={"activation": "softplus", "width": 8})
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError) as error:
        trainer.test(module, datamodule=data, ckpt_path=str(checkpoint))
    message = str(error.value)
    assert str(checkpoint) in message and "does not fit the model of this run" in message
    assert "net.conv1.weight: (4, 3, 3, 3) in the file, (8, 3, 3, 3) in the model" in message
    assert "'width': 4" in message and "'width': 8" in message and "drop --ckpt_path" in message
    assert "mean=" not in message  # a tuple in the checkpoint and a list in the run are the same setting
    # (load_from_checkpoint writes its overrides into the checkpoint's settings, so only the shapes are named.)
    with pytest.raises(ValueError, match=r"does not fit the model of this run.*\(4, 3, 3, 3\) in the file"):
        ClassifierModule.load_from_checkpoint(checkpoint, model_kwargs={"activation": "softplus", "width": 8})


def test_torch_load_default_is_not_what_protects_the_resume(malicious, marker, checkpoint, tmp_path, monkeypatch):
    """With torch's default turned to weights_only=False, the resume still reads weights-only."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="Refused to read"):
        train.cli_main(tiny_train_args(tmp_path, "--ckpt_path", str(malicious["checkpoint"])))
    assert not marker.exists()
    # A good checkpoint resumes, and no torch.load on the way fell back to weights_only=False (torch warns when
    # the variable turns an unset weights_only into False).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = train.cli_main(tiny_train_args(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoint)))
    assert cli.trainer.current_epoch == 2
    assert not [w for w in caught if "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in str(w.message)]
