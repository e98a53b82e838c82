"""DICOM in (``fedgin predict -i SERIES``), DICOM SEG out (``--output-type dicom-seg``), SEGs scored
(``fedgin evaluate --pred``) and DICOM sites, on small series the tests write (tests/dicom_series.py)
and on the shared CHAOS CT series (``../shared/data/dicom/chaos_ct_sample``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_series import lps_affine, write_series

from conftest import ABDOMEN_LABELS, phantom_case
from fedgin.cli import main
from fedgin.data.datasets import open_dataset
from fedgin.data.dicom import find_series, open_series
from fedgin.data.dicom_seg import ORGAN_CODES, seg_label_map
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import write_volume
from fedgin.data.preprocess import PreprocessConfig
from fedgin.engine.checkpoint import save_checkpoint
from fedgin.engine.model import ModelConfig, build_model

CHAOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "chaos_ct_sample"
ABDOMEN5 = get_scheme("abdomen5")


def organ_model(path: Path) -> Path:
    """A checkpoint whose network predicts organs (mostly liver) over the whole body plane: its last
    convolution's weights are 0 and the liver's bias is 1. No post-processing plan, so what the
    network predicts is what is written; a SEG then always has organ frames to compare."""
    cfg = ModelConfig(out_channels=ABDOMEN5.num_classes)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    state["model.2.1.conv.unit0.conv.weight"].zero_()
    state["model.2.1.conv.unit0.conv.bias"].zero_()
    state["model.2.1.conv.unit0.conv.bias"][1] = 1.0
    return save_checkpoint(path, state, model_config=cfg, scheme=ABDOMEN5, preprocess=PreprocessConfig(),
                           sites=[{"name": "ct", "modality": "CT"}], meta={"epoch": 1, "seed": 0})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return organ_model(tmp_path_factory.mktemp("model") / "model.pt")


def ct_volume(shape=(32, 28, 8), seed=0) -> np.ndarray:
    image, _ = phantom_case(shape, seed=seed)
    return image.astype(np.float32)


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv) -> str:
    """``fedgin ARGV`` refused: exit 2, one ``fedgin: error:`` line, no traceback, no output folder."""
    out_dir = Path(argv[argv.index("-o") + 1]) if "-o" in argv else None
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert len(err.splitlines()) == 1 and err.startswith("fedgin: error: "), err
    assert out_dir is None or not out_dir.exists()
    return err.strip()


def canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


# --- reading a series ----------------------------------------------------------------------------


def test_a_series_reads_as_its_volume_in_hu_with_its_affine(tmp_path):
    volume = ct_volume()
    write_series(tmp_path / "s", volume, intercept=-1024.0, slope=1.0)
    series = open_series(tmp_path / "s")
    assert series.modality == "CT" and series.shape == volume.shape
    np.testing.assert_array_equal(series.read(), volume)
    np.testing.assert_allclose(series.affine, lps_affine())


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_slices_are_ordered_by_position_not_by_file_name_or_instance_number(tmp_path, order):
    volume = ct_volume(seed=1)
    n = volume.shape[2]
    rank = list(range(n))[::-1] if order == "reversed" else list(np.random.default_rng(0).permutation(n))

    def instance(k, ds):
        ds.InstanceNumber = int(rank[k]) + 1  # InstanceNumber disagrees with the position too

    write_series(tmp_path / "s", volume, names=lambda k: f"slice_{rank[k]:03d}.dcm", edit=instance)
    series = open_series(tmp_path / "s")
    np.testing.assert_array_equal(series.read(), volume)
    np.testing.assert_allclose(series.affine, lps_affine())


def test_rescale_slope_and_intercept_give_the_values(tmp_path):
    volume = ct_volume(seed=2)
    volume = np.round(volume / 2) * 2  # representable with slope 2
    write_series(tmp_path / "s", volume, intercept=-2048.0, slope=2.0)
    np.testing.assert_array_equal(open_series(tmp_path / "s").read(), volume)


def test_an_oblique_series_keeps_its_orientation_in_the_affine(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    orientation = (c, s, 0.0, -s, c, 0.0)  # rotated about the patient's z axis
    write_series(tmp_path / "s", ct_volume(), orientation=orientation)
    affine = open_series(tmp_path / "s").affine
    lps = np.diag([-1, -1, 1]) @ affine[:3, :3]
    np.testing.assert_allclose(lps[:, 0], np.array([c, s, 0]) * 1.5, atol=1e-9)
    np.testing.assert_allclose(lps[:, 1], np.array([-s, c, 0]) * 1.25, atol=1e-9)
    np.testing.assert_allclose(lps[:, 2], [0, 0, 3.0], atol=1e-9)


def test_localizers_in_a_series_are_left_out(tmp_path):
    volume = ct_volume()
    write_series(tmp_path / "s", volume)
    write_series(tmp_path / "s", volume[:, :, :1], series_uid=open_series(tmp_path / "s").uid,
                 orientation=(1, 0, 0, 0, 0, -1), names=lambda k: "scout",
                 edit=lambda k, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    series = open_series(tmp_path / "s")
    assert series.localizers_left_out == 1 and series.shape == volume.shape


def test_a_folder_of_series_folders_is_one_case_per_series(tmp_path):
    write_series(tmp_path / "in" / "patient1" / "ct", ct_volume())
    write_series(tmp_path / "in" / "patient2" / "ct", ct_volume(seed=3))
    cases = find_series(tmp_path / "in")
    assert [name for name, _ in cases] == ["patient1_ct", "patient2_ct"]


# --- what cannot be one volume --------------------------------------------------------------------


def _gap(k, ds):
    if k >= 5:  # slice 4 -> 5 is two steps apart: one slice missing
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                   ds.ImagePositionPatient[2] + 3.0]


def _tilt(k, ds):
    if k == 3:
        c, s = np.cos(0.2), np.sin(0.2)
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, c, s]


def _size(k, ds):
    if k == 2:
        ds.Rows = ds.Rows - 2
        ds.PixelData = ds.PixelData[: ds.Rows * ds.Columns * 2]


def _shear(k, ds):  # gantry tilt: each slice a little further along y
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1] + 0.5 * k,
                               ds.ImagePositionPatient[2]]


def _duplicate(k, ds):
    if k == 4:
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                   ds.ImagePositionPatient[2] - 3.0]


@pytest.mark.parametrize("edit, modality, expected", [
    (_gap, "CT", "non-uniform slice spacing: 6.000 mm between IM0004 and IM0005, 3.000 mm elsewhere"),
    (_tilt, "CT", "mixed orientation in series"),
    (_size, "CT", "mixed slice sizes in series"),
    (_shear, "CT", "the slices shift in-plane from one to the next (gantry tilt?)"),
    (_duplicate, "CT", "lie at the same position"),
    (None, "PT", "has modality PT: fedgin segments CT and MR series only"),
])
def test_a_series_that_cannot_be_one_volume_is_refused_in_one_line(tmp_path, capsys, model, edit, modality,
                                                                     expected):
    write_series(tmp_path / "s", ct_volume(), edit=edit, modality=modality)
    error = refused(capsys, "predict", "-i", tmp_path / "s", "-o", tmp_path / "out", "--model", model)
    assert expected in error
    assert str(tmp_path / "s") in error


def test_two_series_in_one_folder_need_a_choice(tmp_path, capsys, model):
    write_series(tmp_path / "s", ct_volume(), series_uid="1.2.3.4.1", description="arterial")
    write_series(tmp_path / "s", ct_volume(seed=4), series_uid="1.2.3.4.2", names=lambda k: f"V{k:04d}",
                 description="venous")
    error = refused(capsys, "predict", "-i", tmp_path / "s", "-o", tmp_path / "out", "--model", model)
    assert "2 series mixed in one folder" in error and "1.2.3.4.1 (CT, 8 files, 'arterial')" in error
    assert "choose one with --series UID" in error
    assert "no series 9.9" in refused(capsys, "predict", "-i", tmp_path / "s", "-o", tmp_path / "out",
                                      "--model", model, "--series", "9.9")
    code, out, err = run(capsys, "predict", "-i", tmp_path / "s", "-o", tmp_path / "out", "--model", model,
                         "--series", "1.2.3.4.2", "--no-qa")
    assert code == 0, err
    assert (tmp_path / "out" / "s.nii.gz").is_file()  # the chosen series, named after its folder
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["dicom_series"][0]["series_instance_uid"] == "1.2.3.4.2"


def test_only_localizers_no_dicom_and_a_single_file_are_refused(tmp_path, capsys, model):
    write_series(tmp_path / "scout", ct_volume()[:, :, :2],
                 edit=lambda k, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert "holds only localizer (scout) images" in refused(
        capsys, "predict", "-i", tmp_path / "scout", "-o", tmp_path / "out", "--model", model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert "no .nii or .nii.gz files and no DICOM files in folder" in refused(
        capsys, "predict", "-i", tmp_path / "empty", "-o", tmp_path / "out", "--model", model)
    assert "a DICOM file is one slice" in refused(
        capsys, "predict", "-i", tmp_path / "scout" / "IM0000", "-o", tmp_path / "out", "--model", model)


def test_compressed_pixel_data_without_a_decoder_is_refused(tmp_path, capsys, model):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here (pylibjpeg or GDCM)")

    def encapsulate(k, ds):
        from pydicom.encaps import encapsulate as wrap

        ds.PixelData = wrap([b"\xff\xd8not really jpeg\xff\xd9"])
        ds["PixelData"].VR = "OB"

    write_series(tmp_path / "s", ct_volume(), transfer_syntax=JPEGLosslessSV1, edit=encapsulate)
    error = refused(capsys, "predict", "-i", tmp_path / "s", "-o", tmp_path / "out", "--model", model)
    assert "pixel data compressed as JPEG Lossless" in error and "no installed decoder reads it" in error


def test_modality_option_must_agree_with_the_tag_and_seg_needs_dicom_input(tmp_path, capsys, model):
    write_series(tmp_path / "s", ct_volume())
    assert "is CT by its Modality tag, not MRI" in refused(
        capsys, "predict", "-i", tmp_path / "s", "-o", tmp_path / "out", "--model", model, "--modality", "MRI")
    image, _ = phantom_case((32, 28, 8))
    write_volume(tmp_path / "ct.nii.gz", image, np.diag([1.5, 1.25, 3.0, 1.0]))
    error = refused(capsys, "predict", "-i", tmp_path / "ct.nii.gz", "-o", tmp_path / "out", "--model", model,
                    "--output-type", "dicom-seg")
    assert "--output-type dicom-seg needs DICOM input" in error
    assert "--output-type takes nifti or dicom-seg" in refused(
        capsys, "predict", "-i", tmp_path / "s", "-o", tmp_path / "out", "--model", model, "--output-type", "png")


# --- DICOM SEG out --------------------------------------------------------------------------------


def test_dicom_seg_reproduces_the_label_map_and_references_the_series(tmp_path, capsys, model):
    volume = ct_volume((40, 36, 10))
    files = write_series(tmp_path / "in" / "case1", volume, names=lambda k: f"z{9 - k}.dcm")  # reversed names
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", "-i", tmp_path / "in", "-o", out, "--model", model,
                       "--output-type", "nifti", "--output-type", "dicom-seg", "--no-qa")
    assert code == 0, err
    labels_nii = nib.load(str(out / "case1.nii.gz"))
    labels = np.asarray(labels_nii.dataobj)
    np.testing.assert_allclose(labels_nii.affine, lps_affine())
    assert labels.shape == volume.shape and (labels == 1).sum() > 0

    series = open_series(tmp_path / "in" / "case1")
    np.testing.assert_array_equal(seg_label_map(out / "case1.seg.dcm", series.shape, series.affine), labels)

    seg = hd.seg.segread(out / "case1.seg.dcm")
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    # highdicom's own reading, frame by source instance, gives the same voxels
    uids = [h.SOPInstanceUID for h in series.headers]
    by_instance = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                                    relabel=False)
    np.testing.assert_array_equal(by_instance.transpose(2, 1, 0), labels)
    # one segment per organ, numbered as the label ids, coded in SNOMED CT, with colour and algorithm
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert {s.SegmentLabel: n for n, s in segments.items()} == {o: i for o, i in ABDOMEN5.label_ids.items() if i}
    liver = segments[1]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == ORGAN_CODES["liver"] == "10200004"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert len(liver.RecommendedDisplayCIELabValue) == 3
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    digest = json.loads((out / "provenance.json").read_text())["checkpoint"]["sha256"]
    assert algorithm.AlgorithmName == "fedgin" and digest in algorithm.AlgorithmParameters
    assert liver.SegmentAlgorithmType == "AUTOMATIC"
    # only frames with organ voxels: one frame per (organ, slice) that holds it
    expected = sum(int((labels[:, :, k] == i).any()) for i in range(1, 6) for k in range(labels.shape[2]))
    assert int(seg.NumberOfFrames) == expected


# --- the shared series: DICOM and NIfTI give one label map, a SEG scores as its NIfTI -------------


@pytest.fixture(scope="module")
def chaos_predictions(tmp_path_factory, model):
    if not (CHAOS / "series").is_dir():
        pytest.skip(f"shared DICOM sample not found at {CHAOS}; it sits beside the checkout in CI")
    root = tmp_path_factory.mktemp("chaos")
    for argv in (["-i", CHAOS / "series", "-o", root / "dicom", "--output-type", "nifti,dicom-seg"],
                 ["-i", CHAOS / "reference" / "image.nii.gz", "-o", root / "nifti"]):
        assert main([str(a) for a in ["predict", *argv, "--model", model, "--no-qa"]]) == 0
    return root


def test_the_shared_series_predicts_as_its_nifti(chaos_predictions):
    from_dicom, affine_dicom = canonical(chaos_predictions / "dicom" / "series.nii.gz")
    from_nifti, affine_nifti = canonical(chaos_predictions / "nifti" / "image.nii.gz")
    np.testing.assert_allclose(affine_dicom, affine_nifti, atol=1e-6)
    np.testing.assert_array_equal(from_dicom, from_nifti)
    assert (from_dicom == 1).sum() > 100_000  # a real liver-sized prediction, not 0 == 0
    series = open_series(CHAOS / "series")
    labels = np.asarray(nib.load(str(chaos_predictions / "dicom" / "series.nii.gz")).dataobj)
    np.testing.assert_array_equal(seg_label_map(chaos_predictions / "dicom" / "series.seg.dcm",
                                                series.shape, series.affine), labels)


@pytest.mark.slow  # two evaluations of a 512 x 512 x 78 CT with a body-sized prediction
def test_a_seg_of_the_shared_series_scores_as_its_nifti(chaos_predictions, tmp_path, capsys):
    ref = tmp_path / "Dataset900_Chaos"  # the reference in nnU-Net layout, the files linked
    (ref / "imagesTr").mkdir(parents=True)
    (ref / "labelsTr").mkdir()
    (ref / "imagesTr" / "chaos_0000.nii.gz").symlink_to(CHAOS / "reference" / "image.nii.gz")
    (ref / "labelsTr" / "chaos.nii.gz").symlink_to(CHAOS / "reference" / "liver.nii.gz")
    (ref / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "liver": 1}}))
    seg_dir, nifti_dir = tmp_path / "seg", tmp_path / "nifti"
    seg_dir.mkdir()
    shutil.copy(chaos_predictions / "dicom" / "series.seg.dcm", seg_dir / "chaos.seg.dcm")
    shutil.copytree(chaos_predictions / "nifti", nifti_dir)
    (nifti_dir / "image.nii.gz").rename(nifti_dir / "chaos.nii.gz")
    dice = {}
    for name, pred in (("seg", seg_dir), ("nifti", nifti_dir)):
        code, _, err = run(capsys, "evaluate", "--pred", pred, "--ref", ref, "--out", tmp_path / f"eval_{name}",
                           "--no-qa")
        assert code == 0, err
        summary = json.loads((tmp_path / f"eval_{name}" / "summary.json").read_text())
        dice[name] = summary["metric_per_case"][0]["metrics"]["liver"]
    assert dice["seg"] == dice["nifti"]
    assert 0.05 < dice["seg"]["dice"] < 1.0


# --- DICOM sites ----------------------------------------------------------------------------------


def test_a_dicom_site_with_seg_or_nifti_labels_is_checked_and_scored(tmp_path, capsys, model):
    site = tmp_path / "site"
    volume, label = phantom_case((40, 36, 10))
    write_series(site / "images" / "case_a", volume.astype(np.float32))
    write_series(site / "images" / "case_b", volume.astype(np.float32))
    code, _, err = run(capsys, "predict", "-i", site / "images", "-o", tmp_path / "pred", "--model", model,
                       "--output-type", "nifti,dicom-seg", "--no-qa")
    assert code == 0, err
    (site / "labels").mkdir()
    shutil.copy(tmp_path / "pred" / "case_a.seg.dcm", site / "labels" / "case_a.seg.dcm")
    code, out, err = run(capsys, "data", "check", site)
    assert code == 0, err
    assert "OK: 2 cases in 1 dataset(s) (CT)" in out  # case_b, unlabelled, is a test case
    dataset = open_dataset(site, ABDOMEN5)
    assert dataset.source == "dicom" and [c.case_id for c in dataset.test_cases] == ["case_b"]
    assert set(dataset.cases[0].annotated) == set(ABDOMEN5.organs)
    # the NIfTI prediction scored against the SEG reference: the same label map, Dice 1
    (tmp_path / "nifti").mkdir()
    shutil.copy(tmp_path / "pred" / "case_a.nii.gz", tmp_path / "nifti" / "case_a.nii.gz")
    code, _, err = run(capsys, "evaluate", "--pred", tmp_path / "nifti", "--ref", site, "--out", tmp_path / "ev",
                       "--no-qa")
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "summary.json").read_text())["metric_per_case"][0]["metrics"]
    assert metrics["liver"]["dice"] == 1.0
    # a NIfTI label on the series' grid, with dataset.json naming the ids
    (site / "labels" / "case_a.seg.dcm").unlink()
    write_volume(site / "labels" / "case_a.nii.gz", label, open_series(site / "images" / "case_a").affine)
    (site / "dataset.json").write_text(json.dumps({"labels": dict(ABDOMEN_LABELS)}))
    code, out, err = run(capsys, "data", "check", site)
    assert code == 0, err
    case = open_dataset(site, ABDOMEN5).cases[0]
    _, reference, _ = case.read(ABDOMEN5)
    assert (reference == ABDOMEN5.label_ids["liver"]).sum() == (label == ABDOMEN_LABELS["liver"]).sum()


def test_a_dicom_site_that_cannot_be_read_says_why(tmp_path, capsys):
    site = tmp_path / "site"
    write_series(site / "images" / "case_a", ct_volume(), edit=_gap)
    (site / "labels").mkdir()
    code, out, err = run(capsys, "data", "check", site)
    assert code == 2
    assert "non-uniform slice spacing" in err and "FAILED" in out


def test_a_dicom_site_trains_and_evaluates(tmp_path, capsys):
    site = tmp_path / "site"
    for n in range(4):
        volume, label = phantom_case((40, 36, 10), seed=n)
        write_series(site / "images" / f"case_{n}", volume.astype(np.float32))
        write_volume(site / "labels" / f"case_{n}.nii.gz", label, lps_affine())
    (site / "dataset.json").write_text(json.dumps({"labels": dict(ABDOMEN_LABELS)}))
    code, _, err = run(capsys, "train", "--site", f"ct={site}", "--mode", "local", "--out", tmp_path / "run",
                       "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--threads", "1")
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", "--model", tmp_path / "run" / "ct", "--data", site, "--out",
                       tmp_path / "eval", "--no-qa")
    assert code == 0, err
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert [r["modality"] for r in summary["metric_per_case"]] == ["CT"]
