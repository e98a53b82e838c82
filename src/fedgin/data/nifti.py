"""Reading and writing NIfTI volumes safely: validated on the way in, atomic on the way out."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import publish, temp_path
from ..errors import DataError


def _load(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a directory, expected a NIfTI file")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file")
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(path, f"not a readable NIfTI file ({_short(exc, path)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI file ({type(img).__name__})")
    return img


def _short(exc: BaseException, path: Path | None = None) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if path is not None:  # the error line already names the file: keep the reason within the limit
        text = text.replace(str(path), path.name)
    return text[:120]


def read_volume(path: str | Path, *, kind: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D volume and its voxel-to-RAS affine (4 x 4, mm).

    ``kind="image"`` returns float32 and refuses NaN/Inf; ``kind="label"`` returns uint8 and
    refuses fractional or negative values. A trailing singleton 4th axis is dropped.
    """
    path = Path(path)
    img = _load(path)
    shape = spatial_shape(tuple(int(s) for s in img.shape))
    if len(shape) != 3:
        raise DataError(path, f"expected a 3D volume, got {len(img.shape)}D shape {tuple(img.shape)}")
    if min(shape) == 0:
        raise DataError(path, f"zero-size axis in shape {shape}")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(path, f"truncated or corrupt voxel data ({_short(exc, path)})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, "invalid affine (singular or non-finite)")
    if kind == "image":
        data = data.astype(np.float32, copy=False)
        if not np.all(np.isfinite(data)):
            raise DataError(path, "image contains NaN or Inf values")
        return data, affine
    if kind == "label":
        if np.issubdtype(data.dtype, np.floating):
            if not np.all(np.isfinite(data)):
                raise DataError(path, "label contains NaN or Inf values")
            if np.any(data != np.round(data)):
                raise DataError(path, "label contains fractional values; expected integer label ids")
        if data.min() < 0:
            raise DataError(path, f"label contains negative id {int(data.min())}")
        if data.max() > 255:
            raise DataError(path, f"label id {int(data.max())} is out of range (max 255)")
        return data.astype(np.uint8), affine
    raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")


def spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A volume's shape without a trailing singleton 4th axis (as :func:`read_volume` drops it)."""
    return tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)


def read_header_info(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a NIfTI file, without reading its voxels."""
    img = _load(Path(path))
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def read_header(path: str | Path) -> nib.Nifti1Header:
    """A copy of a NIfTI file's header (a ``Nifti2Header`` for NIfTI-2), without reading its voxels."""
    return _load(Path(path)).header.copy()


def label_header(source: nib.Nifti1Header, description: str = "fedgin label map") -> nib.Nifti1Header:
    """The header of a uint8 label map on ``source``'s voxel grid, for :func:`write_volume`.

    Kept from ``source``: qform and sform (codes and matrices), pixdim (voxel size, qfac, TR),
    xyzt_units, slice timing, aux_file, and its descrip after ``description`` (``"fedgin label map;
    <input's descrip>"``, cut to NIfTI's 80 bytes). Reset: data type uint8 with no scaling
    (scl_slope/inter NaN), no display range (cal_min/max 0: the input's intensity window means
    nothing for label ids), no intent, no extensions (they describe the input's data).
    """
    hdr = source.copy()
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(None, None)
    hdr["cal_min"] = hdr["cal_max"] = 0
    hdr.set_intent("none")
    hdr.extensions.clear()
    original = bytes(hdr["descrip"]).rstrip(b"\0").strip()
    text = description.encode() + (b"; " + original if original else b"")
    hdr["descrip"] = text[:80]
    return hdr


def write_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, *, dtype=None,
                 header: nib.Nifti1Header | None = None) -> Path:
    """Write ``data`` with ``affine`` atomically: a temporary file in the target folder, then rename.

    Without ``header``, qform and sform both carry ``affine`` (code 1, scanner), as nnU-Net and
    most viewers expect. With ``header`` (e.g. :func:`label_header` of the input's), the file takes
    that header's qform and sform codes and matrices, pixdim, units and descrip as they are;
    ``affine`` must then be the header's own (``header.get_best_affine()``), and a
    ``Nifti2Header`` writes NIfTI-2.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data if dtype is None else data.astype(dtype))
    affine = np.asarray(affine, dtype=np.float64)
    if header is None:
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    else:
        if not np.allclose(affine, header.get_best_affine()):
            raise ValueError("affine differs from the header's qform/sform")
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        # the affine equals the header's, so nibabel keeps the header's qform and sform untouched
        img = image_class(arr, affine, header=header)
        img.header.set_slope_inter(None, None)
    img.header.set_data_dtype(arr.dtype)
    tmp = temp_path(path, ".nii.gz")
    try:
        nib.save(img, str(tmp))
        return publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def axcodes_of(affine: np.ndarray) -> str:
    """Orientation code such as ``RAS`` or ``LPS`` (closest axes)."""
    return "".join(nib.aff2axcodes(affine))
