"""Model registry: ``name -> constructor``, in the spirit of timm's ``create_model``.

Every model takes float images in [0, 1], NCHW, 32x32, and returns logits. Per-channel
normalization is the first layer (buffers computed from the training split), so the
exported ONNX graph carries it and no caller keeps a second copy. ``forward_features`` also
returns what the out-of-distribution score reads: each stage's mean activation and the
pooled penultimate vector (``cifar.run.calibration.fit_density``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cifar.errors import CifarError

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, tuple[ModelBuilder, str]] = {}


def register_model(name: str, description: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorator(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = (builder, description)
        return builder

    return decorator


def available_models() -> dict[str, str]:
    return {name: description for name, (_, description) in sorted(_REGISTRY.items())}


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Normalization + a body network. ``init_from_data`` lets a body set data-dependent weights."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features): features are every stage's mean activation and the penultimate vector."""
        return self.body.forward_features(self.normalize(x))

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        if hasattr(self.body, "init_from_data"):
            self.body.init_from_data(self.normalize(images))

    @property
    def can_freeze_stem(self) -> bool:
        return hasattr(self.body, "freeze_stem")

    def freeze_stem(self) -> bool:
        """Stop training the body's fixed first layer; True when that changed anything."""
        return bool(self.body.freeze_stem())


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    width: float = 1.0,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
) -> Classifier:
    if name not in _REGISTRY:
        raise CifarError(f"unknown model '{name}'. Available models: {', '.join(sorted(_REGISTRY))}.")
    if width <= 0:  # recipes are checked in cifar.config; this guards direct calls
        raise ValueError(f"width must be positive, got {width}")
    builder, _ = _REGISTRY[name]
    return Classifier(builder(num_classes=num_classes, width=width), mean, std)


def _scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width / 8)) * 8)


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


# --- airbench-style residual-free fast net -------------------------------------------------
def _global_max(x: torch.Tensor) -> torch.Tensor:
    # adaptive_max_pool2d, not torch.amax: compiled for CPU under bf16 autocast, amax's backward
    # gives NaN gradients (torch 2.14.1 inductor); this one compiles exactly. N,C,H,W -> N,C.
    return nn.functional.adaptive_max_pool2d(x, 1).flatten(1)


class _ConvGroup(nn.Module):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU (pooling early halves the cost)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out)
        self.act = nn.GELU()
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)  # only the shift learns (as in airbench)
            norm.momentum = 0.4  # running statistics keep up with a fast schedule
        for conv in (self.conv1, self.conv2):
            # Identity init for the first c_in filters: the group starts close to a pass-through.
            nn.init.dirac_(conv.weight[: conv.weight.shape[1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    """Small net for 32x32 inputs with a patch-whitening first layer.

    Follows the ideas of "94% on CIFAR-10 in 3.29 Seconds on a Single GPU" (Jordan, 2024):
    the first 2x2 conv is fixed to the whitening transform of the training patches (set by
    ``init_from_data``), three conv groups, global max-pool, and a scaled linear head.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        widths = [_scaled(c, width) for c in (64, 256, 256)]
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.layers = nn.Sequential(
            _ConvGroup(24, widths[0]), _ConvGroup(widths[0], widths[1]), _ConvGroup(widths[1], widths[2])
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.head_scale = 1 / 9  # small logits at init; the net learns faster with it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(nn.functional.gelu(self.whiten(x)))
        return self.head(_global_max(x)) * self.head_scale

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = nn.functional.gelu(self.whiten(x))
        taps = []
        for group in self.layers:
            x = group(x)
            taps.append(x.mean(dim=(2, 3)))
        pooled = _global_max(x)
        return self.head(pooled) * self.head_scale, torch.cat([*taps, pooled], dim=1)

    def freeze_stem(self) -> bool:
        """Freeze the whitening bias: with no trainable stem, backward skips the first conv's input gradient."""
        changed = self.whiten.bias.requires_grad
        self.whiten.bias.requires_grad_(False)
        return changed

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N,C,H',W',2,2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        patches = patches - patches.mean(0, keepdim=True)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).float()
        filters = filters.view(12, 3, 2, 2).flip(0)  # largest variance first
        # Grayscale copied to RGB spans 4 of the 12 patch dimensions. A filter on an empty one
        # outputs only its bias, which BatchNorm makes scale-free, so it grows without bound
        # (logits near 1e4 after one epoch); those slots repeat the live filters instead.
        rank = int((eigenvalues > 1e-6 * eigenvalues.max()).sum())
        filters = filters[torch.arange(12) % rank]
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()


@register_model("fastnet", "airbench-style net with a whitening stem (fast on GPU and CPU)")
def fastnet(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return FastNet(num_classes, width)


# --- ResNet-18 from torchvision, adapted to 32x32 ------------------------------------------
@register_model("resnet18", "torchvision ResNet-18 with a 3x3 stem and no max-pool (baseline)")
def resnet18(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    # lazy: torchvision adds ~1 s to torch and only this recipe needs it; `calibrate --help` imports this module
    from torchvision.models.resnet import BasicBlock, ResNet

    class ResNet18(ResNet):  # torchvision's own module (same state dict), plus the feature taps
        def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.relu(self.bn1(self.conv1(x)))
            taps = []
            for stage in (self.layer1, self.layer2, self.layer3):
                x = stage(x)
                taps.append(x.mean(dim=(2, 3)))
            pooled = torch.flatten(self.avgpool(self.layer4(x)), 1)
            return self.fc(pooled), torch.cat([*taps, pooled], dim=1)

    if width != 1.0:
        raise CifarError("resnet18 has a fixed width; remove model.width or set it to 1.0.")
    net = ResNet18(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


# --- a small plain CNN for laptops and tests -----------------------------------------------
class SmallCNN(nn.Sequential):
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps = []
        for layer in self[:-1]:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                taps.append(x.mean(dim=(2, 3)))
        return self[-1](x), torch.cat([*taps[:-1], x], dim=1)  # the last stage's mean is x itself


@register_model("small_cnn", "small plain CNN: quick on any CPU, for smoke tests and laptops")
def small_cnn(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    c1, c2, c3 = (_scaled(c, width) for c in (32, 64, 128))
    return SmallCNN(
        *_conv_bn(3, c1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        *_conv_bn(c1, c2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        *_conv_bn(c2, c3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, num_classes),
    )
