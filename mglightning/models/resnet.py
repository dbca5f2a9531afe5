"""ResNet-18 for small images (CIFAR-10, tiny-ImageNet) with a configurable, smooth activation.

The paper explains softplus ResNet-18s: every ReLU is replaced by `nn.Softplus(beta)`, which makes the class
scores smooth (weakly convex), the setting of the paper's Theorem 1.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mglightning.models.layers import Normalize, make_activation
from mglightning.models.registry import register_model

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; each activation is its own module."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str, beta: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation, beta)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.act2 = make_activation(activation, beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem without max-pool (stride 2 for 64x64 inputs), four stages, linear head."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 64,
        stem_stride: int = 1,
        activation: str = "softplus",
        beta: float = 1.0,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}.")
        if len(mean) != in_chans:
            raise ValueError(f"mean/std need {in_chans} values (one per input channel), got {len(mean)}.")
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation(activation, beta)
        stages = []
        in_planes = width
        for index, num_blocks in enumerate(blocks_per_stage):
            planes = width * 2**index
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, activation, beta))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(self.normalize(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet18(
    num_classes: int = 10,
    image_size: int = 32,
    in_chans: int = 3,
    width: int = 64,
    activation: str = "softplus",
    beta: float = 1.0,
    stem_stride: int | None = None,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> ResNet:
    """Softplus ResNet-18 for 32x32 (CIFAR stem) or 64x64 inputs (stride-2 stem, tiny-ImageNet).

    Args:
        num_classes: number of output classes.
        image_size: input height/width; picks the stem stride (1 up to 32 pixels, 2 above) unless `stem_stride`
            is given.
        in_chans: input channels.
        width: channels of the first stage (64 in the standard ResNet-18); the stages use 1x, 2x, 4x, 8x.
        activation: `softplus` (the paper's) or `relu`.
        beta: softplus sharpness (`nn.Softplus(beta)`); larger is closer to ReLU.
        stem_stride: override of the stem stride.
        mean, std: per-channel statistics of the [0, 1] training images, applied by the first layer.
    """
    if stem_stride is None:
        stem_stride = 1 if image_size <= 32 else 2
    return ResNet(
        (2, 2, 2, 2),
        num_classes=num_classes,
        in_chans=in_chans,
        width=width,
        stem_stride=stem_stride,
        activation=activation,
        beta=beta,
        mean=mean,
        std=std,
    )
