"""The small copies of each case that the QA page shows: the scan and its label maps turned to the
closest RAS axes (flips and axis swaps only: each case keeps its own voxel grid), down-sampled to at
most :data:`MAX_VOXELS_PER_AXIS` voxels per axis and :func:`case_voxels` in all (the image by block
means, the labels by taking each block's centre voxel) and the image stored as uint8 codes.

How many voxels a case keeps depends on how many cases share the page, so that a page stays a few
tens of MB: :data:`MAX_VOXELS` (2^21) for pages of up to 32 cases, then :data:`PAGE_VOXELS` shared
out (50 cases: 1.3 M voxels each), never fewer than :data:`MIN_VOXELS` (2^19) per case.

CT codes map HU piecewise linearly (:data:`CT_CODES`): 3 HU per code between -200 and 400 HU,
where abdominal windows look, coarser steps for air and bone. MRI codes map linearly from the
volume's minimum to its 99.9th percentile (brighter voxels are clipped). The page turns codes back
into intensities and applies the window in the browser.

``qa.npz`` (next to ``qa.html``) holds them, so ``fedgin report`` can redraw the page: for case
``i`` of the page, ``c{i}_image`` (``Z x Y x X`` uint8 codes; the index grows towards the
patient's superior, anterior and right: RAS), ``c{i}_pred`` and ``c{i}_ref`` (label ids, same
shape; ``ref`` only where there is a reference), and ``c{i}_meta`` (a JSON string: case, dataset, modality, spacing in mm
per stored axis ``[z, y, x]``, and ``codes``/``values``, the breakpoints of the code -> intensity
map). It is written case by case while cases are scored, so memory stays bounded by one case.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import publish, temp_path
from ..data.nifti import spacing_of

MAX_VOXELS_PER_AXIS = 192
#: At most this many voxels per case (2^21, e.g. 128 x 128 x 128): some 0.5 MB on the page for a CT.
MAX_VOXELS = 2**21
#: The voxels a page's cases share (2^26): a page of up to 32 cases keeps :data:`MAX_VOXELS` per case.
PAGE_VOXELS = 2**26
#: ... and a case never fewer than these (2^19, e.g. 128 x 128 x 32): pages past 128 cases grow.
MIN_VOXELS = 2**19
#: CT: code -> HU breakpoints (piecewise linear; HU outside are clipped).
CT_CODES = ((0, 40, 240, 255), (-1024.0, -200.0, 400.0, 2000.0))
MRI_PERCENTILE = 99.9


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``volume`` with its axes flipped and swapped to the closest RAS axes (a view, no copy) and
    the voxel spacing (mm) along those axes."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = spacing_of(affine)
    ras_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        ras_spacing[int(target)] = spacing[axis]
    return nib.orientations.apply_orientation(volume, ornt), tuple(ras_spacing)


def case_voxels(cases: int | None = None) -> int:
    """How many voxels each case of a page of ``cases`` cases keeps (None: one case's page)."""
    if not cases or cases < 1:
        return MAX_VOXELS
    return int(min(MAX_VOXELS, max(MIN_VOXELS, PAGE_VOXELS // cases)))


def block_factors(shape: tuple[int, ...], spacing: tuple[float, float, float],
                  max_voxels: int = MAX_VOXELS) -> tuple[int, int, int]:
    """The down-sampling factor per axis: the smallest integers that bring each axis to
    :data:`MAX_VOXELS_PER_AXIS` voxels or fewer, then, while the case is over
    ``max_voxels``, one more on the axis whose down-sampled voxels are the finest (the last
    axis on ties), so the voxels stay as near cubic as the scan allows."""
    factors = [max(1, math.ceil(n / MAX_VOXELS_PER_AXIS)) for n in shape]

    def size() -> int:
        return math.prod(math.ceil(n / f) for n, f in zip(shape, factors))

    while size() > max_voxels:
        finest = min(range(3), key=lambda a: (spacing[a] * factors[a], -a))
        factors[finest] += 1
    return tuple(factors)


def block_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Means over ``factors``-sized blocks (the last, partial blocks average what they hold); one
    slab of blocks along the last axis at a time, so a large volume is not copied whole."""
    fx, fy, fz = factors
    nx, ny, nz = volume.shape
    out_shape = (math.ceil(nx / fx), math.ceil(ny / fy), math.ceil(nz / fz))
    out = np.empty(out_shape, dtype=np.float32)
    for k in range(out_shape[2]):
        slab = np.asarray(volume[:, :, k * fz:(k + 1) * fz], dtype=np.float32).mean(axis=2)
        px, py = out_shape[0] * fx - nx, out_shape[1] * fy - ny
        if px or py:
            slab = np.pad(slab, ((0, px), (0, py)), mode="edge")
        out[:, :, k] = slab.reshape(out_shape[0], fx, out_shape[1], fy).mean(axis=(1, 3))
    return out


def block_centres(labels: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """The centre voxel of each ``factors``-sized block (the grid :func:`block_mean` gives; a last,
    partial block takes its own last voxel where its centre is past the edge)."""
    index = [np.minimum(np.arange(math.ceil(n / f)) * f + f // 2, n - 1) for n, f in zip(labels.shape, factors)]
    return np.ascontiguousarray(labels[np.ix_(*index)], dtype=np.uint8)


def code_map(image: np.ndarray, modality: str) -> tuple[list[int], list[float]]:
    """The code -> intensity breakpoints of a (down-sampled) image."""
    if modality == "CT":
        return list(CT_CODES[0]), list(CT_CODES[1])
    low = float(image.min())
    high = float(np.percentile(image, MRI_PERCENTILE))
    return [0, 255], [low, high if high > low else low + 1.0]


def encode(image: np.ndarray, codes: list[int], values: list[float]) -> np.ndarray:
    """Intensities -> uint8 codes through the piecewise-linear map (clipped at both ends)."""
    return np.rint(np.interp(image, values, codes)).astype(np.uint8)


def _zyx(volume: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))


def case_view(image: np.ndarray, affine: np.ndarray, modality: str, pred: np.ndarray,
              reference: np.ndarray | None = None, max_voxels: int = MAX_VOXELS) -> tuple[dict[str, np.ndarray], dict]:
    """The page's arrays of one case (``image``, ``pred`` and maybe ``ref``, each ``Z x Y x X``, at
    most ``max_voxels``) and its meta (spacing per stored axis, code map); all volumes share the
    image's grid."""
    ras, spacing = to_ras(image, affine)
    factors = block_factors(ras.shape, spacing, max_voxels)
    small = block_mean(ras, factors)
    codes, values = code_map(small, modality)
    arrays = {"image": _zyx(encode(small, codes, values)),
              "pred": _zyx(block_centres(to_ras(pred, affine)[0], factors))}
    if reference is not None:
        arrays["ref"] = _zyx(block_centres(to_ras(reference, affine)[0], factors))
    meta = {"modality": modality, "codes": codes, "values": values,
            "spacing": [spacing[2] * factors[2], spacing[1] * factors[1], spacing[0] * factors[0]]}
    return arrays, meta


class ViewWriter:
    """``qa.npz`` written one case at a time (:meth:`add`), published by :meth:`close`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path, ".npz")
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_DEFLATED)
        self.count = 0

    def _put(self, key: str, array: np.ndarray) -> None:
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)

    def add(self, arrays: dict[str, np.ndarray], meta: dict) -> int:
        """Store one case's arrays and meta; returns its index."""
        index = self.count
        for name, array in arrays.items():
            self._put(f"c{index}_{name}", array)
        self._put(f"c{index}_meta", np.array(json.dumps(meta)))
        self.count += 1
        return index

    def close(self) -> Path:
        self._zip.close()
        return publish(self._tmp, self.path)

    def discard(self) -> None:
        self._zip.close()
        self._tmp.unlink(missing_ok=True)


def read_views(path: Path):
    """Yield ``(meta, arrays)`` of every case of a ``qa.npz``, in page order, one case in memory."""
    with np.load(path, allow_pickle=False) as npz:
        index = 0
        while f"c{index}_meta" in npz.files:
            meta = json.loads(str(npz[f"c{index}_meta"]))
            arrays = {name: npz[f"c{index}_{name}"] for name in ("image", "pred", "ref")
                      if f"c{index}_{name}" in npz.files}
            yield meta, arrays
            index += 1
