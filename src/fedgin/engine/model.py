"""The segmentation network: a MONAI U-Net, multi-class (background + the scheme's organs)."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from ..config import ModelConfig

__all__ = ["ModelConfig", "build_model"]


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
