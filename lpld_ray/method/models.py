"""Model registry (ConvNets for small images, torchvision ResNets) and teacher weight loading."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lpld_ray.config import ARCHS
from lpld_ray.errors import ModelError, StorageError

log = logging.getLogger(__name__)

STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
CONVNET_WIDTHS = {"convnet": 128, "convnet_w64": 64}  # the DC benchmark's ConvNet and its ConvNetW64


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet: ``depth`` x (conv3x3 -> BN -> ReLU -> avgpool2), then linear."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width),
                       nn.ReLU(), nn.AvgPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2**depth
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialised model of ``arch`` for ``in_channels`` x ``image_size``^2 inputs."""
    if arch not in ARCHS:
        raise ModelError(f"unknown model arch '{arch}': choose one of {', '.join(ARCHS)}")
    if num_classes < 1 or in_channels < 1:
        raise ModelError(f"model '{arch}' needs num_classes >= 1 and in_channels >= 1, "
                         f"got {num_classes} and {in_channels}")
    if arch in CONVNET_WIDTHS:
        if image_size < 8:
            raise ModelError(f"{arch} needs images of at least 8 px, got {image_size}")
        return ConvNet(num_classes, in_channels, image_size, width=CONVNET_WIDTHS[arch])
    import torchvision  # here, not at the top: importing it costs every process ~3 s (it imports torch._dynamo)

    if arch == "resnet50":
        return _with_in_channels(torchvision.models.resnet50(weights=None, num_classes=num_classes), in_channels)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if arch == "resnet18_small":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    return _with_in_channels(model, in_channels)


def _with_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace a torchvision ResNet's stem conv when the input is not RGB (same shape otherwise)."""
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                                stride=old.stride, padding=old.padding, bias=False)
    return model


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the last ``nn.Linear`` in module order (the classifier)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ModelError(f"model {type(model).__name__} has no nn.Linear classifier")
    return found[-1]


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the final ``nn.Linear`` for ``x``, flattened to [B, D]."""
    _, head = final_linear(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1)


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model's BatchNorm2d layers in module order (forward order for the registered archs)."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def save_weights_bytes(model: nn.Module) -> bytes:
    """The model's state dict (on CPU) as ``torch.save`` bytes."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def load_weights(model: nn.Module, uri: str, read_bytes: Callable[[str], bytes]) -> nn.Module:
    """Load a state dict from ``uri`` (read by ``read_bytes``) into ``model`` (in place) and return it;
    ModelError if it does not fit."""
    return load_weights_bytes(model, _read_weights(uri, read_bytes), source=uri)


def load_weights_bytes(model: nn.Module, raw: bytes, source: str = "<bytes>") -> nn.Module:
    """Load ``torch.save`` bytes of a state dict into ``model``; ``source`` names them in errors."""
    state = _state_dict_from(_torch_load(raw, source), source)
    _check_fits(model, state, source)
    model.load_state_dict(state, strict=True)
    log.info("loaded teacher weights from %s (%d tensors)", source, len(state))
    return model


def _read_weights(uri: str, read_bytes: Callable[[str], bytes]) -> bytes:
    try:
        return read_bytes(uri)
    except FileNotFoundError as err:
        raise ModelError(f"teacher weights not found: '{uri}'") from err
    except IsADirectoryError as err:
        raise ModelError(f"teacher weights '{uri}' is a folder (allowed: a file of torch.save'd weights)") from err
    except StorageError as err:
        if "not found" in str(err):
            raise ModelError(f"teacher weights not found: '{uri}'") from err
        raise ModelError(f"teacher weights '{uri}' cannot be read: {err}") from err


def _torch_load(raw: bytes, uri: str) -> object:
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad or unsafe files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"teacher weights '{uri}' are not a loadable torch state dict: {first}") from err


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _state_dict_from(obj: object, uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a raw state dict or one nested under "state_dict" / "model", wrapper prefixes stripped."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    tensors = {_strip_prefixes(str(k)): v for k, v in obj.items()
               if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
    if not tensors:
        raise ModelError(f"teacher weights '{uri}' hold no state dict: expected a mapping of names to tensors, "
                         "optionally under 'state_dict' or 'model'")
    return tensors


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], uri: str) -> None:
    """Raise a ModelError naming the classifier size or the first key that does not fit."""
    name, head = final_linear(model)
    weight = state.get(f"{name}.weight" if name else "weight")
    if weight is not None and weight.dim() == 2 and weight.shape[0] != head.out_features:
        raise ModelError(f"teacher weights '{uri}' have {weight.shape[0]} output classes but the dataset has "
                         f"{head.out_features}: give weights trained on this dataset, "
                         "or leave teacher.weights empty to train one")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    missing_set = set(missing)
    for key, tensor in expected.items():
        if key in missing_set:
            raise ModelError(f"teacher weights '{uri}' do not fit the model: key '{key}' is missing "
                             f"({len(missing)} of {len(expected)} model keys missing)")
        if key in state and state[key].shape != tensor.shape:
            raise ModelError(f"teacher weights '{uri}' do not fit the model: key '{key}' has shape "
                             f"{list(state[key].shape)} but the model expects {list(tensor.shape)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ModelError(f"teacher weights '{uri}' do not fit the model: unexpected key '{unexpected[0]}' "
                         f"({len(unexpected)} keys the model does not have)")


def build_teacher(arch: str, state: bytes, num_classes: int, channels: int, size: int) -> nn.Module:
    """The teacher from its state dict bytes, in eval mode, channels-last (~25% faster convolutions on CPU and GPU; one
    layout for every stage, so that an actor's results do not depend on what it ran before), on the GPU when there is
    one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(arch, num_classes, channels, size)
    load_weights_bytes(model, state, source="teacher")
    return model.to(device, memory_format=torch.channels_last).eval()
