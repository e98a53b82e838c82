"""Small DICOM series for the tests, written with pydicom: one single-frame CT (or MR, PT, ...)
Image Storage instance per slice, uncompressed, as a scanner exports them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: Column and row direction cosines of an axial series (patient LPS).
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_series(folder: Path, volume: np.ndarray, *, spacing: tuple[float, float, float] = (1.5, 1.25, 3.0),
                 origin: tuple[float, float, float] = (-20.0, -15.0, 100.0), modality: str = "CT",
                 series_uid: str | None = None, study_uid: str | None = None, frame_of_reference: str | None = None,
                 intercept: float = -1024.0, slope: float = 1.0, orientation: Sequence[float] = AXIAL,
                 names: Callable[[int], str] | None = None, edit: Callable[[int, Dataset], None] | None = None,
                 transfer_syntax: str = ExplicitVRLittleEndian, description: str = "test series") -> list[Path]:
    """Write ``volume`` (``X x Y x Z`` values, column x row x slice; stored as
    ``(value - intercept) / slope`` in int16) as one file per slice into ``folder``; returns the
    files. Slice ``k`` lies at ``origin + k * spacing[2] * normal`` (LPS mm); ``names(k)`` names
    its file (default ``IM{k:04d}``, so file order is slice order), ``edit(k, ds)`` changes its
    dataset before it is written (a gap, a tilted slice, another modality ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    written = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_of_reference
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "TEST01", "Test^Patient", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = (
            "20260101", "120000", "", "", "1")
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 3, k + 1
        ds.SeriesDescription = description
        ds.Manufacturer = "fedgin tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # between rows, between columns
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        if edit is not None:
            edit(k, ds)
        path = folder / (names(k) if names else f"IM{k:04d}")
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def lps_affine(spacing=(1.5, 1.25, 3.0), origin=(-20.0, -15.0, 100.0)) -> np.ndarray:
    """The RAS affine fedgin gives an axial series written by :func:`write_series`."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    return affine
