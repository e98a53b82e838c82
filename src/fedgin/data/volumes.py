"""Reading a case's image or label whatever it is stored as: a NIfTI file, a DICOM series folder
(:mod:`fedgin.data.dicom`) or a DICOM SEG (:mod:`fedgin.data.dicom_seg`), and the checks that an
image and its label share one voxel grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .nifti import read_header_info, read_volume, spatial_shape


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image (float32, HU for CT) and its voxel-to-RAS affine: a NIfTI file, or a DICOM series
    folder (:mod:`fedgin.data.dicom`)."""
    if Path(path).is_dir():
        from .dicom import open_series

        series = open_series(path)
        return series.read(), series.affine
    return read_volume(path, kind="image")


def image_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The voxel grid (3D shape, affine) of :func:`read_image`'s image, without reading its voxels."""
    if Path(path).is_dir():
        from .dicom import open_series

        series = open_series(path)
        return series.shape, series.affine
    shape, affine = read_header_info(path)
    return spatial_shape(shape), affine


def is_seg_path(path: Path | None) -> bool:
    """A label stored as DICOM SEG (``.dcm``), not NIfTI."""
    return path is not None and Path(path).name.lower().endswith(".dcm")


def read_raw_label(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A label file's source ids on the grid ``shape``/``affine``: a NIfTI's voxels (its grid must
    be that one) or a DICOM SEG's segment numbers placed on it (:func:`fedgin.data.dicom_seg.seg_label_map`)."""
    if is_seg_path(path):
        from .dicom_seg import seg_label_map

        return seg_label_map(path, shape, affine)
    raw, label_affine = read_volume(path, kind="label")
    check_same_grid(path, shape, affine, raw.shape, label_affine)
    return raw


def map_label_ids(raw: np.ndarray, lut: tuple[int, ...], where: Path | None,
                  mapping: str = "the dataset's label mapping") -> np.ndarray:
    """Source label ids -> scheme ids through ``lut`` (-1: undeclared); an id outside it is an
    error naming ``where`` and ``mapping``."""
    table = np.asarray(lut, dtype=np.int16)
    present = np.unique(raw)
    unknown = present[present >= len(table)]
    if unknown.size == 0:
        unknown = present[table[present] < 0]
    if unknown.size:
        raise DataError(where, f"label ids {unknown.tolist()} are not in {mapping}")
    return table[raw].astype(np.uint8)


def check_same_grid(path, image_shape, image_affine, label_shape, label_affine, *,
                    what: str = "label", against: str = "image") -> None:
    """``path`` (a ``what``) must share the voxel grid (shape and affine) of the ``against`` volume."""
    if tuple(image_shape) != tuple(label_shape):
        raise DataError(path, f"{what} shape {tuple(label_shape)} != {against} shape {tuple(image_shape)}")
    if not np.allclose(image_affine, label_affine, atol=1e-3, rtol=1e-5):
        raise DataError(path, f"{what} affine differs from the {against} affine")
