"""Standard intensity augmentation, batched: what every method gets, GIN or not.

nnU-Net's intensity transforms (multiplicative brightness, contrast, Gaussian noise, gamma), which
Ouyang et al.'s baseline also used, drawn per sample from a ``torch.Generator`` so a run is
repeatable. Written for the z-scored slices the trainer sees (body mean 0, sd 1).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RandomIntensity"]


class RandomIntensity(nn.Module):
    """Random brightness, contrast, noise and gamma per sample; no trainable parameters.

    For each sample ``x`` (``C x H x W[ x D]``), each with its own probability:
    brightness ``x * U(brightness)``; contrast ``(x - mean) * U(contrast) + mean``; Gaussian noise
    of sd ``sqrt(U(0, noise_variance))``; gamma ``((x - min) / (max - min)) ** U(gamma) * (max - min)
    + min`` (the sample's own range, so any input range works). Defaults are nnU-Net's.

    Args:
        p_brightness, p_contrast, p_noise, p_gamma: per-sample probabilities in [0, 1].
        brightness, contrast, gamma: ``(low, high)`` ranges of the factors.
        noise_variance: upper bound of the noise variance (input units squared).

    Output: same shape, dtype and device as the input, no autograd graph; the input is not modified.
    """

    def __init__(self, p_brightness: float = 0.15, brightness: tuple[float, float] = (0.75, 1.25),
                 p_contrast: float = 0.15, contrast: tuple[float, float] = (0.75, 1.25),
                 p_noise: float = 0.1, noise_variance: float = 0.1,
                 p_gamma: float = 0.3, gamma: tuple[float, float] = (0.7, 1.5)) -> None:
        super().__init__()
        for name, p in (("p_brightness", p_brightness), ("p_contrast", p_contrast), ("p_noise", p_noise),
                        ("p_gamma", p_gamma)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.p = (float(p_brightness), float(p_contrast), float(p_noise), float(p_gamma))
        self.brightness, self.contrast, self.gamma = tuple(brightness), tuple(contrast), tuple(gamma)
        self.noise_variance = float(noise_variance)

    def extra_repr(self) -> str:
        return (f"p={self.p}, brightness={self.brightness}, contrast={self.contrast}, "
                f"noise_variance={self.noise_variance}, gamma={self.gamma}")

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x.shape[0]
        view = (b,) + (1,) * (x.ndim - 1)
        dims = tuple(range(1, x.ndim))
        # all draws on the CPU generator first, so results do not depend on the device
        coins = torch.rand(b, 4, generator=generator)
        factors = torch.rand(b, 4, generator=generator)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        dev = x.device
        coins, factors, noise = coins.to(dev), factors.to(dev), noise.to(dev)
        p = torch.tensor(self.p, device=dev)
        use = coins < p  # B x 4

        def uniform(column: int, low: float, high: float) -> torch.Tensor:
            return (low + factors[:, column] * (high - low)).view(view)

        y = x.float()
        scale = torch.where(use[:, 0].view(view), uniform(0, *self.brightness), torch.ones(view, device=dev))
        y = y * scale
        mean = y.mean(dim=dims, keepdim=True)
        c = torch.where(use[:, 1].view(view), uniform(1, *self.contrast), torch.ones(view, device=dev))
        y = (y - mean) * c + mean
        sd = (factors[:, 2] * self.noise_variance).sqrt().view(view) * use[:, 2].view(view)
        y = y + noise * sd
        lo, hi = y.amin(dim=dims, keepdim=True), y.amax(dim=dims, keepdim=True)
        span = (hi - lo).clamp_min(1e-6)
        g = torch.where(use[:, 3].view(view), uniform(3, *self.gamma), torch.ones(view, device=dev))
        y = ((y - lo) / span).clamp(0, 1).pow(g) * span + lo
        return y.to(x.dtype)
