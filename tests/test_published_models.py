"""The published CIFAR-10 models (checkpoints/cifar10_study/): their files match models.json, and the script that
exports and checks them reproduces a model's test accuracy and catches a changed file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fake_datasets import write_fake_cifar10
from mglightning.models import create_model, load_classifier

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "checkpoints" / "cifar10_study"


def _script():
    spec = importlib.util.spec_from_file_location("published_models", REPO / "benchmarks" / "published_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (PUBLISHED / "models.json").exists(), reason="no published models in this checkout")
def test_published_files_match_their_manifest_and_load():
    script = _script()
    manifest = json.loads((PUBLISHED / "models.json").read_text())
    assert len(manifest["models"]) == 3, "the study publishes three independently seeded models"
    for entry in manifest["models"]:
        assert script.sha256_of(PUBLISHED / entry["file"]) == entry["sha256"], entry["file"]
        assert 0.5 < entry["test_accuracy"] <= 1 and entry["test_images"] == 10_000
        model = load_classifier(script.source_of(entry, PUBLISHED), num_classes=10, image_size=32, in_chans=3)
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_export_then_check_reproduces_the_accuracy_and_catches_a_changed_file(tmp_path, capsys):
    script = _script()
    data_dir = write_fake_cifar10(tmp_path / "cifar10", n_train=10, n_test=30)
    torch.manual_seed(0)
    net = create_model("resnet18", num_classes=10, image_size=32, **script.ARCH["model_kwargs"])
    torch.save(net.state_dict(), tmp_path / "net.pt")
    folder = tmp_path / "published"
    common = ["--data-dir", str(data_dir), "--folder", str(folder)]
    assert script.main(["export", "--seed", "3", "--checkpoint", str(tmp_path / "net.pt"),
                        "--command", "made in a test", *common]) == 0
    entry = json.loads((folder / "models.json").read_text())["models"][0]
    # The accuracy the script states is the one a direct count over the test set gives.
    images = torch.cat([batch[0] for batch in _test_batches(data_dir)])
    labels = torch.cat([batch[1] for batch in _test_batches(data_dir)])
    with torch.no_grad():
        expected = (net.eval()(images).argmax(dim=1) == labels).float().mean().item()
    assert entry["test_accuracy"] == pytest.approx(expected) and entry["test_images"] == 30
    capsys.readouterr()
    assert script.main(["check", *common]) == 0
    assert json.loads(capsys.readouterr().out)["all_agree"] is True

    state = torch.load(tmp_path / "net.pt")
    state["fc.bias"] = state["fc.bias"] + 1.0  # another model under the same name
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / entry["file"]))
    assert script.main(["check", *common]) == 1
    assert json.loads(capsys.readouterr().out)["models"][0]["sha256_matches"] is False


def _test_batches(data_dir):
    from mglightning.data import CIFAR10DataModule

    data = CIFAR10DataModule(data_dir=str(data_dir), batch_size=8, num_workers=0)
    data.setup("test")
    return list(data.test_dataloader())
