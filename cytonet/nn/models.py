"""Encoders for single-channel histology patches: ResNet-50/101 (cluster) and a small ResNet (CPU demo).

No Dask, no Snakemake, no data loading here: a model is built from a name and a few sizes, so the
checkpoint's config is enough to rebuild it (inference imports only this module).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models.resnet import BasicBlock

ENCODERS = ("small", "resnet50", "resnet101")
# Fixed intensity normalisation of uint8 stain images; per-patch standardisation would erase the
# cell-density signal that separates areas, so one global affine map is used.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def normalize_uint8(patches: torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W] or [N,1,H,W] -> float32 [N,1,H,W], roughly zero-mean unit-variance."""
    x = patches.float() / 255.0 if patches.dtype == torch.uint8 else patches.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return (x - PIXEL_MEAN) / PIXEL_STD


class SmallResNet(nn.Module):
    """A 4-stage ResNet of BasicBlocks with narrow widths: fast on CPU at 32-128 px."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), blocks: tuple[int, ...] = (1, 1, 1, 1)) -> None:
        super().__init__()
        # Stride-4 stem as in torchvision's ResNets: the stages then run at 1/4 resolution, which is what makes
        # 64-128 px patches cheap on CPU (a stride-2 stem costs ~4x the MACs for little gain on textures).
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        layers: list[nn.Module] = []
        inplanes = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            for j in range(n):
                down = None
                if (j == 0) and (stride != 1 or inplanes != w):
                    down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(inplanes, w, stride=stride if j == 0 else 1, downsample=down))
                inplanes = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


def _torchvision_backbone(name: str) -> tuple[nn.Module, int]:
    """torchvision ResNet-50/101 without weights (nothing can be downloaded), 1 input channel, no fc."""
    net = {"resnet50": resnet50, "resnet101": resnet101}[name](weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class Encoder(nn.Module):
    """Backbone (features) + MLP projection head (embedding used only by the contrastive loss)."""

    def __init__(self, name: str, embedding_dim: int = 128, proj_hidden: int | None = None) -> None:
        super().__init__()
        if name == "small":
            self.backbone: nn.Module = SmallResNet()
            self.feature_dim = self.backbone.out_dim
        elif name in ("resnet50", "resnet101"):
            self.backbone, self.feature_dim = _torchvision_backbone(name)
        else:
            raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
        hidden = proj_hidden or self.feature_dim
        self.head = nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, embedding_dim))
        self.name, self.embedding_dim, self.proj_hidden = name, embedding_dim, hidden

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features [N, feature_dim] (what finetuning and UMAPs use)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projected embedding [N, embedding_dim] (not normalised; the loss normalises)."""
        return self.head(self.backbone(x))

    def spec(self) -> dict[str, Any]:
        """What build_encoder needs to rebuild this model."""
        return {"encoder": self.name, "embedding_dim": self.embedding_dim, "proj_hidden": self.proj_hidden}


def build_encoder(name: str, embedding_dim: int = 128, proj_hidden: int | None = None) -> Encoder:
    """Build an encoder by name ("small", "resnet50", "resnet101") with a projection head to embedding_dim."""
    return Encoder(name, embedding_dim=embedding_dim, proj_hidden=proj_hidden)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to device; channels-last on GPU, where cuDNN's NHWC convolutions are faster (no gain on CPU)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device in the memory format prepare_model chose."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when precision is "auto" or "bf16"; fp32 otherwise (CPU bf16 is slow and inexact)."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    return contextlib.nullcontext()
