from collections import Counter

import pytest
import torch

from mglightning.models import Normalize, create_model, list_models, load_weights

# Each registered model with the settings it is used with, plus a timm model through the same wrapper.
MODEL_CASES = [(name, {"num_classes": 7, "image_size": 32, "width": 8}) for name in list_models()] + [
    ("resnet18", {"num_classes": 7, "image_size": 64, "width": 8, "activation": "relu"}),
    ("timm/efficientnet_b0", {"num_classes": 7, "image_size": 32}),
]


def _ids(case):
    name, kwargs = case
    return f"{name}-{kwargs['image_size']}px-{kwargs.get('activation', 'default')}"


@pytest.fixture(params=MODEL_CASES, ids=[_ids(c) for c in MODEL_CASES])
def model_case(request):
    name, kwargs = request.param
    return create_model(name, **kwargs), kwargs["image_size"], kwargs["num_classes"]


def test_forward_shape_and_finite(model_case):
    model, size, num_classes = model_case
    out = model(torch.rand(3, 3, size, size))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_every_parameter_gets_a_gradient(model_case):
    model, size, _ = model_case
    model(torch.rand(2, 3, size, size)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_no_module_is_called_twice_in_one_forward(model_case):
    model, size, _ = model_case
    calls = Counter()
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda mod, i, o: calls.update([id(mod)])) for m in leaves]
    model(torch.rand(2, 3, size, size))
    for h in handles:
        h.remove()
    assert calls and max(calls.values()) == 1


def test_softplus_resnet_uses_softplus_everywhere():
    model = create_model("resnet18", width=8, beta=5.0)
    acts = [m for m in model.modules() if isinstance(m, (torch.nn.Softplus, torch.nn.ReLU))]
    assert len(acts) == 17  # stem + 2 per block x 8 blocks
    assert all(isinstance(m, torch.nn.Softplus) and m.beta == 5.0 for m in acts)


def test_stem_stride_follows_image_size():
    assert create_model("resnet18", image_size=32, width=8).conv1.stride == (1, 1)
    assert create_model("resnet18", image_size=64, width=8).conv1.stride == (2, 2)


def test_normalisation_is_the_first_layer():
    model = create_model("resnet18", width=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)
    x = torch.rand(1, 3, 4, 4)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5
    torch.testing.assert_close(first(x), expected)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown model 'resnet19'.*resnet18"):
        create_model("resnet19")
    with pytest.raises(ValueError, match="timm has no model named"):
        create_model("timm/not_a_model")


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown activation"):
        create_model("resnet18", activation="gelu")
    with pytest.raises(ValueError, match="one per input channel"):
        create_model("resnet18", mean=(0.5,), std=(0.5,))


def test_pretrained_timm_weights_offline_fail_clearly():
    with pytest.raises(RuntimeError, match="pretrained weights.*weights=<local file>"):
        create_model("timm/resnet10t", pretrained=True)


def test_weights_from_a_local_file_round_trip(tmp_path):
    source = create_model("resnet18", width=8)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    loaded = create_model("resnet18", width=8, weights=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source.eval()(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(loaded, tmp_path / "missing.pt")
    shapes = r"conv1.weight: \(8, 3, 3, 3\) in the file, \(16, 3, 3, 3\) in the model"
    with pytest.raises(ValueError, match=f"weights.pt.*do not fit the ResNet.*{shapes}"):
        create_model("resnet18", width=16, weights=str(path))
