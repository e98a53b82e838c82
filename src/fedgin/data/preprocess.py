"""Preprocessing for 2D training, shared by every mode, and its exact inverse for predictions.

Steps (forward): reorient to RAS (axis permutation and flips only, no interpolation, so oblique
affines are kept exactly), resample in-plane to ``spacing_mm`` (slices are never resampled: MRI
slices of 5-8 mm would otherwise be invented), normalise intensity per modality, then cut every
axial slice to the body's bounding box (see below). The :class:`Geometry` record holds everything
needed to send a prediction back onto the input's own voxel grid.

Field of view: the plane kept is the in-plane bounding box of the body over all slices (CT above
-500 HU, MRI above 5% of its intensity range; rows holding fewer than 0.5% of the fullest row's
body voxels are noise, not body), widened by 10 mm, joined with the box of every labelled voxel,
and padded with air to at least ``slice_size``. Nothing of the patient is cropped away, whatever
the scanner's field of view, and a patient lying off-centre in a wide field gives the same plane
as when centred. Training cuts ``slice_size`` crops from it (:mod:`fedgin.engine.sampling`);
prediction covers all of it in overlapping tiles of ``slice_size`` (:mod:`fedgin.engine.inference`).
Labelled voxels outside the body box are counted (``Preprocessed.labels_outside_body``): a
prediction, which has no label to widen the box, never sees them, and ``fedgin data check`` warns.

Intensity choices (two steps):
- range: CT is clipped to the abdominal soft-tissue window [-125, 275] HU (W400/L75, as the
  SABS/BTCV and FedGIN pipelines use) and scaled to [0, 1]; fixed HU keeps the physical meaning of
  CT values. MRI has no physical unit, so per image: clip to the [0.5, 99.5] percentiles of the
  voxels above the image minimum (background air would otherwise dominate), then scale to [0, 1].
- ``intensity="zscore"`` (default): then z-score each volume over its body (CT: voxels above the
  window floor; MRI: above 5% of the percentile range), so the body has mean 0 and sd 1, as GIN
  expects (Ouyang et al. feed z-scored images; on [0, 1] input GIN's N(0, 1) biases dominate and a
  third of the draws come out washed out, ``benchmarks/gin_washout.py``). Air and padding become
  one negative value per volume. ``intensity="unit"`` stops after the first step (fedgin < 0.2
  checkpoints, which carry no ``intensity`` field, were trained so).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .nifti import spacing_of


INTENSITY_MODES = ("zscore", "unit")
# body masks on the [0, 1] range: CT above the window floor (air and lung sit at 0), MRI above 5%
# of the percentile range (background noise sits below)
BODY_THRESHOLD = {"CT": 0.0, "MRI": 0.05}
#: the field of view's body: CT above this (fat, skin and the table are in, air is out) ...
BODY_HU = -500.0
#: ... and a row of the plane is body when it holds this share of the fullest row's body voxels
BODY_ROW_FRACTION = 0.005
BODY_MARGIN_MM = 10.0


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of :func:`preprocess`; they travel in every checkpoint.

    ``spacing_mm`` is the in-plane (R-L, A-P) target spacing; ``slice_size`` the (H, W) in voxels
    of a training crop and of a prediction tile, a multiple of 16 for the U-Net (planes are padded
    to at least this); ``intensity`` ``"zscore"`` (body mean 0, sd 1) or ``"unit"`` ([0, 1]), see
    the module docstring.
    """

    spacing_mm: tuple[float, float] = (2.5, 2.5)
    slice_size: tuple[int, int] = (128, 128)
    ct_window_hu: tuple[float, float] = (-125.0, 275.0)
    mri_percentiles: tuple[float, float] = (0.5, 99.5)
    intensity: str = "zscore"

    def __post_init__(self):
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")

    def to_dict(self) -> dict:
        return {k: v if isinstance(v, str) else list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        data = dict(data)
        # settings written before the z-score step existed describe [0, 1] models
        intensity = data.pop("intensity", "unit")
        return cls(**{k: tuple(v) for k, v in data.items()}, intensity=intensity)


@dataclass(frozen=True)
class Geometry:
    """How a preprocessed volume relates to its input grid (all that the inverse needs)."""

    original_shape: tuple[int, int, int]
    original_affine: tuple[tuple[float, ...], ...]
    ornt: tuple[tuple[float, float], ...]  # nibabel orientation: input axes -> RAS axes
    ras_shape: tuple[int, int, int]
    resampled_shape: tuple[int, int]  # in-plane size after resampling
    offsets: tuple[int, int]  # where the resampled plane starts inside the kept plane (< 0: cut)
    tile: tuple[int, int] | None = None  # the prediction tile (``slice_size``); None: the whole plane

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(
            original_shape=tuple(d["original_shape"]),
            original_affine=tuple(tuple(r) for r in d["original_affine"]),
            ornt=tuple(tuple(r) for r in d["ornt"]),
            ras_shape=tuple(d["ras_shape"]),
            resampled_shape=tuple(d["resampled_shape"]),
            offsets=tuple(d["offsets"]),
            tile=tuple(d["tile"]) if d.get("tile") else None,
        )


@dataclass
class Preprocessed:
    """A case ready for 2D training: ``image`` D x H x W float32 (body z-scored, or [0, 1] with
    ``intensity="unit"``), ``label`` D x H x W uint8 scheme ids (or None), and the geometry to go
    back. From the cache, ``image`` and ``label`` may be :class:`fedgin.data.npy.NpyVolume`."""

    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    labels_outside_body: int = 0  # labelled input voxels outside the body box (module docstring)
    organ_slices: np.ndarray | None = None  # per slice: does the label show an organ (cache entries)


def normalise_intensity(image: np.ndarray, modality: str, cfg: PreprocessConfig) -> np.ndarray:
    """Map CT HU or MRI scanner units to float32 in [0, 1] (see the module docstring)."""
    if modality == "CT":
        lo, hi = cfg.ct_window_hu
    else:
        foreground = image[image > image.min()]
        values = foreground if foreground.size > 100 else image
        lo, hi = np.percentile(values, cfg.mri_percentiles)
        if hi <= lo:
            hi = lo + 1.0
    out = (np.clip(image, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32)


def body_statistics(unit: np.ndarray, modality: str) -> tuple[float, float]:
    """Mean and sd of a [0, 1] volume over its body (see ``BODY_THRESHOLD``); the whole volume
    when the body is nearly empty, sd floored so a flat image does not divide by zero."""
    body = unit[unit > BODY_THRESHOLD["CT" if modality == "CT" else "MRI"]]
    values = body if body.size > 100 else unit
    return float(values.mean()), max(float(values.std()), 1e-3)


def _resize_planes(volume: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``N x C x X x Y`` planes to ``size``; bilinear or nearest-exact."""
    if tuple(volume.shape[-2:]) == tuple(size):
        return volume
    if mode == "nearest":
        return F.interpolate(volume, size=size, mode="nearest-exact")
    return F.interpolate(volume, size=size, mode="bilinear", align_corners=False)


def _row_counts(mask_of, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many voxels of ``mask_of(volume)`` each row of the X x Y plane holds along X and along
    Y, over every slice of the X x Y x Z ``volume`` (32 slices at a time: no full-size mask)."""
    along_x = np.zeros(volume.shape[0], np.int64)
    along_y = np.zeros(volume.shape[1], np.int64)
    for z in range(0, volume.shape[2], 32):
        mask = mask_of(volume[:, :, z:z + 32])
        along_x += mask.sum(axis=(1, 2))
        along_y += mask.sum(axis=(0, 2))
    return along_x, along_y


def _extent(counts: np.ndarray, fraction: float) -> tuple[int, int] | None:
    """``(first, stop)`` of the rows holding at least ``fraction`` of the fullest row's count (and
    at least one voxel); None when there is none."""
    if counts.max(initial=0) == 0:
        return None
    rows = np.flatnonzero(counts >= max(1.0, fraction * counts.max()))
    return int(rows[0]), int(rows[-1]) + 1


def _join(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    if a is None or b is None:
        return a or b
    return min(a[0], b[0]), max(a[1], b[1])


def body_box(image: np.ndarray, unit: np.ndarray, modality: str, spacing: tuple[float, float],
             label: np.ndarray | None = None) -> tuple[tuple[tuple[int, int], ...], int]:
    """The in-plane box kept of an X x Y x Z RAS volume, as ``((x0, x1), (y0, y1))`` input voxels
    (see the module docstring), and how many labelled voxels lie outside the body's part of it.

    ``image`` is the volume in its own units (HU for CT), ``unit`` the same on the [0, 1] range
    (MRI's body threshold)."""
    if modality == "CT":
        counts = _row_counts(lambda v: v > BODY_HU, image)
    else:
        counts = _row_counts(lambda v: v > BODY_THRESHOLD["MRI"], unit)
    body = []
    for axis, (c, step) in enumerate(zip(counts, spacing)):
        extent = _extent(c, BODY_ROW_FRACTION) or (0, image.shape[axis])
        margin = int(np.ceil(BODY_MARGIN_MM / step))
        body.append((max(0, extent[0] - margin), min(image.shape[axis], extent[1] + margin)))
    if label is None:
        return tuple(body), 0
    labelled = _row_counts(lambda v: v > 0, label)
    outside = 0
    if labelled[0].any():
        (x0, x1), (y0, y1) = body
        inside = int(sum((label[x0:x1, y0:y1, z:z + 32] > 0).sum() for z in range(0, label.shape[2], 32)))
        outside = int(labelled[0].sum()) - inside
    return tuple(_join(b, _extent(c, 0.0)) for b, c in zip(body, labelled)), outside


def labels_outside_body(image: np.ndarray, affine: np.ndarray, modality: str, label: np.ndarray,
                        cfg: PreprocessConfig | None = None) -> int:
    """How many labelled voxels of a case on its input grid lie outside :func:`body_box`'s body."""
    cfg = cfg or PreprocessConfig()
    ornt = nib.orientations.io_orientation(affine)
    ras_image = nib.orientations.apply_orientation(image, ornt)
    sx, sy, _ = spacing_of(affine @ nib.orientations.inv_ornt_aff(ornt, image.shape))
    unit = normalise_intensity(ras_image, modality, cfg) if modality != "CT" else ras_image
    return body_box(ras_image, unit, modality, (sx, sy), nib.orientations.apply_orientation(label, ornt))[1]


def _plane_offsets(box: tuple[tuple[int, int], ...], shape: tuple[int, int], size: tuple[int, int],
                   minimum: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The kept plane's size and the resampled plane's offsets in it, for ``box`` in input voxels of
    an input plane of ``shape`` resampled to ``size``: the box (in resampled voxels, rounded
    outwards) centred in a plane of at least ``minimum``."""
    target, offsets = [], []
    for (a, b), n, m, low in zip(box, shape, size, minimum):
        start, stop = int(np.floor(a * m / n)), int(np.ceil(b * m / n))
        t = max(stop - start, low)
        target.append(t)
        offsets.append((t - (stop - start)) // 2 - start)
    return tuple(target), tuple(offsets)


def _place(plane: np.ndarray, target: tuple[int, int], offsets: tuple[int, int], fill) -> np.ndarray:
    """Put ``... x X x Y`` into a ``... x target`` canvas at ``offsets`` (negative = crop)."""
    out = np.full(plane.shape[:-2] + tuple(target), fill, dtype=plane.dtype)
    src, dst = [], []
    for n, t, o in zip(plane.shape[-2:], target, offsets):
        s0, d0 = max(0, -o), max(0, o)
        length = min(n - s0, t - d0)
        src.append(slice(s0, s0 + length))
        dst.append(slice(d0, d0 + length))
    out[(..., *dst)] = plane[(..., *src)]
    return out


def _take(canvas: np.ndarray, size: tuple[int, int], offsets: tuple[int, int], fill) -> np.ndarray:
    """Inverse of :func:`_place`: recover a ``... x size`` plane; cropped-away parts get ``fill``."""
    out = np.full(canvas.shape[:-2] + tuple(size), fill, dtype=canvas.dtype)
    src, dst = [], []
    for n, t, o in zip(size, canvas.shape[-2:], offsets):
        s0, d0 = max(0, -o), max(0, o)
        length = min(n - s0, t - d0)
        dst.append(slice(s0, s0 + length))
        src.append(slice(d0, d0 + length))
    out[(..., *dst)] = canvas[(..., *src)]
    return out


def preprocess(
    image: np.ndarray,
    affine: np.ndarray,
    modality: str,
    cfg: PreprocessConfig,
    label: np.ndarray | None = None,
) -> Preprocessed:
    """Image (+ label) on the input grid -> D x H x W slices in RAS at the target spacing."""
    ornt = nib.orientations.io_orientation(affine)
    ras_image = nib.orientations.apply_orientation(image, ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    sx, sy, _ = spacing_of(ras_affine)
    nx, ny, _ = ras_image.shape
    size = (max(1, round(nx * sx / cfg.spacing_mm[0])), max(1, round(ny * sy / cfg.spacing_mm[1])))
    norm = normalise_intensity(ras_image, modality, cfg)
    ras_label = nib.orientations.apply_orientation(label, ornt) if label is not None else None
    box, outside = body_box(ras_image, norm, modality, (sx, sy), ras_label)
    target, offsets = _plane_offsets(box, (nx, ny), size, cfg.slice_size)
    # slices first: D x 1 x X x Y, so in-plane resampling is one batched call
    planes = torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))[:, None]
    planes = _resize_planes(planes, size, "bilinear")[:, 0].numpy()
    out_image = _place(planes, target, offsets, 0.0).astype(np.float32)
    if cfg.intensity == "zscore":
        # after padding: the padding (0 on the [0, 1] range) gets the value of air
        mean, sd = body_statistics(norm, modality)
        out_image = ((out_image - np.float32(mean)) / np.float32(sd)).astype(np.float32)
    out_label = None
    if ras_label is not None:
        lp = torch.from_numpy(np.ascontiguousarray(ras_label.transpose(2, 0, 1)))[:, None]
        lp = _resize_planes(lp, size, "nearest")[:, 0].numpy()
        out_label = _place(lp.astype(np.uint8), target, offsets, 0)
    geometry = Geometry(
        original_shape=tuple(int(s) for s in image.shape),
        original_affine=tuple(tuple(float(v) for v in row) for row in affine),
        ornt=tuple((float(a), float(b)) for a, b in ornt),
        ras_shape=tuple(int(s) for s in ras_image.shape),
        resampled_shape=size,
        offsets=offsets,
        tile=tuple(cfg.slice_size),
    )
    return Preprocessed(image=out_image, label=out_label, geometry=geometry, labels_outside_body=outside)


def probabilities_to_original(probs: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Class probabilities ``C x D x H x W`` (preprocessed space) -> ``C x X x Y x Z`` on the input
    grid. Regions outside the kept plane become background; in-plane resampling is bilinear on
    probabilities (smoother borders than resampling labels)."""
    ras = _planes_to_ras(_as_float32(probs), geometry).permute(1, 2, 3, 0).numpy()  # C x X x Y x D (RAS)
    back = np.stack([_to_input_axes(c, geometry) for c in ras])
    assert back.shape[1:] == tuple(geometry.original_shape), (back.shape, geometry.original_shape)
    return torch.from_numpy(np.ascontiguousarray(back))


def _as_float32(probs) -> np.ndarray:
    return probs.detach().cpu().float().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float32)


def _planes_to_ras(probs: np.ndarray, geometry: Geometry) -> torch.Tensor:
    """``C x d x H x W`` probabilities of ``d`` slices -> ``d x C x X x Y`` float32 on the RAS grid:
    the canvas crop undone (background outside it) and the in-plane resampling inverted."""
    planes = _take(probs, geometry.resampled_shape, geometry.offsets, 0.0)
    # cells outside the canvas were filled with 0 for every class: make them background
    planes[0][planes.sum(axis=0) == 0] = 1.0
    rx, ry, _ = geometry.ras_shape
    return _resize_planes(torch.from_numpy(planes).permute(1, 0, 2, 3), (rx, ry), "bilinear")


def _to_input_axes(ras: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A view of an ``X x Y x Z[ x C]`` RAS array in the input's axis order (no copy)."""
    inverse = nib.orientations.ornt_transform(
        np.array([[i, 1] for i in range(3)], dtype=float), np.array(geometry.ornt)
    )
    return nib.orientations.apply_orientation(ras, inverse)


def _float16_keeping_argmax(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``probs`` (``d x C x X x Y``) as float16 whose argmax is still ``labels``: rounding can tie
    the winner with a lower class id (argmax takes the first), so the winner is lifted one float16
    step there."""
    out = probs.to(torch.float16).numpy()
    tied = np.nonzero(out.argmax(1) != labels.numpy())
    if tied[0].size:
        index = (tied[0], labels.numpy()[tied], *tied[1:])
        out[index] = np.nextafter(out[index], np.float16(np.inf))
    return out


def _invert_slices(chunks, geometry: Geometry, *, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 labels on the input grid from ``(first slice, C x d x H x W)`` chunks, and with
    ``probabilities`` the float16 ``C x`` input-shape probabilities (allocated at the first chunk)."""
    rx, ry, depth = geometry.ras_shape
    ras = np.zeros((rx, ry, depth), dtype=np.uint8)
    out = ras_out = None
    covered = 0
    for start, probs in chunks:
        arr = _as_float32(probs)
        t = _planes_to_ras(arr, geometry)  # d x C x X x Y
        labels = t.argmax(1)
        stop = start + arr.shape[1]
        ras[:, :, start:stop] = labels.to(torch.uint8).permute(1, 2, 0).numpy()
        if probabilities:
            if out is None:
                out = np.zeros((arr.shape[0], *geometry.original_shape), dtype=np.float16)
                # the input-ordered array seen in RAS order: each chunk lands in place, no final copy
                ras_out = np.moveaxis(nib.orientations.apply_orientation(np.moveaxis(out, 0, -1),
                                                                         np.array(geometry.ornt)), -1, 0)
            ras_out[:, :, :, start:stop] = _float16_keeping_argmax(t, labels).transpose(1, 2, 3, 0)
        covered += arr.shape[1]
    if covered != depth:
        raise ValueError(f"chunks covered {covered} of {depth} slices")
    back = np.ascontiguousarray(_to_input_axes(ras, geometry))
    assert back.shape == tuple(geometry.original_shape), (back.shape, geometry.original_shape)
    return back, out


def labels_from_slices(chunks, geometry: Geometry) -> np.ndarray:
    """uint8 labels on the input grid from ``chunks``, an iterable of ``(first slice, C x d x H x W
    probabilities)`` in preprocessed space covering every slice once.

    Slices are never resampled along z, so each chunk is inverted and reduced to its argmax on its
    own: memory is one uint8 volume plus one chunk, never ``C`` float volumes at the input's size
    (a 512 x 512 x 600 CT would need 3.8 GB per float copy of its 6 classes). The labels equal
    ``probabilities_to_original(probs, geometry).argmax(0)``."""
    return _invert_slices(chunks, geometry, probabilities=False)[0]


def labels_and_probabilities_from_slices(chunks, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """:func:`labels_from_slices` plus the probabilities on the input grid: ``C x X x Y x Z``
    float16, the spatial axes in the input file's voxel order, filled chunk by chunk into one
    preallocated array (2 bytes per class and voxel; no float32 volume).

    They equal ``probabilities_to_original(probs, geometry)`` to float16 precision, and their
    argmax is exactly the returned labels (a tie made by the rounding goes to the float32 winner)."""
    return _invert_slices(chunks, geometry, probabilities=True)


def labels_to_original(labels: np.ndarray, geometry: Geometry, num_classes: int) -> np.ndarray:
    """A D x H x W label map in preprocessed space -> uint8 labels on the input grid (one-hot,
    inverted like probabilities, 32 slices at a time)."""
    def chunks():
        for start in range(0, labels.shape[0], 32):
            onehot = F.one_hot(torch.from_numpy(labels[start:start + 32].astype(np.int64)), num_classes)
            yield start, onehot.permute(3, 0, 1, 2).float()

    return labels_from_slices(chunks(), geometry)
