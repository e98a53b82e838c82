"""``fedgin evaluate --pred DIR --ref DATASET``: label maps written by any tool (nnU-Net's
``{case_id}.nii.gz``, a merged TotalSegmentator map, ``fedgin predict``'s outputs) scored with the
metrics and files of ``evaluate --model``, on real NIfTI files written to ``tmp_path``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ABDOMEN_LABELS, SHAPE, phantom_case
from test_bad_input import assert_line, make_checkpoint, refused
from fedgin.cli import main
from fedgin.data.nifti import write_volume

ABDOMEN5 = ("liver", "kidneys", "spleen", "pancreas", "gallbladder")
PERFECT = {"dice": 1.0, "hd95": 0.0, "missed": False, "false_positive": False}
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
CASES = ("case_000", "case_001", "case_002")


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def labels_of(root: Path, case: str) -> np.ndarray:
    return np.asanyarray(nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).dataobj)


def copy_references(root: Path, dest: Path, cases=CASES) -> Path:
    """Predictions that are the reference labels themselves, named as nnU-Net names its outputs."""
    dest.mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copy(root / "labelsTr" / f"{case}.nii.gz", dest / f"{case}.nii.gz")
    return dest


@pytest.fixture
def reference(make_nnunet) -> Path:
    return make_nnunet("Dataset021_Ref", cases=CASES)


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_predictions_equal_to_the_reference_score_dice_1_and_hd95_0(reference, tmp_path, capsys):
    pred = copy_references(reference, tmp_path / "pred")
    out = tmp_path / "eval"
    rc, stdout, err = cli(capsys, "evaluate", "--pred", pred, "--ref", reference, "--out", out)
    assert rc == 0, err
    assert f"scored 3 prediction(s) from {pred}" in stdout and "CT: mean Dice 1.000 over 3 cases" in stdout

    summary = summary_of(out)
    assert [c["case"] for c in summary["metric_per_case"]] == list(CASES)  # default: every predicted case
    for case in summary["metric_per_case"]:
        assert case["metrics"] == {o: PERFECT for o in ABDOMEN5}
        assert case["prediction_file"] == str(pred / f"{case['case']}.nii.gz")
    assert summary["by_modality"]["CT"]["mean_dice"] == 1.0
    assert summary["by_modality"]["CT"]["liver"]["hd95"] == {"mean": 0.0, "sd": 0.0, "n": 3}
    assert summary["predictions"] == str(pred) and summary["model"] is None
    assert summary["arguments"]["pred"] == str(pred) and summary["arguments"]["data"] == [str(reference)]
    assert summary["arguments"]["postprocess"] is False and summary["arguments"]["cases"] == "predicted"
    with open(out / "metrics.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3 * len(ABDOMEN5)
    assert "| **mean** | **1.000** |" in (out / "summary.md").read_text()


def test_an_erased_organ_counts_as_missed(reference, tmp_path, capsys):
    pred = copy_references(reference, tmp_path / "pred")
    label = labels_of(reference, "case_001")
    write_volume(pred / "case_001.nii.gz", np.where(label == ABDOMEN_LABELS["spleen"], 0, label), AFFINE,
                 dtype=np.uint8)
    out = tmp_path / "eval"
    assert cli(capsys, "evaluate", "--pred", pred, "--ref", reference, "--out", out)[0] == 0
    summary = summary_of(out)
    spleen = {c["case"]: c["metrics"]["spleen"] for c in summary["metric_per_case"]}
    assert spleen["case_001"] == {"dice": 0.0, "hd95": None, "missed": True, "false_positive": False}
    assert spleen["case_000"] == PERFECT
    stats = summary["by_modality"]["CT"]["spleen"]
    assert (stats["missed"], stats["false_positives"], stats["annotated"]) == (1, 0, 3)
    assert stats["hd95"]["n"] == 2  # the miss has no HD95: counted, not averaged


def test_the_test_split_and_all_need_a_prediction_for_every_case(reference, tmp_path, capsys):
    pred = copy_references(reference, tmp_path / "pred", cases=("case_000",))
    line = refused(capsys, ["evaluate", "--pred", pred, "--ref", reference, "--out", tmp_path / "eval",
                            "--cases", "all"], [tmp_path])
    assert_line(line, pred, r"no prediction for 2 of 3 reference cases \(case_001, case_002\); "
                            r"--cases predicted scores only the cases that have one")
    assert not (tmp_path / "eval").exists()

    rc, _, err = cli(capsys, "evaluate", "--pred", pred, "--ref", reference, "--out", tmp_path / "eval")
    assert rc == 0, err  # by default, the predicted cases
    assert [c["case"] for c in summary_of(tmp_path / "eval")["metric_per_case"]] == ["case_000"]


def test_test_cases_follow_the_split_seed(make_nnunet, tmp_path, capsys):
    from fedgin.data.splits import seeded_split

    ids = [f"case_{i:03d}" for i in range(8)]
    root = make_nnunet("Dataset022_Split", cases=ids)
    pred = copy_references(root, tmp_path / "pred", cases=ids)
    rc, _, err = cli(capsys, "evaluate", "--pred", pred, "--ref", root, "--out", tmp_path / "eval",
                     "--cases", "test", "--seed", "3")
    assert rc == 0, err
    assert sorted(c["case"] for c in summary_of(tmp_path / "eval")["metric_per_case"]) == \
        sorted(seeded_split(ids, 3).test)


def test_no_prediction_matching_a_reference_case_is_an_error(reference, tmp_path, capsys):
    pred = tmp_path / "pred"
    write_volume(pred / "other_case.nii.gz", labels_of(reference, "case_000"), AFFINE, dtype=np.uint8)
    line = refused(capsys, ["evaluate", "--pred", pred, "--ref", reference, "--out", tmp_path / "eval"],
                   [tmp_path])
    assert_line(line, pred, r"no prediction is named after a labelled reference case "
                            r"\(expected names such as case_000\.nii\.gz\)")


@pytest.mark.parametrize(("kind", "problem"), [
    ("shape", r"prediction shape \(24, 20, 5\) != reference shape \(24, 20, 6\)"),
    ("affine", r"prediction affine differs from the reference affine"),
])
def test_a_prediction_off_the_reference_grid_is_refused(kind, problem, reference, tmp_path, capsys):
    pred = copy_references(reference, tmp_path / "pred")
    label = labels_of(reference, "case_002")
    bad = pred / "case_002.nii.gz"
    if kind == "shape":
        write_volume(bad, label[:, :, :5], AFFINE, dtype=np.uint8)
    else:
        write_volume(bad, label, np.diag([1.5, 1.5, 2.0, 1.0]), dtype=np.uint8)
    line = refused(capsys, ["evaluate", "--pred", pred, "--ref", reference, "--out", tmp_path / "eval"],
                   [tmp_path])
    assert_line(line, bad, problem)


def test_labels_json_ids_are_remapped_to_the_scheme(reference, tmp_path, capsys):
    """Predictions in their own ids (named by labels.json) score against references in theirs."""
    pred = tmp_path / "pred"
    own = {"background": 0, "spleen": 1, "Leber": 7, "kidney_left": 3, "kidney_right": 4, "gallbladder": 2,
           "pancreas": 5, "aorta": 6}
    for case in CASES:
        # the reference's boxes painted with the prediction's own ids, plus a structure no scheme has
        organs = {o: (own["Leber"] if o == "liver" else own[o]) for o in ABDOMEN_LABELS if o != "background"}
        _, label = phantom_case(SHAPE, organs={**organs, "stomach": own["aorta"]})
        write_volume(pred / f"{case}.nii.gz", label, AFFINE, dtype=np.uint8)
    (pred / "labels.json").write_text(json.dumps(own))

    line = refused(capsys, ["evaluate", "--pred", pred, "--ref", reference, "--out", tmp_path / "eval"],
                   [tmp_path])
    assert "labels.json: label 'Leber' (id 7) has no mapping to scheme abdomen5" in line
    out = tmp_path / "eval"
    rc, _, err = cli(capsys, "evaluate", "--pred", pred, "--ref", reference, "--out", out, "--label-map", "leber=liver")
    assert rc == 0, err
    summary = summary_of(out)
    assert all(c["metrics"] == {o: PERFECT for o in ABDOMEN5} for c in summary["metric_per_case"])
    assert summary["arguments"]["labels_from"] == str(pred / "labels.json")

    # an id that labels.json does not name is refused, naming the file
    write_volume(pred / "case_000.nii.gz", np.full(SHAPE, 9, np.uint8), AFFINE, dtype=np.uint8)
    line = refused(capsys, ["evaluate", "--pred", pred, "--ref", reference, "--out", tmp_path / "eval2",
                            "--label-map", "leber=liver"], [tmp_path])
    assert_line(line, pred / "case_000.nii.gz", r"label ids \[9\] are not in labels\.json")


def test_a_label_map_name_in_neither_predictions_nor_references_is_refused(reference, tmp_path, capsys):
    pred = copy_references(reference, tmp_path / "pred")
    line = refused(capsys, ["evaluate", "--pred", pred, "--ref", reference, "--out", tmp_path / "eval",
                            "--label-map", "leber=liver"], [tmp_path])
    assert line.startswith("fedgin: error: --label-map leber: no dataset has a label named 'leber'")


def test_fedgin_predict_outputs_score_with_their_models_scheme_and_split(make_nnunet, tmp_path, capsys):
    model = make_checkpoint(tmp_path / "model.pt", scheme="abdomen6")
    root = make_nnunet("Dataset023_Pred", cases=CASES)
    pred = tmp_path / "pred"
    assert cli(capsys, "predict", "-i", root / "imagesTr", "-o", pred, "--model", model)[0] == 0
    out = tmp_path / "eval"
    rc, _, err = cli(capsys, "evaluate", "--pred", pred, "--ref", root, "--out", out)
    assert rc == 0, err
    summary = summary_of(out)
    assert summary["scheme"]["name"] == "abdomen6"  # from provenance.json
    assert summary["model"] == str(model) and summary["model_meta"]["seed"] == 0
    assert summary["arguments"]["labels_from"] == str(pred / "labels.json")
    assert len(summary["metric_per_case"]) == 3


def test_model_and_pred_are_mutually_exclusive(reference, tmp_path, capsys):
    line = refused(capsys, ["evaluate", "--model", tmp_path / "m.pt", "--pred", tmp_path, "--ref", reference,
                            "--out", tmp_path / "eval"], [tmp_path])
    assert line == ("fedgin: error: argument --pred: not allowed with argument --model "
                    "(see fedgin evaluate --help)")
    line = refused(capsys, ["evaluate", "--pred", tmp_path / "no-such-dir", "--ref", reference,
                            "--out", tmp_path / "eval"], [tmp_path])
    assert_line(line, tmp_path / "no-such-dir", "prediction folder not found")


def test_a_totalsegmentator_reference_needs_labels_json(tmp_path, capsys):
    """A merged TotalSegmentator label map (its own ids, named in labels.json) against mask folders."""
    subject = tmp_path / "ts" / "s0001"
    image, _ = phantom_case(SHAPE, organs={"liver": 1, "spleen": 1})
    write_volume(subject / "ct.nii.gz", image, AFFINE)
    for organ in ("liver", "spleen"):
        write_volume(subject / "segmentations" / f"{organ}.nii.gz", phantom_case(SHAPE, organs={organ: 1})[1], AFFINE)
    pred = tmp_path / "pred"
    write_volume(pred / "s0001.nii.gz", phantom_case(SHAPE, organs={"liver": 5, "spleen": 1})[1], AFFINE,
                 dtype=np.uint8)
    line = refused(capsys, ["evaluate", "--pred", pred, "--ref", tmp_path / "ts", "--out", tmp_path / "eval"],
                   [tmp_path])
    assert_line(line, pred, r"no labels\.json to say which organ each prediction id is, and reference ts "
                            r"\(totalsegmentator\) has no label ids to go by")
    (pred / "labels.json").write_text(json.dumps({"background": 0, "spleen": 1, "liver": 5}))
    rc, _, err = cli(capsys, "evaluate", "--pred", pred, "--ref", tmp_path / "ts", "--out", tmp_path / "eval")
    assert rc == 0, err
    metrics = summary_of(tmp_path / "eval")["metric_per_case"][0]["metrics"]
    assert metrics["liver"] == PERFECT and metrics["spleen"] == PERFECT
    assert metrics["pancreas"]["dice"] is None  # no pancreas mask: not annotated


def test_data_given_twice_reads_both_datasets():
    """``--data A --data B`` is two datasets (as ``--data A B`` and ``--ref A --ref B``), never B alone."""
    from fedgin.cli import build_parser

    for argv in (["--data", "a", "--data", "b"], ["--data", "a", "b"], ["--ref", "a", "--ref", "b"]):
        args = build_parser().parse_args(["evaluate", "--pred", "p", "--out", "o", *argv])
        assert list(args.data) + list(args.ref) == ["a", "b"], argv
