"""Tests for lpld_ray.method.models: architectures, weight saving/loading and its errors, feature and BN access."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from lpld_ray.errors import ModelError
from lpld_ray.method.models import (
    ARCHS,
    bn_layers,
    build_model,
    build_teacher,
    load_weights,
    load_weights_bytes,
    penultimate_features,
    save_weights_bytes,
)


def read_local(uri: str) -> bytes:
    return Path(uri).read_bytes()


def _save(tmp_path: Path, obj: object, name: str = "w.pt") -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (32, 3)])
def test_convnet_shapes(size, channels):
    model = build_model("convnet", 10, channels, size)
    assert model(torch.rand(2, channels, size, size)).shape == (2, 10)
    assert model.classifier.in_features == 128 * (size // 8) ** 2


@pytest.mark.parametrize("arch", ["resnet18", "resnet18_small"])
@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_shapes(arch, channels):
    model = build_model(arch, 7, channels, 32)
    assert model(torch.rand(2, channels, 32, 32)).shape == (2, 7)
    assert model.conv1.in_channels == channels


def test_resnet18_small_stem():
    model = build_model("resnet18_small", 10, 3, 32)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert model.conv1.bias is None and isinstance(model.maxpool, nn.Identity)
    assert penultimate_features(model.eval(), torch.rand(1, 3, 32, 32)).shape == (1, 512)


def test_resnet50_forward_and_stem():
    model = build_model("resnet50", 5, 3, 32).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    gray = build_model("resnet50", 5, 1, 32)
    assert tuple(gray.conv1.weight.shape) == (64, 1, 7, 7) and gray.conv1.stride == (2, 2)


def test_torchvision_keys_kept():
    ours = build_model("resnet18", 1000, 3, 224).state_dict()
    theirs = torchvision.models.resnet18(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    model = build_model("resnet18", 1000, 3, 224)
    load_weights_bytes(model, _bytes(theirs))  # a torchvision-style state dict loads as is
    assert torch.equal(model.fc.weight, theirs["fc.weight"])


def _bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_unknown_arch():
    with pytest.raises(ModelError) as err:
        build_model("vgg11", 10, 3, 32)
    assert str(err.value) == "unknown model arch 'vgg11': choose one of convnet, convnet_w64, resnet18, resnet18_small, resnet50"
    for arch in ARCHS:  # every arch the message offers builds, for the classes asked
        with torch.no_grad():
            assert build_model(arch, 3, 3, 32).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3), arch


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def _trained_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Run one train-mode forward so BN running stats differ from a fresh model's."""
    with torch.no_grad():
        model.train()(x)
    return model


@pytest.mark.parametrize("arch,channels,size", [("convnet", 1, 28), ("resnet18", 1, 32)])
def test_save_then_load_round_trip(tmp_path, arch, channels, size):
    x = torch.rand(4, channels, size, size)
    src = _trained_bn(build_model(arch, 10, channels, size), x)
    path = tmp_path / "teacher.pt"
    path.write_bytes(save_weights_bytes(src))
    fresh = build_model(arch, 10, channels, size)
    assert not _same_outputs(src, fresh, x)
    out = load_weights(fresh, str(path), read_bytes=read_local)
    assert out is fresh and _same_outputs(src, fresh, x)


def test_load_through_storage(tmp_path):
    from lpld_ray.store.storage import read_uri_bytes

    x = torch.rand(2, 1, 28, 28)
    src = _trained_bn(build_model("convnet", 10, 1, 28), x)
    path = tmp_path / "teacher.pt"
    path.write_bytes(save_weights_bytes(src))
    fresh = load_weights(build_model("convnet", 10, 1, 28), str(path), read_uri_bytes)
    assert _same_outputs(src, fresh, x)
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ModelError) as err:
        load_weights(build_model("convnet", 10, 1, 28), missing, read_uri_bytes)
    assert str(err.value) == f"teacher weights not found: '{missing}'"


def test_missing_file(tmp_path):
    missing = str(tmp_path / "absent.pt")
    with pytest.raises(ModelError) as err:
        load_weights(build_model("convnet", 10, 1, 28), missing, read_bytes=read_local)
    assert str(err.value) == f"teacher weights not found: '{missing}'"


def test_wrong_class_count(tmp_path):
    uri = _save(tmp_path, build_model("convnet", 1000, 1, 28).state_dict())
    with pytest.raises(ModelError) as err:
        load_weights(build_model("convnet", 10, 1, 28), uri, read_bytes=read_local)
    assert str(err.value) == (f"teacher weights '{uri}' have 1000 output classes but the dataset has 10: give "
                              "weights trained on this dataset, or leave teacher.weights empty to train one")


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_nested_and_prefixed_state_dict(tmp_path, wrapper):
    x = torch.rand(2, 3, 32, 32)
    src = _trained_bn(build_model("resnet18_small", 10, 3, 32), x)
    wrapped = {wrapper: {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    uri = _save(tmp_path, wrapped)
    fresh = load_weights(build_model("resnet18_small", 10, 3, 32), uri, read_bytes=read_local)
    assert _same_outputs(src, fresh, x)


def test_old_checkpoint_without_num_batches_tracked():
    src = build_model("convnet", 10, 1, 28)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_weights_bytes(build_model("convnet", 10, 1, 28), _bytes(state))


def test_mismatching_keys_are_named(tmp_path):
    model = build_model("convnet", 10, 3, 28)
    rgb_state = model.state_dict()
    gray = _save(tmp_path, build_model("convnet", 10, 1, 28).state_dict(), "gray.pt")
    with pytest.raises(ModelError, match=r"key 'features\.0\.weight' has shape \[128, 1, 3, 3\] .* \[128, 3, 3, 3\]"):
        load_weights(model, gray, read_bytes=read_local)
    partial = _save(tmp_path, {k: v for k, v in rgb_state.items() if k != "features.1.weight"}, "partial.pt")
    with pytest.raises(ModelError, match=r"key 'features\.1\.weight' is missing"):
        load_weights(model, partial, read_bytes=read_local)
    extra = _save(tmp_path, {**rgb_state, "head2.weight": torch.zeros(1)}, "extra.pt")
    with pytest.raises(ModelError, match=r"unexpected key 'head2\.weight'"):
        load_weights(model, extra, read_bytes=read_local)
    other_arch = _save(tmp_path, build_model("resnet18", 10, 3, 28).state_dict(), "resnet.pt")
    with pytest.raises(ModelError, match=r"key 'features\.0\.weight' is missing"):
        load_weights(model, other_arch, read_bytes=read_local)


class _NotATensor:
    pass


def test_bad_files_are_model_errors(tmp_path):
    model = build_model("convnet", 10, 1, 28)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ModelError, match="not a loadable torch state dict") as err:
        load_weights(model, str(garbage), read_bytes=read_local)
    assert "\n" not in str(err.value)
    unsafe = _save(tmp_path, {"state_dict": _NotATensor()}, "unsafe.pt")  # weights_only refuses custom classes
    with pytest.raises(ModelError, match="not a loadable torch state dict"):
        load_weights(model, unsafe, read_bytes=read_local)
    empty = _save(tmp_path, {"epoch": 3}, "empty.pt")
    with pytest.raises(ModelError, match="hold no state dict"):
        load_weights(model, empty, read_bytes=read_local)


def test_penultimate_features():
    conv = build_model("convnet", 10, 1, 28).eval()
    feats = penultimate_features(conv, torch.rand(3, 1, 28, 28))
    assert feats.shape == (3, 128 * 3 * 3)
    x = torch.rand(2, 3, 32, 32)
    resnet = build_model("resnet18", 10, 3, 32).eval()
    feats = penultimate_features(resnet, x)
    assert feats.shape == (2, 512)
    assert torch.allclose(resnet.fc(feats), resnet(x), atol=1e-5)
    assert not resnet.fc._forward_pre_hooks  # the hook is removed


def test_bn_layers():
    conv = build_model("convnet", 10, 1, 28)
    assert len(bn_layers(conv)) == 3
    resnet = build_model("resnet18", 10, 3, 32)
    layers = bn_layers(resnet)
    assert len(layers) == 20 and all(isinstance(m, nn.BatchNorm2d) for m in layers)
    assert layers[0] is resnet.bn1 and layers[-1] is resnet.layer4[1].bn2
    assert len(bn_layers(build_model("resnet18_small", 10, 3, 32))) == 20


def test_bad_sizes():
    with pytest.raises(ModelError, match="num_classes"):
        build_model("resnet18", 0, 3, 32)
    with pytest.raises(ModelError, match="8 px"):
        build_model("convnet", 10, 1, 4)


def test_given_teacher_weights_are_evaluated_and_recorded(tmp_path):
    """teacher.weights skips training, but the report still gets the teacher's test top-1 (teacher/given)."""
    from lpld_ray.config import DataConfig
    from lpld_ray.data.datasets import load_dataset
    from lpld_ray.method.images import normalize
    from lpld_ray.pipeline.teacher import (
        commit_given_teacher,
        recorded_teacher_top1,
        top1_on_test_set,
    )
    from lpld_ray.store.storage import Store

    torch.manual_seed(0)
    data = DataConfig(name="digits")
    test_set = load_dataset(data, "test")
    model = build_model("convnet", test_set.num_classes, test_set.spec.channels, test_set.spec.size).eval()
    with torch.no_grad():  # the expected accuracy, by hand over the whole test set
        logits = model(normalize(torch.stack([test_set[i][0] for i in range(len(test_set))]), test_set.spec))
    expected = (logits.argmax(1) == torch.tensor([test_set[i][1] for i in range(len(test_set))])).float().mean().item()
    spec = test_set.spec  # the weights as the shard actor loads them (bytes, channels-last), scored as it scores them
    teacher = build_teacher("convnet", save_weights_bytes(model), test_set.num_classes, spec.channels, spec.size)
    top1 = top1_on_test_set(teacher, test_set, batch_size=64)
    assert top1 == pytest.approx(expected, abs=1.5 / len(test_set))  # batching may flip a near-tie, no more
    store = Store(str(tmp_path / "run"))
    assert recorded_teacher_top1(store, weights_given=True) is None
    commit_given_teacher(store, top1, "ab" * 32, seed=0)
    assert recorded_teacher_top1(store, weights_given=True) == top1
    assert recorded_teacher_top1(store, weights_given=False) is None  # no teacher was trained in this run


def test_convnet_w64_is_the_convnet_at_half_the_width():
    """ConvNetW64 (the Fashion-MNIST preset's teacher): the same layers as the ConvNet, 64 channels instead of 128."""
    narrow, wide = build_model("convnet_w64", 10, 1, 28), build_model("convnet", 10, 1, 28)
    assert [type(m) for m in narrow.modules()] == [type(m) for m in wide.modules()]
    assert {m.out_channels for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)} == {64}
    assert narrow(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
