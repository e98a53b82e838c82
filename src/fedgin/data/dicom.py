"""Reading DICOM series (CT and MR) as fedgin volumes: the same image and affine a NIfTI gives.

A series is the set of single-frame image instances sharing a ``SeriesInstanceUID``. Its slices
are ordered by their position along the slice normal (the cross product of the row and column
directions of ``ImageOrientationPatient``), never by file name or ``InstanceNumber``. Voxel
``(i, j, k)`` is column ``i`` and row ``j`` of the ``k``-th slice in that order, as the NIfTI
converters lay it out, and the affine maps it to RAS millimetres (DICOM's LPS with x and y negated)
from ``ImagePositionPatient``, ``ImageOrientationPatient`` and ``PixelSpacing``. Voxel values are
``stored * RescaleSlope + RescaleIntercept`` (HU for CT), float32, slice by slice into one array.

What cannot be one volume is refused in one line naming the folder (:class:`DataError`): several
series in a folder without a choice (``--series UID``), slices of different size, pixel spacing or
orientation (a tilted slice), duplicate positions or non-uniform spacing (a missing slice),
slices that drift in-plane (gantry tilt), localizer-only series, multi-frame or colour images,
compressed pixel data without an installed decoder, a modality other than CT or MR, and a folder
without DICOM files. Localizer (scout) images inside an axial series are left out, and DICOM
objects that are not images (SEG, RTSTRUCT, SR, presentation states, ...) are passed over.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

#: DICOM modalities fedgin segments -> fedgin's modality name.
MODALITIES = {"CT": "CT", "MR": "MRI"}
#: Objects found beside image series that are no image to segment: passed over.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "KO", "PR",
                                  "REG", "FID", "DOC", "PLAN", "AU", "ECG"})
_DICOMDIR = "1.2.840.10008.1.3.10"
#: Tolerances: orientation cosines, and positions relative to the voxel size.
ORIENTATION_TOL = 1e-4
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 1e-3
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble (the file name does not matter)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file in ``folder`` and below, in path order (DICOMDIR index files left out)."""
    found = []
    for base, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(base) / name
            if not name.startswith(".") and name.upper() != "DICOMDIR" and is_dicom_file(path):
                found.append(path)
    return found


def holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` (or a folder below it) holds a DICOM file; stops at the first one."""
    for base, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(is_dicom_file(Path(base) / n) for n in names if not n.startswith(".")):
            return True
    return False


def _read_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise DataError(path, f"not a readable DICOM file ({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__})") from None


@dataclass
class DicomSeries:
    """One DICOM series as a volume, its pixels not yet read (:meth:`read` reads them).

    ``files`` and ``headers`` (pydicom datasets without pixel data; a DICOM SEG references them)
    are in volume order, slice ``k`` at index ``k``; ``shape`` is ``(columns, rows, slices)``."""

    uid: str
    folder: Path
    modality: str
    files: tuple[Path, ...]
    headers: tuple = field(repr=False)
    affine: np.ndarray = field(repr=False)
    shape: tuple[int, int, int] = (0, 0, 0)
    description: str = ""
    number: int | None = None
    localizers_left_out: int = 0

    def read(self) -> np.ndarray:
        """The volume (``shape``, float32): ``stored * RescaleSlope + RescaleIntercept`` per slice."""
        import pydicom

        volume = np.empty(self.shape, dtype=np.float32, order="F")  # slices contiguous, as NIfTI
        for k, (path, header) in enumerate(zip(self.files, self.headers)):
            try:
                pixels = pydicom.dcmread(path).pixel_array
            except Exception as exc:  # a decoder's or pydicom's error: name the file, one line
                text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
                raise DataError(path, f"cannot decode the pixel data ({text})") from None
            if pixels.shape != self.shape[1::-1]:
                raise DataError(path, f"pixel data of shape {pixels.shape}, expected {self.shape[1::-1]}")
            slope, intercept = _rescale(header)
            np.multiply(pixels.T, slope, out=volume[:, :, k], casting="unsafe")
            volume[:, :, k] += intercept
        if not np.all(np.isfinite(volume)):
            raise DataError(self.folder, "image contains NaN or Inf values")
        return volume

    def summary(self) -> str:
        """``UID (CT, 78 slices, 'description')`` for messages."""
        text = f"{self.uid} ({self.modality}, {len(self.files)} slices"
        return text + (f", {self.description!r})" if self.description else ")")


def _rescale(header) -> tuple[float, float]:
    slope = float(header.get("RescaleSlope", 1) or 1)
    intercept = float(header.get("RescaleIntercept", 0) or 0)
    return slope, intercept


def _floats(header, keyword: str, count: int, path: Path) -> np.ndarray:
    value = header.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise DataError(path, f"no valid {keyword} ({count} numbers): the slice cannot be placed in space")
    return out


def is_localizer(header) -> bool:
    """A localizer (scout, topogram): ``ImageType`` names it so."""
    return any(str(v).upper() == "LOCALIZER" for v in (header.get("ImageType") or ()))


def _modality(header, folder: Path) -> str:
    raw = str(header.get("Modality", "") or "").upper()
    if raw not in MODALITIES:
        shown = f"modality {raw}" if raw else "no Modality tag"
        raise DataError(folder, f"series {header.get('SeriesInstanceUID', '?')} has {shown}: fedgin segments "
                                "CT and MR series only (choose another with --series UID)")
    return MODALITIES[raw]


def _check_decodable(header, path: Path) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(header, "file_meta", None)
    syntax = UID(str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DataError(path, f"pixel data compressed as {syntax.name}, which pydicom cannot decode") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)[:160]
        raise DataError(path, f"pixel data compressed as {syntax.name} and no installed decoder reads it "
                              f"(install one: {missing or 'pylibjpeg'}), or decompress the series first")


def build_series(folder: Path, items: Sequence[tuple[Path, object]]) -> DicomSeries:
    """The :class:`DicomSeries` of ``items`` (``(file, header)`` of one ``SeriesInstanceUID``),
    validated (see the module docstring); ``folder`` is named in the errors."""
    first = items[0][1]
    uid = str(first.get("SeriesInstanceUID", ""))
    modality = _modality(first, folder)
    slices = [(p, h) for p, h in items if not is_localizer(h)]
    if not slices:
        raise DataError(folder, f"series {uid} holds only localizer (scout) images, no volume")
    for path, header in slices:
        if str(header.get("Modality", "")).upper() != str(first.get("Modality", "")).upper():
            raise DataError(path, f"modality {header.get('Modality')} within a {first.get('Modality')} series")
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(path, "a multi-frame (enhanced) image: fedgin reads series of single-frame "
                                  "CT or MR images (export the series as classic single-frame images)")
        if int(header.get("SamplesPerPixel", 1) or 1) != 1 or not str(
                header.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME"):
            raise DataError(path, f"a {header.get('PhotometricInterpretation')} image: CT and MR are greyscale")
        if "Rows" not in header or "Columns" not in header:
            raise DataError(path, "no Rows/Columns: not an image")
    ref_path, ref = slices[0]
    size = (int(ref.Rows), int(ref.Columns))
    orientation = _floats(ref, "ImageOrientationPatient", 6, ref_path)
    spacing = _floats(ref, "PixelSpacing", 2, ref_path)
    positions = []
    for path, header in slices:
        if (int(header.Rows), int(header.Columns)) != size:
            raise DataError(folder, f"mixed slice sizes in series {uid}: {path.name} is "
                                    f"{int(header.Rows)} x {int(header.Columns)}, {ref_path.name} {size[0]} x {size[1]}")
        if np.abs(_floats(header, "ImageOrientationPatient", 6, path) - orientation).max() > ORIENTATION_TOL:
            raise DataError(folder, f"mixed orientation in series {uid}: {path.name} is tilted against "
                                    f"{ref_path.name} (ImageOrientationPatient differs); one volume needs parallel slices")
        if np.abs(_floats(header, "PixelSpacing", 2, path) - spacing).max() > SPACING_ABS_TOL_MM:
            raise DataError(folder, f"mixed pixel spacing in series {uid}: {path.name} differs from {ref_path.name}")
        positions.append(_floats(header, "ImagePositionPatient", 3, path))
        _check_decodable(header, path)
    row_dir, col_dir = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 \
            or abs(float(row_dir @ col_dir)) > 1e-3:
        raise DataError(folder, f"series {uid}: ImageOrientationPatient is not two orthogonal unit vectors")
    normal = np.cross(row_dir, col_dir)
    order = np.argsort([float(p @ normal) for p in positions], kind="stable")
    slices = [slices[i] for i in order]
    positions = np.stack([positions[i] for i in order])
    step = _slice_step(folder, uid, positions, normal, slices)
    # voxel (i = column, j = row, k = slice) -> LPS: columns advance along the row direction
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    number = first.get("SeriesNumber")
    return DicomSeries(uid=uid, folder=folder, modality=modality, files=tuple(p for p, _ in slices),
                       headers=tuple(h for _, h in slices), affine=_LPS_TO_RAS @ lps,
                       shape=(size[1], size[0], len(slices)), description=str(first.get("SeriesDescription", "") or ""),
                       number=None if number in (None, "") else int(number),
                       localizers_left_out=len(items) - len(slices))


def _slice_step(folder: Path, uid: str, positions: np.ndarray, normal: np.ndarray, slices) -> np.ndarray:
    """The vector from one slice to the next (LPS mm), after checking that the slices are evenly
    spaced along the normal and do not drift in-plane."""
    if len(positions) == 1:
        thickness = float(slices[0][1].get("SpacingBetweenSlices") or slices[0][1].get("SliceThickness") or 1.0)
        return normal * (thickness if thickness > 0 else 1.0)
    along = positions @ normal
    gaps = np.diff(along)
    spacing = float(np.median(gaps))
    if gaps.min() <= SPACING_ABS_TOL_MM:
        k = int(np.argmin(gaps))
        raise DataError(folder, f"series {uid}: {slices[k][0].name} and {slices[k + 1][0].name} lie at the same "
                                f"position ({along[k]:.2f} mm along the normal); several phases, echoes or "
                                "acquisitions in one series cannot be one volume")
    tol = max(SPACING_REL_TOL * spacing, SPACING_ABS_TOL_MM)
    off = np.abs(gaps - spacing)
    if off.max() > tol:
        k = int(np.argmax(off))
        raise DataError(folder, f"series {uid}: non-uniform slice spacing: {gaps[k]:.3f} mm between "
                                f"{slices[k][0].name} and {slices[k + 1][0].name}, {spacing:.3f} mm elsewhere "
                                "(a missing slice?); one volume needs evenly spaced slices")
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    drift = positions - positions[0] - np.outer(along - along[0], normal)
    if np.linalg.norm(drift, axis=1).max() > max(SPACING_REL_TOL * spacing, 0.01):
        raise DataError(folder, f"series {uid}: the slices shift in-plane from one to the next (gantry tilt?); "
                                "resample the series onto an orthogonal grid first")
    return step


def scan_folder(root: Path) -> dict[str, list[tuple[Path, object]]]:
    """``{SeriesInstanceUID: [(file, header), ...]}`` of the image instances below ``root``
    (headers only; non-image objects passed over). Refuses a folder with no DICOM image."""
    files = dicom_files(root)
    if not files:
        raise DataError(root, "no DICOM files in folder")
    groups: dict[str, list[tuple[Path, object]]] = {}
    for path in files:
        header = _read_header(path)
        meta = getattr(header, "file_meta", None)
        sop_class = str(header.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
        if sop_class == _DICOMDIR or str(header.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if not uid:
            raise DataError(path, "no SeriesInstanceUID: cannot tell which series the file belongs to")
        groups.setdefault(uid, []).append((path, header))
    if not groups:
        raise DataError(root, f"{len(files)} DICOM file(s), none of them an image (SEG, RTSTRUCT, SR, ...)")
    return groups


def _folder_of(items) -> Path:
    parents = {p.parent for p, _ in items}
    return parents.pop() if len(parents) == 1 else Path(os.path.commonpath([str(p) for p in parents]))


def _describe(uid: str, items) -> str:
    header = items[0][1]
    text = f"{uid} ({header.get('Modality', '?')}, {len(items)} files"
    description = str(header.get("SeriesDescription", "") or "")
    return text + (f", {description!r})" if description else ")")


def find_series(root: str | Path, choose: Sequence[str] | None = None) -> list[tuple[str, DicomSeries]]:
    """``[(case name, series)]`` of a DICOM series folder or a folder of series folders (any depth).

    Without ``choose``, every series is a case and a folder holding several series is refused;
    ``choose`` (``--series``, SeriesInstanceUIDs) keeps only those series. A case is named after
    its series folder (relative to ``root``, ``/`` as ``_``), with the SeriesNumber (else the UID's
    last digits) appended where two series share a folder."""
    root = Path(root)
    groups = scan_folder(root)
    if choose:
        unknown = [uid for uid in choose if uid not in groups]
        if unknown:
            listed = "; ".join(_describe(uid, items) for uid, items in list(groups.items())[:3])
            more = f"; and {len(groups) - 3} more" if len(groups) > 3 else ""
            raise DataError(root, f"no series {unknown[0]} here (series: {listed}{more})")
        groups = {uid: groups[uid] for uid in dict.fromkeys(choose)}
    by_folder: dict[Path, list[str]] = {}
    for uid, items in groups.items():
        by_folder.setdefault(_folder_of(items), []).append(uid)
    if not choose:
        for folder, uids in by_folder.items():
            if len(uids) > 1:
                listed = "; ".join(_describe(uid, groups[uid]) for uid in uids[:3])
                more = f"; and {len(uids) - 3} more" if len(uids) > 3 else ""
                raise DataError(folder, f"{len(uids)} series mixed in one folder ({listed}{more}): "
                                        "choose one with --series UID")
    cases: list[tuple[str, DicomSeries]] = []
    names: set[str] = set()
    for folder, uids in sorted(by_folder.items()):
        relative = folder.relative_to(root) if folder != root and folder.is_relative_to(root) else None
        base = "_".join(relative.parts) if relative is not None else (root.name or "series")
        for uid in uids:
            series = build_series(folder, groups[uid])
            name = base
            if len(uids) > 1 or name in names:
                name = f"{base}_{series.number if series.number is not None else uid.rsplit('.', 1)[-1]}"
            if name in names:
                name = f"{base}_{uid.replace('.', '_')}"
            names.add(name)
            cases.append((name, series))
    return cases


def open_series(folder: str | Path, uid: str | None = None) -> DicomSeries:
    """The one series of ``folder`` (and below), or series ``uid`` of it."""
    cases = find_series(folder, [uid] if uid else None)
    if len(cases) > 1:
        listed = "; ".join(s.summary() for _, s in cases[:3])
        raise DataError(folder, f"{len(cases)} series below this folder ({listed}): expected one")
    return cases[0][1]
