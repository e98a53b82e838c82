"""Where a case's body is, for post-processing's side-of-body rule (``fedgin.engine.postprocess``):
the world RAS x of the body's centroid, computed on the input grid without a full-size copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BodySide:
    """What the side rule needs of a case: its voxel-to-RAS ``affine`` and the world RAS x (mm) of
    its body's centroid, ``midline_x``."""

    affine: tuple[tuple[float, ...], ...]
    midline_x: float

    def lateral_mm(self, voxel_centroids: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of voxel points (``N x 3``) right of the midline (< 0: left)."""
        row = np.asarray(self.affine, dtype=np.float64)[0]
        return voxel_centroids @ row[:3] + row[3] - self.midline_x


def body_side(image: np.ndarray, affine: np.ndarray, modality: str, *, slab: int = 32) -> BodySide:
    """The :class:`BodySide` of an image on its input grid (``X x Y x Z``): its body is CT above
    -500 HU, MRI above 5% of its 0.5-99.5 percentile range (percentiles of a strided sample), and
    the midline the body's centroid. The mask is built a slab of the last axis at a time, so a
    clinical CT costs no full-size copy."""
    image = np.asarray(image)
    if modality == "CT":
        threshold = -500.0
    else:
        sample = image.reshape(-1)[:: max(1, image.size // 2_000_000)]
        lo, hi = np.percentile(sample, (0.5, 99.5))
        threshold = lo + 0.05 * (hi - lo)
    sums, count = np.zeros(3), 0
    grids = [np.arange(n, dtype=np.float64) for n in image.shape]
    for z0 in range(0, image.shape[2], slab):
        mask = image[:, :, z0:z0 + slab] > threshold
        n = int(mask.sum())
        if not n:
            continue
        count += n
        sums[0] += (mask.sum(axis=(1, 2)) * grids[0]).sum()
        sums[1] += (mask.sum(axis=(0, 2)) * grids[1]).sum()
        sums[2] += (mask.sum(axis=(0, 1)) * grids[2][z0:z0 + slab]).sum()
    centre = sums / count if count else (np.asarray(image.shape, dtype=np.float64) - 1) / 2
    affine = np.asarray(affine, dtype=np.float64)
    return BodySide(tuple(tuple(float(v) for v in r) for r in affine), float(affine[0, :3] @ centre + affine[0, 3]))
