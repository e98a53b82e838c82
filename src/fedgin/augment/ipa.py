"""Interventional pseudo-correlation augmentation (IPA; Ouyang et al., TMI 2022, arXiv 2111.12525).

Two independent GIN draws of the same image are blended through a smooth random mask. The mask
makes the appearance of a region vary independently of its neighbours, which breaks spurious
correlations between an organ's shape and the intensities around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gin import GIN, _compute_dtype

__all__ = ["IPA"]


class IPA(nn.Module):
    """Blend of two GIN draws through a smooth random mask, batched; no trainable parameters.

    For each sample ``x`` (``C x H x W[ x D]``): ``g1, g2`` are two independent draws of ``gin``,
    ``m`` a mask in [0, 1] (``1 x H x W[ x D]``, shared by the channels) made by upsampling a
    ``grid_size ** spatial_dims`` grid of ``U(0, 1)`` control points to the image size (bicubic in
    2D, trilinear in 3D, clamped to [0, 1]); ``y = m * g1 + (1 - m) * g2``, rescaled so that
    ``||y||_F = ||x||_F``. A sample is augmented with probability ``p`` and returned unchanged
    otherwise. Off in training unless the trainer enables it.

    Args:
        spatial_dims: 2 (input ``B x C x H x W``) or 3 (``B x C x H x W x D``).
        grid_size: control points per spatial axis (at least 2); more points, finer blobs.
        p: probability that a sample is augmented, in [0, 1].
        gin: the GIN drawn twice; ``GIN(spatial_dims)`` when None. Its own ``p`` still applies
            to each draw.
        eps: floor of the blend's norm in the rescaling.

    Output: same shape, dtype and device as the input, no autograd graph; the input is not
    modified. With a ``generator`` the result is exactly reproducible.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        grid_size: int = 4,
        p: float = 1.0,
        gin: GIN | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        gin = GIN(spatial_dims=spatial_dims) if gin is None else gin
        if gin.spatial_dims != spatial_dims:
            raise ValueError(f"gin has spatial_dims={gin.spatial_dims}, IPA has {spatial_dims}")
        if grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {grid_size}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.spatial_dims = spatial_dims
        self.grid_size = int(grid_size)
        self.p = float(p)
        self.gin = gin
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, grid_size={self.grid_size}, p={self.p}"

    def mask(
        self,
        batch_size: int,
        spatial_shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Smooth random masks, ``B x 1 x H x W[ x D]`` float32 in [0, 1], drawn on the
        generator's device (the global RNG of ``device`` when None) and moved to ``device``."""
        device = torch.device("cpu") if device is None else torch.device(device)
        source = generator.device if generator is not None else device
        grid = (batch_size, 1) + (self.grid_size,) * self.spatial_dims
        control = torch.rand(grid, generator=generator, device=source).to(device)
        mode = "bicubic" if self.spatial_dims == 2 else "trilinear"
        # bicubic overshoots [0, 1] slightly between control points
        smooth = F.interpolate(control, size=tuple(spatial_shape), mode=mode, align_corners=True)
        return smooth.clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``x`` (``B x C x H x W[ x D]``); returns a new tensor of the same shape, dtype
        and device."""
        self.gin.check_input(x)
        batch, channels, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        with torch.no_grad():
            work = x.to(_compute_dtype(x.dtype))
            drawn = 1 if self.gin.stack else channels  # 2.5D: one network per sample for its slices
            first = self.gin.apply(work, self.gin.draw(batch, drawn, generator, x.device))
            second = self.gin.apply(work, self.gin.draw(batch, drawn, generator, x.device))
            mask = self.mask(batch, spatial, generator, x.device).to(work.dtype)
            source = generator.device if generator is not None else x.device
            selected = torch.rand(batch, generator=generator, device=source).to(x.device) < self.p

            blend = torch.lerp(second, first, mask)
            norm_in = work.flatten(1).norm(dim=1)
            norm_out = blend.flatten(1).norm(dim=1)
            expand = (-1,) + (1,) * (x.ndim - 1)
            scale = (norm_in / norm_out.clamp_min(self.eps)).view(expand)
            out = torch.where(selected.view(expand), blend * scale, work)
            return out.to(x.dtype)
