"""Loading the classifier of an evaluation in every form: train.py checkpoint, timm pretrained (from a local cache
or a file), a registered architecture or timm model with a plain state dict, any `nn.Module` by class_path.

Every loaded model is compared on synthetic images with its source network behind a hand-written
`(x - mean) / std`. Offline: the timm "pretrained" weights are random weights written into a temporary Hugging
Face cache in the layout that huggingface_hub reads.
"""

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from jsonargparse import ArgumentParser
from torch import nn

import train
from mglightning import ClassifierSource, load_classifier
from mglightning.attacks import TopKInterpretationAttack
from mglightning.explainers import SimpleGradient
from mglightning.models import ImageClassifier, Normalize, build_classifier, create_model
from mglightning.modules.classifier import ClassifierModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA = dict(num_classes=10, image_size=16, in_chans=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
TIMM_NAME = "test_efficientnet"  # 0.36 M parameters, SiLU, 1000 classes; pretrained tag r160_in1k on the hub
TIMM_REPO = "timm/test_efficientnet.r160_in1k"


def normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    """`(x - mean) / std` per channel, written out, as the independent reference of the normalisation layer."""
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


class TinyNet(nn.Module):
    """A user network: conv, softplus, pool, linear (built by class_path from YAML in the tests)."""

    def __init__(self, num_classes: int = 10, hidden: int = 8, image_size: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, hidden, 3, padding=1)
        self.act = nn.Softplus()
        # With image_size, the head takes the flattened map and so only accepts that input size.
        self.pool = nn.AdaptiveAvgPool2d(1) if image_size is None else nn.Identity()
        self.fc = nn.Linear(hidden * (1 if image_size is None else image_size**2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


class Marker:
    """A Python object that torch.load(weights_only=True) refuses."""


def parse_classifier(yaml: str):
    """The classifier setting as the evaluation CLI parses it: jsonargparse with `ClassifierSource | str`."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--classifier", type=ClassifierSource | str)
    return parser.instantiate(parser.parse_string(yaml)).classifier


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real train.py checkpoint: the quickstart config shrunk to one training batch on 16x16 digits."""
    tmp = tmp_path_factory.mktemp("train")
    train.cli_main([
        "fit", "--config", str(CONFIGS / "digits.yaml"),
        "--data.init_args.image_size", "16", "--data.init_args.batch_size", "32",
        "--model.model_kwargs", '{"activation": "softplus", "beta": 1.0, "width": 4}',
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
        "--checkpoint.dirpath", str(tmp / "ckpt"), "--test_after_fit", "false",
    ])
    return tmp / "ckpt" / "last.ckpt"


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache and torch hub folder, chosen through the environment as a user would."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf" / "hub"


def put_in_hf_cache(hub: Path, repo_id: str, net: nn.Module) -> Path:
    """Store `net`'s weights as huggingface_hub does: a blob, a snapshot link to it, `refs/main` naming the revision."""
    folder = hub / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    blob = folder / "blobs" / "f00d"
    blob.parent.mkdir(parents=True)
    safetensors.torch.save_file(net.state_dict(), blob)
    snapshot = folder / "snapshots" / revision / "model.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def random_timm_net() -> nn.Module:
    return timm.create_model(TIMM_NAME).eval()


# --- a train.py checkpoint -------------------------------------------------------------------------------------


def test_checkpoint_path_gives_the_trained_network(checkpoint):
    reference = ClassifierModule.load_from_checkpoint(checkpoint, weights_only=False).net.eval()
    x = torch.rand(4, 3, 16, 16)
    for model in (load_classifier(checkpoint), load_classifier(str(checkpoint)), build_classifier(checkpoint)):
        assert not model.training and type(model) is type(reference)
        torch.testing.assert_close(model(x), reference(x))


def test_checkpoint_is_checked_against_the_data_and_its_normalisation_kept(checkpoint):
    stored = ClassifierModule.load_from_checkpoint(checkpoint, weights_only=False).hparams
    x = torch.rand(4, 3, 16, 16)
    model = build_classifier(checkpoint, num_classes=10, image_size=16, in_chans=3, mean=stored.mean, std=stored.std)
    with pytest.warns(UserWarning, match="differ from the data's.*keeping the model's"):
        other = build_classifier(checkpoint, num_classes=10, image_size=16, in_chans=3, **IMAGENET)
    torch.testing.assert_close(other(x), model(x))
    # Explicit mean/std replace the stored ones: the same network sees differently normalised pixels.
    explicit = build_classifier(ClassifierSource(checkpoint=str(checkpoint), mean=[0.5] * 3, std=[0.1] * 3))
    inner = load_classifier(checkpoint)
    inner.normalize = nn.Identity()
    torch.testing.assert_close(explicit(x), inner(normalized(x, [0.5] * 3, [0.1] * 3)))
    with pytest.raises(ValueError, match="10 outputs but the data has 200 classes.*class_subset"):
        build_classifier(checkpoint, num_classes=200, image_size=16)
    # normalize: false sets the network's own normalisation layer to the identity.
    raw = build_classifier(ClassifierSource(checkpoint=str(checkpoint), normalize=False))
    torch.testing.assert_close(raw(x), inner(x))


def test_checkpoints_are_read_weights_only_with_a_clear_error_naming_the_file(checkpoint, tmp_path):
    content = torch.load(checkpoint, weights_only=True)  # train.py's checkpoints need nothing beyond plain values
    content["hyper_parameters"]["marker"] = Marker()
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(content, unsafe)
    with pytest.raises(ValueError, match="unsafe.ckpt.*weights_only=True.*add_safe_globals"):
        load_classifier(unsafe)

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is no checkpoint")
    with pytest.raises(ValueError, match="Could not read .*garbage.ckpt"):
        load_classifier(garbage)
    with pytest.raises(FileNotFoundError, match="missing.ckpt.*does not exist.*train.py fit"):
        load_classifier(tmp_path / "missing.ckpt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a mglightning classifier checkpoint.*`weights`"):
        load_classifier(tmp_path / "weights.pt")


def test_each_weights_file_is_read_once(checkpoint, tmp_path, monkeypatch):
    """One pass from a source to a classifier: the checkpoint, or the state dict given as `weights`, is opened once."""
    net = create_model("resnet18", width=4, num_classes=10, image_size=16)
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("normalize.")}, tmp_path / "bare.pt")
    reads = []
    load = torch.load

    def recording_load(path, *args, **kwargs):
        reads.append(Path(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    load_classifier(checkpoint)
    assert reads == [checkpoint]
    build_classifier(ClassifierSource(arch="resnet18", weights=str(tmp_path / "bare.pt"), model_kwargs={"width": 4}),
                     **DATA)
    assert reads == [checkpoint, tmp_path / "bare.pt"]


# --- timm pretrained: the local cache or a weights file -------------------------------------------------------


def test_timm_pretrained_weights_come_from_the_local_hugging_face_cache(hf_cache, monkeypatch):
    source_net = random_timm_net()
    put_in_hf_cache(hf_cache, TIMM_REPO, source_net)
    x = torch.rand(3, 3, 32, 32)
    expected = source_net(normalized(x, **IMAGENET))

    for arch in (f"timm/{TIMM_NAME}", f"timm/{TIMM_NAME}.r160_in1k"):
        model = build_classifier(
            ClassifierSource(arch=arch, pretrained=True), num_classes=1000, image_size=32, in_chans=3, **IMAGENET
        )
        assert isinstance(model, ImageClassifier) and not model.training
        torch.testing.assert_close(model(x), expected)
        # Without data settings the pretrained configuration's normalisation and head are used.
        torch.testing.assert_close(load_classifier(ClassifierSource(arch=arch, pretrained=True))(x), expected)

    # The layout is the one timm and huggingface_hub themselves read offline.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    by_timm = timm.create_model(TIMM_NAME, pretrained=True, cache_dir=hf_cache).eval()
    torch.testing.assert_close(by_timm(normalized(x, **IMAGENET)), expected)


def test_timm_pretrained_weights_from_a_file_and_from_timms_older_cache(hf_cache, tmp_path):
    source_net = random_timm_net()
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(source_net.state_dict(), path)
    x = torch.rand(3, 3, 32, 32)
    model = load_classifier(ClassifierSource(arch=f"timm/{TIMM_NAME}", pretrained=True, weights=str(path)))
    torch.testing.assert_close(model(x), source_net(normalized(x, **IMAGENET)))

    # efficientnet_b0's configuration also names a url: timm's older cache keeps the file under its name.
    net = timm.create_model("efficientnet_b0").eval()
    legacy = tmp_path / "torch" / "hub" / "checkpoints" / "efficientnet_b0_ra-3dd342df.pth"
    legacy.parent.mkdir(parents=True)
    torch.save(net.state_dict(), legacy)
    model = load_classifier(ClassifierSource(arch="timm/efficientnet_b0", pretrained=True))
    torch.testing.assert_close(model(x), net(normalized(x, **IMAGENET)))


def test_missing_timm_weights_name_the_cache_location_and_the_fetch_command(hf_cache):
    with pytest.raises(FileNotFoundError) as error:
        build_classifier(ClassifierSource(arch=f"timm/{TIMM_NAME}", pretrained=True), **DATA)
    message = str(error.value)
    assert str(hf_cache / "models--timm--test_efficientnet.r160_in1k" / "snapshots") in message
    assert f"hf download {TIMM_REPO}" in message
    assert f"timm.create_model('{TIMM_NAME}', pretrained=True)" in message
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_classifier(ClassifierSource(arch=f"timm/{TIMM_NAME}", pretrained=True, weights="nowhere.pt"), **DATA)
    with pytest.raises(ValueError, match="timm has no model named 'no_such_net'"):
        build_classifier(ClassifierSource(arch="timm/no_such_net", pretrained=True), **DATA)


def test_pretrained_outputs_must_match_the_data_or_a_class_subset_maps_them(hf_cache):
    source_net = random_timm_net()
    put_in_hf_cache(hf_cache, TIMM_REPO, source_net)
    data = dict(DATA, **IMAGENET)
    with pytest.raises(ValueError, match="1000 outputs but the data has 10 classes.*class_subset"):
        build_classifier(ClassifierSource(arch=f"timm/{TIMM_NAME}", pretrained=True), **data)

    subset = [7, 3, 999, 0, 500, 1, 2, 42, 100, 8]
    model = build_classifier(ClassifierSource(arch=f"timm/{TIMM_NAME}", pretrained=True, class_subset=subset), **data)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(model(x), source_net(normalized(x, **IMAGENET))[:, subset])

    # The loaded model goes through an explainer and the top-k attack like any other.
    explainer = SimpleGradient(model)
    target = model(x).argmax(1)
    adversarial, moved = TopKInterpretationAttack(explainer, epsilon=0.5).perturb(x, target, seeds=torch.arange(2))
    attacked, clean = explainer.attribute(adversarial, target), explainer.attribute(x, target)
    assert moved.any() and torch.isfinite(attacked).all()
    assert all(not torch.equal(attacked[i], clean[i]) for i in torch.nonzero(moved).flatten())

    with pytest.raises(ValueError, match="class_subset names output 1000, but .* has 1000 outputs"):
        build_classifier(
            ClassifierSource(arch=f"timm/{TIMM_NAME}", pretrained=True, class_subset=subset[:9] + [1000]), **data
        )
    with pytest.raises(ValueError, match="class_subset maps 3 classes, but the data has 10"):
        build_classifier(ClassifierSource(arch=f"timm/{TIMM_NAME}", pretrained=True, class_subset=[1, 2, 3]), **data)
    # The pretrained configuration's normalisation is kept (with a warning) when the data's differs.
    with pytest.warns(UserWarning, match="keeping the model's"):
        model = build_classifier(
            ClassifierSource(arch=f"timm/{TIMM_NAME}", pretrained=True, class_subset=subset), **DATA
        )
    torch.testing.assert_close(model(x), source_net(normalized(x, **IMAGENET))[:, subset])


# --- a registered architecture or timm model with a plain state dict ------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_registered_architecture_with_a_plain_state_dict(tmp_path, suffix):
    source_net = create_model("resnet18", width=4, num_classes=10, image_size=16, **IMAGENET).eval()
    path = tmp_path / f"resnet{suffix}"
    state = source_net.state_dict()
    torch.save(state, path) if suffix == ".pt" else safetensors.torch.save_file(state, path)
    source = ClassifierSource(arch="resnet18", weights=str(path), model_kwargs={"width": 4})
    x = torch.rand(4, 3, 16, 16)
    # The state dict holds its normalisation, which is kept over the data's (with a warning).
    with pytest.warns(UserWarning, match="keeping the model's"):
        model = build_classifier(source, **DATA)
    assert not model.training
    torch.testing.assert_close(model(x), source_net(x))

    # A state dict of the network alone (no normalisation entries) gets the data's normalisation.
    bare = {k: v for k, v in state.items() if not k.startswith("normalize.")}
    torch.save(bare, tmp_path / "bare.pt")
    bare_source = ClassifierSource(arch="resnet18", weights=str(tmp_path / "bare.pt"), model_kwargs={"width": 4})
    model = build_classifier(bare_source, **DATA)
    source_net.normalize = nn.Identity()
    torch.testing.assert_close(model(x), source_net(normalized(x, DATA["mean"], DATA["std"])))

    with pytest.raises(ValueError, match="resnet.*do not fit the ResNet"):
        build_classifier(ClassifierSource(arch="resnet18", weights=str(path), model_kwargs={"width": 8}), **DATA)


def test_timm_architecture_with_a_plain_state_dict_takes_the_datas_classes(tmp_path):
    source_net = timm.create_model(TIMM_NAME, num_classes=10).eval()
    torch.save(source_net.state_dict(), tmp_path / "finetuned.pt")
    model = build_classifier(ClassifierSource(arch=f"timm/{TIMM_NAME}", weights=str(tmp_path / "finetuned.pt")), **DATA)
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(model(x), source_net(normalized(x, DATA["mean"], DATA["std"])))


def test_unreadable_and_foreign_weight_files_are_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="Could not read .*garbage.safetensors"):
        build_classifier(ClassifierSource(arch="resnet18", weights=str(garbage), model_kwargs={"width": 4}), **DATA)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt.*is not a state dict"):
        build_classifier(ClassifierSource(arch="resnet18", weights=str(tmp_path / "list.pt")), **DATA)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_classifier(ClassifierSource(arch="resnet18", weights=str(tmp_path / "absent.pt")), **DATA)


# --- any nn.Module, by class_path in YAML ----------------------------------------------------------------------


def test_user_module_by_class_path_from_yaml(tmp_path):
    source_net = TinyNet(hidden=6).eval()
    torch.save(source_net.state_dict(), tmp_path / "tiny.pt")
    source = parse_classifier(f"""
classifier:
  module:
    class_path: test_loading.TinyNet
    init_args: {{hidden: 6}}
  weights: {tmp_path / "tiny.pt"}
""")
    assert isinstance(source, ClassifierSource) and isinstance(source.module, TinyNet)
    model = build_classifier(source, **DATA)
    assert isinstance(model, ImageClassifier) and isinstance(model.normalize, Normalize) and not model.training
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(model(x), source_net(normalized(x, DATA["mean"], DATA["std"])))

    # A model that normalises itself gets the pixels as they are.
    model = build_classifier(ClassifierSource(module=source_net, normalize=False), **DATA)
    torch.testing.assert_close(model(x), source_net(x))
    # A plain string is a train.py checkpoint path.
    assert parse_classifier("classifier: checkpoints/digits/last.ckpt") == "checkpoints/digits/last.ckpt"


def test_input_size_and_output_count_are_checked_before_the_run():
    fixed = ClassifierSource(module=TinyNet(image_size=16))
    build_classifier(fixed, **DATA)
    with pytest.raises(ValueError, match="does not accept 3x32x32 images.*image_size"):
        build_classifier(fixed, **dict(DATA, image_size=32))
    with pytest.raises(ValueError, match="10 outputs but the data has 5 classes"):
        build_classifier(ClassifierSource(module=TinyNet()), **dict(DATA, num_classes=5))
    with pytest.raises(ValueError, match="normalisation has 3 channels but the data has 1"):
        build_classifier(ClassifierSource(module=TinyNet(), mean=[0.5] * 3, std=[0.2] * 3), **dict(DATA, in_chans=1))
    with pytest.raises(ValueError, match="needs the normalisation of its first layer"):
        build_classifier(ClassifierSource(module=TinyNet()), num_classes=10, image_size=16)

    class Tuple(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x

    with pytest.raises(ValueError, match=r"must return \(batch, classes\) scores"):
        build_classifier(ClassifierSource(module=Tuple(), normalize=False), **DATA)


def test_relu_networks_get_a_warning_naming_the_softplus_variant(recwarn):
    def untrained(activation: str) -> ClassifierSource:
        return ClassifierSource(arch="resnet18", model_kwargs={"width": 4, "activation": activation}, random_weights=True)

    build_classifier(untrained("softplus"), **DATA)
    build_classifier(ClassifierSource(module=TinyNet()), **DATA)
    assert not [w for w in recwarn if "ReLU" in str(w.message)]
    with pytest.warns(UserWarning, match="ReLU-type activations.*top-k interpretation attack.*activation: softplus"):
        build_classifier(untrained("relu"), **DATA)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "exactly one of `checkpoint`.*got none"),
        ({"checkpoint": "a.ckpt", "arch": "resnet18"}, r"exactly one of .*\['checkpoint', 'arch'\]"),
        ({"arch": "resnet18", "pretrained": True}, "pretrained: true needs arch: timm/"),
        ({"checkpoint": "a.ckpt", "weights": "w.pt"}, "holds its architecture and weights"),
        ({"module": nn.Linear(2, 2), "model_kwargs": {"width": 4}}, "init_args"),
        ({"arch": "resnet18", "model_kwargs": {"mean": [0.5]}}, r"may not set \['mean'\]"),
        ({"arch": "resnet18", "mean": [0.5]}, "both `mean` and `std`"),
        ({"arch": "resnet18", "normalize": False, "mean": [0.5], "std": [0.5]}, "normalize: false takes no"),
        ({"arch": "resnet18", "class_subset": [1, 1]}, "distinct, non-negative"),
    ],
)
def test_invalid_sources_are_rejected_with_the_setting_to_change(settings, message):
    with pytest.raises(ValueError, match=message):
        ClassifierSource(**settings)
