"""Random field-of-view windows: a training slice as a scan with a tight field of view shows it.

Preprocessing keeps the body's whole plane (:mod:`fedgin.data.preprocess`), so a model trained on
the bundle's scans only ever sees fields that hold the whole abdomen with air around it. Clinical
scans are often cut tighter (a reconstruction field of 180 mm around the liver, an MRI field that
ends inside the body); such a scan reaches the model as a window of tissue surrounded by the
padding's air, with every organ cut at the window's edge, and its intensities z-scored over the
window's body only. A model that never saw that misses organs it finds in the whole scan
(``benchmarks/cropped_fov.py``: 0.916 to 0.740 mean Dice on the same voxels).

:class:`RandomField` makes that view during training. With probability ``p`` a sample keeps an
axis-aligned window of its crop, each side drawn uniformly between ``min_size`` voxels and the
crop's size, placed uniformly in the crop; what lies outside becomes air (the plane's lowest value,
which preprocessing gives air and padding) and background in the label; then the window is
z-scored again over its own body voxels, as preprocessing a scan of that field would do (CT: above
air; MRI: above 5% of the plane's range, :data:`fedgin.data.preprocess.BODY_THRESHOLD`). A 2.5D
stack gets one window and one rescaling for all its slices. It works on the numpy slices
:meth:`fedgin.engine.sampling.SliceIndex.read` cuts, before the spatial and intensity
augmentations and GIN, so every method sees the same fields.
"""

from __future__ import annotations

import numpy as np

from ..data.preprocess import BODY_THRESHOLD

#: fewer body voxels than this in a window: its intensities are left as they are (no statistics)
MIN_BODY_VOXELS = 64


class RandomField:
    """Random field-of-view windows (module docstring); ``min_size`` is ``(rows, cols)`` in voxels."""

    def __init__(self, p: float, min_size: tuple[int, int]):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if any(m < 1 for m in min_size):
            raise ValueError(f"min_size must be positive, got {min_size}")
        self.p, self.min_size = p, tuple(int(m) for m in min_size)

    def window(self, shape: tuple[int, int], rng: np.random.Generator) -> tuple[slice, slice]:
        """A window of a ``shape`` crop: each side uniform in ``[min(min_size, n), n]``, placed
        uniformly."""
        out = []
        for n, m in zip(shape, self.min_size):
            size = int(rng.integers(min(m, n), n + 1))
            start = int(rng.integers(0, n - size + 1))
            out.append(slice(start, start + size))
        return tuple(out)

    def __call__(self, image: np.ndarray, label: np.ndarray, modality: str, rng: np.random.Generator,
                 air: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``image`` ``H x W`` or ``K x H x W`` (a 2.5D stack), ``label`` ``H x W``; returns them
        through a window with probability ``p`` (new arrays), else the inputs themselves. ``air``:
        the value of air in this volume (default: the image's lowest value)."""
        if self.p <= 0 or rng.random() >= self.p:
            return image, label
        rows, cols = self.window(label.shape, rng)
        air = float(image.min()) if air is None else float(air)
        inside = image[..., rows, cols]
        floor = air if modality == "CT" else air + BODY_THRESHOLD["MRI"] * (float(inside.max()) - air)
        body = inside[inside > floor]
        scaled = inside
        if body.size >= MIN_BODY_VOXELS:
            mean, sd = float(body.mean()), max(float(body.std()), 1e-3)
            scaled = (inside - mean) / sd
            air = (air - mean) / sd
        out_image = np.full_like(image, air)
        out_image[..., rows, cols] = scaled
        out_label = np.zeros_like(label)
        out_label[rows, cols] = label[rows, cols]
        return out_image, out_label
