"""Global Intensity Non-linear augmentation (GIN; Ouyang et al., TMI 2022, arXiv 2111.12525).

Every call passes each sample through its own freshly drawn, never trained, shallow convolutional
network, mixes the result with the input and restores the input's Frobenius norm. The network
changes intensities and local texture but, having a receptive field of a few voxels, keeps the
shape of the anatomy, so a segmentation model learns shape rather than one modality's contrast.

All per-sample networks of a batch run as one grouped convolution per layer (``groups = B``).
Kernel sizes are drawn per layer *and per sample*: a sample's ``k x k`` kernel is embedded, zero
outside its centre, in the largest size drawn for that layer in the batch, which computes exactly
the ``k x k`` convolution with ``k // 2`` zero padding while keeping one convolution per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GIN", "GINDraw"]


@dataclass(frozen=True)
class GINDraw:
    """The random parameters of one :class:`GIN` call, for a batch of ``B`` samples.

    Attributes:
        weights: one tensor per layer, ``B x C_out x C_in x K[ x K]x K``, where ``K`` is the
            largest kernel size drawn for that layer in the batch; sample ``b``'s kernel is the
            centred ``k x k`` block (``k = kernel_sizes[layer, b]``), zero outside it.
        biases: one tensor per layer, ``B x C_out``.
        kernel_sizes: ``layers x B`` (int64), the kernel size each sample uses at each layer.
        alpha: ``B``, the weight of the network's output in the mix, in ``alpha_range``.
        selected: ``B`` (bool), which samples are augmented (probability ``p``); the others are
            returned unchanged.
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]
    kernel_sizes: torch.Tensor
    alpha: torch.Tensor
    selected: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision (CPU convolutions and norms need it), else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class GIN(nn.Module):
    """Global Intensity Non-linear augmentation, batched; no trainable parameters.

    For each sample ``x`` (``C x H x W[ x D]``) of a batch, with fresh random draws on every call:
    ``g = conv_L(f(... f(conv_1(x))))``, ``f`` a LeakyReLU, channels
    ``C -> hidden_channels -> ... -> hidden_channels -> C``, weights and biases from a standard
    normal, each layer's kernel size drawn uniformly from ``kernel_sizes`` (stride 1, zero
    padding, so the size is kept); then ``y = alpha * g + (1 - alpha) * x`` with
    ``alpha ~ U(alpha_range)``, rescaled so that ``||y||_F = ||x||_F`` (norm over ``C, H, W[, D]``).
    A sample is augmented with probability ``p`` and returned unchanged otherwise.

    Args:
        spatial_dims: 2 (input ``B x C x H x W``) or 3 (``B x C x H x W x D``).
        layers: number of convolutions (at least 1).
        hidden_channels: channels between convolutions.
        kernel_sizes: odd kernel sizes to draw from, per layer and per sample.
        p: probability that a sample is augmented, in [0, 1].
        alpha_range: ``(low, high)`` within [0, 1] for ``alpha``; ``(0, 0)`` is the identity.
        negative_slope: slope of the LeakyReLU for negative inputs.
        eps: floor of the output norm in the rescaling (a zero input stays zero).

    The input is never modified and no autograd graph is built (``requires_grad`` is False on
    the output). Output: same shape, dtype and device as the input; half-precision inputs are
    computed in float32 and cast back. The channel count ``C`` is read from the input.

    Example::

        gin = GIN(spatial_dims=2)
        images = gin(images)  # training batches only; labels are not touched
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        layers: int = 4,
        hidden_channels: int = 2,
        kernel_sizes: Sequence[int] = (1, 3),
        p: float = 1.0,
        alpha_range: tuple[float, float] = (0.0, 1.0),
        negative_slope: float = 0.01,
        eps: float = 1e-8,
        stack: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if layers < 1 or hidden_channels < 1:
            raise ValueError(
                f"layers and hidden_channels must be >= 1, got {layers}, {hidden_channels}"
            )
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be non-empty and odd, got {kernel_sizes}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        low, high = (float(a) for a in alpha_range)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"alpha_range must satisfy 0 <= low <= high <= 1, got {alpha_range}")
        self.spatial_dims = spatial_dims
        self.layers = layers
        self.hidden_channels = hidden_channels
        self.kernel_sizes = kernel_sizes
        self.p = float(p)
        self.alpha_range = (low, high)
        self.negative_slope = float(negative_slope)
        self.eps = float(eps)
        # 2.5D: a sample's channels are neighbouring slices of one image; one single-channel
        # network is drawn per sample and applied to every slice (the same contrast throughout
        # the stack), and the mix keeps the norm of the whole stack
        self.stack = bool(stack)
        # taps used by each kernel size, embedded in the largest: those within k // 2 of the
        # centre (Chebyshev distance); shape options x K[ x K] x K
        kmax = max(kernel_sizes)
        offset = (torch.arange(kmax) - kmax // 2).abs()
        ring = torch.stack(torch.meshgrid([offset] * spatial_dims, indexing="ij")).amax(0)
        self._sizes = torch.tensor(kernel_sizes)
        self._taps = torch.stack([(ring <= k // 2).float() for k in kernel_sizes])

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, layers={self.layers}, "
            f"hidden_channels={self.hidden_channels}, kernel_sizes={self.kernel_sizes}, "
            f"p={self.p}, alpha_range={self.alpha_range}, negative_slope={self.negative_slope}"
        )

    def channel_plan(self, channels: int) -> list[tuple[int, int]]:
        """``(C_in, C_out)`` of each layer for an input with ``channels`` channels."""
        sizes = [channels] + [self.hidden_channels] * (self.layers - 1) + [channels]
        return list(zip(sizes[:-1], sizes[1:]))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise if ``x`` is not a floating ``B x C x H x W[ x D]`` tensor."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self).__name__} with spatial_dims={self.spatial_dims} expects a "
                f"B x C x spatial tensor ({self.spatial_dims + 2} dims), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point tensor, got {x.dtype}")

    def draw(
        self,
        batch_size: int,
        channels: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> GINDraw:
        """Draw the parameters of one call for ``batch_size`` samples of ``channels`` channels.

        Random numbers come from ``generator`` on its own device (the global RNG of ``device``
        when None) and are then moved to ``device``, so a CPU generator reproduces the same draws
        for a CUDA input. Weights are float32.
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        source = generator.device if generator is not None else device
        plan = self.channel_plan(channels)
        kmax, n = self._taps.shape[-1], self.spatial_dims
        # three bulk draws in a fixed order instead of one per layer: fewer calls and transfers
        choice = torch.randint(
            len(self.kernel_sizes), (self.layers, batch_size), generator=generator, device=source
        ).cpu()
        weight_sizes = [batch_size * co * ci * kmax**n for ci, co in plan]
        bias_sizes = [batch_size * co for _, co in plan]
        normal = torch.randn(
            sum(weight_sizes) + sum(bias_sizes), generator=generator, device=source
        ).to(device)
        uniform = torch.rand(2, batch_size, generator=generator, device=source).to(device)

        kernel_sizes = self._sizes[choice]
        layer_sizes = kernel_sizes.amax(1).tolist()
        taps = self._taps[choice].to(device)  # layers x B x K[ x K] x K
        chunks = normal.split(weight_sizes + bias_sizes)
        weights, biases = [], []
        for layer, (ci, co) in enumerate(plan):
            w = chunks[layer].view(batch_size, co, ci, *([kmax] * n))
            w = w * taps[layer].view(batch_size, 1, 1, *([kmax] * n))
            # crop to the largest size used at this layer so a batch of 1x1 kernels stays 1x1
            lo = kmax // 2 - layer_sizes[layer] // 2
            crop = (slice(None),) * 3 + (slice(lo, lo + layer_sizes[layer]),) * n
            weights.append(w[crop].contiguous())
            biases.append(chunks[len(plan) + layer].view(batch_size, co))

        low, high = self.alpha_range
        alpha = low + (high - low) * uniform[0]
        selected = uniform[1] < self.p
        return GINDraw(tuple(weights), tuple(biases), kernel_sizes.to(device), alpha, selected)

    def network(self, x: torch.Tensor, draw: GINDraw) -> torch.Tensor:
        """The drawn networks applied to ``x`` (``B x C x H x W[ x D]``), one per sample, as one
        grouped convolution per layer. Returns ``B x C x H x W[ x D]`` in ``x``'s dtype. A draw
        for one channel applied to ``C > 1`` channels (``stack``) runs each sample's network on
        each of its channels alone."""
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        layout = torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d
        batch, spatial = x.shape[0], x.shape[2:]
        channels, drawn_for = x.shape[1], draw.weights[0].shape[2]
        if drawn_for == 1 and channels > 1:  # the slices of a stack share their sample's network
            per_slice = GINDraw(tuple(w.repeat_interleave(channels, 0) for w in draw.weights),
                                tuple(b.repeat_interleave(channels, 0) for b in draw.biases),
                                draw.kernel_sizes.repeat_interleave(channels, 1),
                                draw.alpha.repeat_interleave(channels), draw.selected.repeat_interleave(channels))
            return self.network(x.reshape(batch * channels, 1, *spatial), per_slice).reshape(x.shape)
        # channels-last: oneDNN's grouped convolution is ~3-4x faster on CPU with few channels
        h = x.reshape(1, -1, *spatial).contiguous(memory_format=layout)
        for layer, (w, b) in enumerate(zip(draw.weights, draw.biases)):
            w = w.to(x.dtype)
            h = conv(
                h,
                w.reshape(-1, *w.shape[2:]),
                b.to(x.dtype).reshape(-1),
                padding=w.shape[-1] // 2,
                groups=batch,
            )
            if layer < len(draw.weights) - 1:
                h = F.leaky_relu(h, self.negative_slope, inplace=True)
        return h.contiguous().reshape(batch, -1, *spatial)

    def apply(self, x: torch.Tensor, draw: GINDraw) -> torch.Tensor:
        """Augment ``x`` (``B x C x H x W[ x D]``) with the parameters ``draw``; see the class
        docstring. Returns a new tensor of ``x``'s shape, dtype and device."""
        self.check_input(x)
        with torch.no_grad():
            work = x.to(_compute_dtype(x.dtype))
            # alpha = 0 returns the input exactly (lerp is exact there and the norm ratio is 1),
            # so unselected samples need no separate pass
            alpha = torch.where(draw.selected, draw.alpha, 0.0).to(work.dtype)
            expand = (-1,) + (1,) * (x.ndim - 1)
            mixed = torch.lerp(work, self.network(work, draw), alpha.view(expand))
            norm_in = work.flatten(1).norm(dim=1)
            norm_out = mixed.flatten(1).norm(dim=1)
            scale = norm_in / norm_out.clamp_min(self.eps)
            return (mixed * scale.view(expand)).to(x.dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``x`` (``B x C x H x W[ x D]``) with fresh networks, one per sample.

        With a ``generator`` the result is exactly reproducible for the same seed and input
        shape. Returns a new tensor of ``x``'s shape, dtype and device, without autograd graph.
        """
        self.check_input(x)
        return self.apply(x, self.draw(x.shape[0], 1 if self.stack else x.shape[1], generator, x.device))
