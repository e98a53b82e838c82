"""DICOM SEG out (``fedgin predict --output-type dicom-seg``) and in (``fedgin evaluate --pred``,
DICOM sites' labels).

Writing (highdicom): one Segmentation instance per series, BINARY, referencing the source series
and, frame by frame, the source instance each frame segments (its frames lie on the series' own
slices, pixel for pixel). One segment per organ of the model's label scheme, numbered as the
label ids (``liver`` is segment 1 as it is label 1), each with its SNOMED CT code
(:data:`ORGAN_CODES`, property category "Anatomical Structure" of CID 7150; the kidneys of
``abdomen6`` carry a Left/Right modifier), a recommended display colour (3D Slicer's colours for
these organs) and the algorithm identification: fedgin, its version, and the checkpoint's SHA-256.
Only frames with organ voxels are stored (an organ not found has its segment and no frame).

Reading: :func:`read_segments` names each segment (by its code, else by its label through fedgin's
alias table and ``--label-map``), :func:`seg_label_map` places the frames onto a voxel grid (a DICOM
series' or a NIfTI's, given as shape and affine) as a map of segment numbers, checking that every
frame lies exactly on one slice of that grid. Pixels are decoded one frame at a time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_bytes
from ..errors import DataError, FedginError

#: DICOM's Segmentation Storage and Label Map Segmentation Storage SOP classes.
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
#: SNOMED CT concept ids of fedgin's organs (the values of ``pydicom.sr.codedict.codes.SCT``).
ORGAN_CODES = {"liver": "10200004", "kidney": "64033007", "spleen": "78961009", "pancreas": "15776009",
               "gallbladder": "28231008"}
#: SNOMED CT laterality modifiers (``codes.SCT.Left``, ``codes.SCT.Right``).
LATERALITY = {"kidney_left": "7771000", "kidney_right": "24028007"}
#: Recommended display colours (sRGB), 3D Slicer's GenericAnatomyColors for these organs.
ORGAN_RGB = {"liver": (221, 130, 101), "kidney": (185, 102, 83), "spleen": (157, 108, 162),
             "pancreas": (249, 180, 111), "gallbladder": (139, 150, 98)}
#: Tolerance (in voxels) for a frame to lie on a grid's slice.
GRID_TOL = 1e-3
_LPS = np.array([-1.0, -1.0, 1.0])


def check_seg_support() -> None:
    """Refuse in one line where highdicom (which writes the SEG) is not installed."""
    from importlib.util import find_spec

    if find_spec("highdicom") is None:
        raise FedginError("--output-type dicom-seg needs highdicom (pip install highdicom)")


def _concept(organ: str) -> str:
    """``kidneys`` / ``kidney_left`` -> ``kidney``; the other organs are their own concept."""
    return "kidney" if organ.startswith("kidney") else organ


def segment_descriptions(scheme, *, model_digest: str | None, version: str):
    """One highdicom ``SegmentDescription`` per organ of ``scheme``, numbered as its label ids."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedgin", family=codes.cid7162.ArtificialIntelligence, version=version,
        source=f"fedgin checkpoint sha256 {model_digest[:32]}" if model_digest else "fedgin",
        parameters={"checkpoint_sha256": model_digest or "unknown", "label_scheme": scheme.name})
    category = codes.SCT.AnatomicalStructure  # CID 7150 "Segmentation Property Categories"
    out = []
    for organ, number in sorted(scheme.label_ids.items(), key=lambda item: item[1]):
        if number == 0:
            continue
        concept = _concept(organ)
        code = hd.sr.CodedConcept(ORGAN_CODES[concept], "SCT", _meaning(concept))
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=organ, segmented_property_category=category,
            segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_id=f"fedgin {organ}", tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*ORGAN_RGB[concept]))
        if organ in LATERALITY:
            side = codes.SCT.Left if organ == "kidney_left" else codes.SCT.Right
            description.SegmentedPropertyTypeModifierSequence = [hd.sr.CodedConcept(side.value, "SCT", side.meaning)]
        out.append(description)
    return out


def _meaning(concept: str) -> str:
    from pydicom.sr.codedict import codes

    return {"liver": codes.SCT.Liver, "kidney": codes.SCT.Kidney, "spleen": codes.SCT.Spleen,
            "pancreas": codes.SCT.Pancreas, "gallbladder": codes.SCT.Gallbladder}[concept].meaning


def write_seg(path: str | Path, labels: np.ndarray, series, scheme, *, model_digest: str | None,
              model_name: str | None = None) -> Path:
    """Write the label map ``labels`` (``X x Y x Z`` scheme ids on ``series``' grid, a
    :class:`fedgin.data.dicom.DicomSeries`) as one DICOM SEG at ``path``, atomically."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    from .. import __version__

    path = Path(path)
    if tuple(labels.shape) != tuple(series.shape):
        raise ValueError(f"label map of shape {labels.shape} is not on the series' grid {series.shape}")
    # frames = the series' slices in volume order, rows = j, columns = i
    frames = np.ascontiguousarray(np.asarray(labels, dtype=np.uint8).transpose(2, 1, 0))
    digest = model_digest or ""
    seg = hd.seg.Segmentation(
        source_images=list(series.headers), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(scheme, model_digest=model_digest, version=__version__),
        series_instance_uid=hd.UID(), series_number=1000 + (series.number or 0) % 1000, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="fedgin", manufacturer_model_name=f"fedgin {scheme.name} model",
        software_versions=__version__, device_serial_number=digest[:16] or "unknown",
        content_label="FEDGIN", content_description=f"fedgin {scheme.name} organs; model sha256 {digest[:12]}"[:64],
        content_creator_name="fedgin^" + ((model_name or "model")[:50]), series_description="fedgin organ segmentation",
        omit_empty_frames=True, transfer_syntax_uid=ExplicitVRLittleEndian)
    del frames
    buffer = io.BytesIO()  # a SEG of binary frames is small (bit-packed, organ frames only)
    seg.save_as(buffer)
    return write_bytes(path, buffer.getvalue())


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegFrame:
    segment: int
    position: tuple[float, float, float]  # ImagePositionPatient, LPS mm


@dataclass
class SegHeader:
    """What placing and naming a SEG's frames needs, without its pixels."""

    path: Path
    kind: str  # BINARY, FRACTIONAL or LABELMAP
    rows: int
    columns: int
    frames: list[SegFrame]
    orientation: np.ndarray  # 6 cosines, LPS
    spacing: np.ndarray  # PixelSpacing: between rows, between columns (mm)
    segments: dict[int, str]  # segment number -> name (fine organ, "kidneys", or the label)
    frame_of_reference: str
    max_fractional: int = 1


def is_seg_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(".dcm")


def _item(ds, f: int, sequence: str, attribute: str):
    """``attribute`` of the functional group ``sequence`` for frame ``f`` (per-frame, else shared)."""
    per_frame, shared = ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")
    for group in (per_frame[f] if per_frame else None, shared[0] if shared else None):
        if group is not None and sequence in group and group[sequence].value:
            value = group[sequence][0].get(attribute)
            if value is not None:
                return value
    return None


def _segment_name(item) -> str:
    codes = item.get("SegmentedPropertyTypeCodeSequence") or []
    value = str(codes[0].get("CodeValue", "")) if codes else ""
    concept = next((c for c, v in ORGAN_CODES.items() if v == value), None)
    if concept == "kidney":
        modifiers = {str(m.get("CodeValue", "")) for m in (codes[0].get("SegmentedPropertyTypeModifierSequence") or [])}
        modifiers |= {str(m.get("CodeValue", "")) for m in (item.get("SegmentedPropertyTypeModifierSequence") or [])}
        side = [organ for organ, code in LATERALITY.items() if code in modifiers]
        return side[0] if len(side) == 1 else "kidneys"
    if concept is not None:
        return concept
    return str(item.get("SegmentLabel", "") or f"segment {int(item.SegmentNumber)}")


def read_seg_header(path: str | Path) -> SegHeader:
    """The frames, geometry and segment names of the DICOM SEG at ``path`` (no pixels read)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise DataError(path, f"not a readable DICOM file ({type(exc).__name__})") from None
    if str(ds.get("SOPClassUID", "")) not in SEG_SOP_CLASSES:
        raise DataError(path, f"not a DICOM SEG (modality {ds.get('Modality', '?')}, SOP class {ds.get('SOPClassUID', '?')})")
    kind = str(ds.get("SegmentationType", "BINARY")).upper()
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames, orientation, spacing = [], None, None
    for f in range(n):
        segment = _item(ds, f, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        position = _item(ds, f, "PlanePositionSequence", "ImagePositionPatient")
        o = _item(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
        s = _item(ds, f, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or o is None or s is None or (segment is None and kind != "LABELMAP"):
            raise DataError(path, f"frame {f + 1} has no position, orientation, pixel spacing or segment number: "
                                  "cannot place it on the image grid")
        o, s = np.asarray([float(v) for v in o]), np.asarray([float(v) for v in s])
        if orientation is None:
            orientation, spacing = o, s
        elif np.abs(o - orientation).max() > 1e-4 or np.abs(s - spacing).max() > 1e-4:
            raise DataError(path, "frames of different orientation or pixel spacing")
        frames.append(SegFrame(int(segment or 0), tuple(float(v) for v in position)))
    segments = {int(item.SegmentNumber): _segment_name(item) for item in ds.get("SegmentSequence") or []}
    if not segments:
        raise DataError(path, "the SEG describes no segment")
    return SegHeader(path=path, kind=kind, rows=int(ds.Rows), columns=int(ds.Columns), frames=frames,
                     orientation=orientation, spacing=spacing, segments=segments,
                     frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
                     max_fractional=int(ds.get("MaximumFractionalValue", 1) or 1))


def read_segments(path: str | Path) -> dict[str, int]:
    """``{segment name: segment number}`` of a SEG (with ``background: 0``), for
    :func:`fedgin.data.datasets.scheme_lut`; two segments of one name get ``name#number``."""
    out: dict[str, int] = {"background": 0}
    for number, name in sorted(read_seg_header(path).segments.items()):
        out[name if name not in out else f"{name}#{number}"] = number
    return out


def _axis(vector: np.ndarray, path: Path) -> tuple[int, int]:
    """The grid axis and direction (+1/-1) of a frame axis given in voxel units."""
    axis = int(np.argmax(np.abs(vector)))
    unit = np.zeros(3)
    unit[axis] = np.sign(vector[axis])
    if np.abs(vector - unit).max() > GRID_TOL:
        raise DataError(path, "the SEG's frames are not on the image's voxel grid (other orientation or pixel "
                              "spacing): fedgin scores a segmentation on its image's grid, without resampling")
    return axis, int(unit[axis])


def _placements(header: SegHeader, shape: tuple[int, ...], affine: np.ndarray) -> list[tuple]:
    """Per frame, the index of ``out`` it fills and whether it goes in transposed."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    to_voxel = inverse[:3, :3]
    row_dir, col_dir = header.orientation[:3] * _LPS, header.orientation[3:] * _LPS  # RAS
    u_axis, u_sign = _axis(to_voxel @ (row_dir * header.spacing[1]), header.path)  # along a row: columns
    v_axis, v_sign = _axis(to_voxel @ (col_dir * header.spacing[0]), header.path)  # down a column: rows
    if u_axis == v_axis:
        raise DataError(header.path, "the SEG's frame axes are degenerate")
    w_axis = 3 - u_axis - v_axis
    if header.columns != shape[u_axis] or header.rows != shape[v_axis]:
        raise DataError(header.path, f"SEG frames of {header.rows} x {header.columns} pixels do not cover the "
                                     f"image's {shape[v_axis]} x {shape[u_axis]} slices")
    out = []
    for frame in header.frames:
        voxel = inverse[:3, :3] @ (np.asarray(frame.position) * _LPS) + inverse[:3, 3]
        rounded = np.round(voxel)
        if np.abs(voxel - rounded).max() > GRID_TOL * 10 or not 0 <= rounded[w_axis] < shape[w_axis]:
            raise DataError(header.path, f"a SEG frame at {tuple(round(v, 2) for v in frame.position)} (LPS mm) lies "
                                         "on no slice of the image")
        start_u, start_v = int(rounded[u_axis]), int(rounded[v_axis])
        if start_u != (0 if u_sign > 0 else shape[u_axis] - 1) or start_v != (0 if v_sign > 0 else shape[v_axis] - 1):
            raise DataError(header.path, "a SEG frame is shifted in-plane against the image's slices")
        index: list = [None, None, None]
        index[w_axis] = int(rounded[w_axis])
        index[u_axis] = slice(None, None, u_sign)
        index[v_axis] = slice(None, None, v_sign)
        out.append((tuple(index), u_axis < v_axis))
    return out


def check_seg_grid(path: str | Path, shape: tuple[int, ...], affine: np.ndarray) -> None:
    """Refuse (one line) a SEG whose frames do not lie on the grid ``shape``/``affine``."""
    _placements(read_seg_header(path), tuple(shape), affine)


def seg_label_map(path: str | Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The SEG at ``path`` as a ``shape`` uint8 map of segment numbers on the grid ``affine``
    (voxel -> RAS mm); where segments overlap, the higher number wins."""
    from pydicom.pixels import iter_pixels

    header = read_seg_header(path)
    if max(header.segments) > 255:
        raise DataError(path, f"{max(header.segments)} segments: fedgin reads at most 255")
    placements = _placements(header, tuple(shape), affine)
    out = np.zeros(tuple(shape), dtype=np.uint8, order="F")
    try:
        frames = iter_pixels(header.path)
        for (index, transposed), frame, pixels in zip(placements, header.frames, frames):
            if header.kind == "LABELMAP":
                mask, values = pixels > 0, pixels.astype(np.uint8)
            else:
                threshold = header.max_fractional / 2 if header.kind == "FRACTIONAL" else 0
                mask, values = pixels > threshold, None
            target = out[index]
            mask = mask.T if transposed else mask
            if values is None:
                target[mask & (target < frame.segment)] = frame.segment
            else:
                values = values.T if transposed else values
                target[mask] = np.maximum(target[mask], values[mask])
    except DataError:
        raise
    except Exception as exc:  # a decoder's error: name the file, one line
        raise DataError(path, f"cannot decode the SEG's pixel data ({type(exc).__name__}: {str(exc)[:80]})") from None
    return out
