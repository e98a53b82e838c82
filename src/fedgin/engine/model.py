"""The segmentation network: a MONAI U-Net, multi-class (background + the scheme's organs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.nets import UNet


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the U-Net; it travels inside every checkpoint.

    ``channels`` are the feature maps per level (the paper's 2D U-Net: 32-64-128-256); the
    ``quick`` preset halves them for 2 CPU cores. ``norm`` is ``"instance"`` (default: affine
    instance norm, as nnU-Net; per-image statistics, so GIN's wildly varying training intensities
    leave no running statistics that mismatch clean test images) or ``"batch"``. FedBN keeps the
    normalisation layers' parameters local either way.
    """

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 6
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    norm: str = "instance"
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        data["channels"] = tuple(data["channels"])
        data["strides"] = tuple(data["strides"])
        return cls(**data)


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """A MONAI ``UNet``: input ``B x in_channels x H x W[ x D]``, output logits
    ``B x out_channels x H x W[ x D]``; H and W must be divisible by ``2 ** len(strides)``."""
    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
        norm=(cfg.norm, {"affine": True}) if cfg.norm == "instance" else cfg.norm,
        dropout=cfg.dropout,
    )
