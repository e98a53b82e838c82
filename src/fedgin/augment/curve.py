"""Random intensity curves: each sample's intensities remapped through a random cubic Bezier curve.

A global, per-sample, spatially uniform remapping of the grey levels, after the style augmentation
of Zhou et al. (CVPR 2022, "Generalizable cross-modality medical image segmentation via style
augmentation and dual normalization"), whose curves turn CT into images with other, also
non-monotonic, contrasts between the organs. It complements GIN, whose random networks change
contrast and local texture but mix their output with the input: a curve can swap which of two
organs is brighter outright (on T2 MRI the spleen is brighter than the liver, on CT it is not).

Here the darkest grey level stays the darkest (air and the background are dark on CT and on MRI);
half of the curves also keep the brightest at the top (monotone-looking, ``P3 = (1, 1)``), the
other half end anywhere (``P3 = (1, U(0, 1))``), so bright structures can become dark.
"""

from __future__ import annotations

import torch
from torch import nn

from .gin import _compute_dtype

__all__ = ["RandomCurve"]


class RandomCurve(nn.Module):
    """Random Bezier intensity curves, batched; no trainable parameters.

    For each sample ``x`` (``C x H x W[ x D]``; the channels of a 2.5D stack share the curve):
    ``u = (x - min) / (max - min)`` over the sample; a cubic Bezier curve with ``P0 = (0, 0)``,
    ``P1, P2 ~ U(0, 1)^2`` and ``P3 = (1, 1)`` (probability ``1 - p_free_end``) or
    ``P3 = (1, U(0, 1))`` maps ``u`` to ``v = y(u)`` (the curve's ``x(t)`` is non-decreasing for
    control points in the unit square, so ``y`` is a function of ``u``; it is evaluated at
    ``points`` values of ``t``, tabulated at ``table`` evenly spaced ``u`` and interpolated
    linearly); ``v`` is then given the sample's mean
    and standard deviation, so the trainer's intensity scale is kept. A sample is remapped with
    probability ``p`` and returned unchanged otherwise; a constant sample is returned unchanged.

    Args:
        p: probability that a sample is remapped, in [0, 1].
        p_free_end: probability that a remapped sample's curve ends anywhere rather than at the top.
        points: samples of ``t`` on the curve (at least 2).
        table: entries of each curve's lookup table over [0, 1] (at least 2).
        eps: floor of the ranges and standard deviations.

    Output: same shape, dtype and device as the input, no autograd graph; the input is not
    modified. With a ``generator`` the result is exactly reproducible.
    """

    def __init__(self, p: float = 0.5, p_free_end: float = 0.5, points: int = 65, table: int = 256,
                 eps: float = 1e-6) -> None:
        super().__init__()
        for name, value in (("p", p), ("p_free_end", p_free_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if points < 2 or table < 2:
            raise ValueError(f"points and table must be >= 2, got {points}, {table}")
        self.p, self.p_free_end, self.eps = float(p), float(p_free_end), float(eps)
        self.points, self.table = int(points), int(table)

    def extra_repr(self) -> str:
        return f"p={self.p}, p_free_end={self.p_free_end}, points={self.points}, table={self.table}"

    def draw(self, batch_size: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The random parameters of one call: ``selected`` (B, bool), ``control`` (B x 4: P1x, P1y,
        P2x, P2y) and ``end`` (B, P3's y), drawn on the generator's device and moved to ``device``."""
        device = torch.device("cpu") if device is None else torch.device(device)
        source = generator.device if generator is not None else device
        u = torch.rand(batch_size, 6, generator=generator, device=source).to(device)
        free = u[:, 4] < self.p_free_end
        return {"selected": u[:, 5] < self.p, "control": u[:, :4],
                "end": torch.where(free, torch.rand(batch_size, generator=generator, device=source).to(device),
                                   torch.ones(batch_size, device=device))}

    def curves(self, control: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled curves: ``xs, ys`` (B x points), ``xs`` non-decreasing from 0 to 1."""
        t = torch.linspace(0.0, 1.0, self.points, device=control.device, dtype=control.dtype)
        b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        xs = control[:, :1] * b1 + control[:, 2:3] * b2 + b3
        ys = control[:, 1:2] * b1 + control[:, 3:4] * b2 + end[:, None] * b3
        # rounding can make xs dip by an ulp; the search needs it sorted
        return torch.cummax(xs, dim=1).values, ys

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"expected B x C x spatial..., got shape {tuple(x.shape)}")
        batch = x.shape[0]
        params = self.draw(batch, generator=generator, device=x.device)
        if not bool(params["selected"].any()):
            return x.clone()
        compute = _compute_dtype(x.dtype)
        chosen = params["selected"].nonzero().squeeze(1)
        flat = x.reshape(batch, -1).to(compute)
        part = flat[chosen]
        lo, hi = part.amin(1, keepdim=True), part.amax(1, keepdim=True)
        span = hi - lo
        u = ((part - lo) / span.clamp_min(self.eps)).clamp(0.0, 1.0)
        # each curve as a table of y at evenly spaced u (linear between its sampled points), then
        # each voxel read from its sample's table: a gather per voxel instead of a search
        xs, ys = self.curves(params["control"][chosen].to(compute), params["end"][chosen].to(compute))
        grid = torch.linspace(0.0, 1.0, self.table, device=x.device, dtype=compute).expand(len(chosen), -1)
        right = torch.searchsorted(xs.contiguous(), grid.contiguous()).clamp(1, self.points - 1)
        x0, x1 = xs.gather(1, right - 1), xs.gather(1, right)
        y0, y1 = ys.gather(1, right - 1), ys.gather(1, right)
        table = y0 + ((grid - x0) / (x1 - x0).clamp_min(self.eps)).clamp(0.0, 1.0) * (y1 - y0)
        pos = u * (self.table - 1)
        left = pos.floor().clamp(0, self.table - 2)
        index = left.long()
        t0, t1 = table.gather(1, index), table.gather(1, index + 1)
        v = t0 + (pos - left) * (t1 - t0)
        mean, sd = part.mean(1, keepdim=True), part.std(1, keepdim=True)
        v_sd = v.std(1, keepdim=True)
        mapped = (v - v.mean(1, keepdim=True)) / v_sd.clamp_min(self.eps) * sd + mean
        keep = (span <= self.eps) | (v_sd <= self.eps)  # a constant sample or a flat curve: unchanged
        out = flat.clone()
        out[chosen] = torch.where(keep, part, mapped)
        return out.reshape(x.shape).to(x.dtype)
