"""Per-case Dice and HD95 on hand-made volumes with known answers."""

import warnings

import numpy as np
import pytest

from fedgin.data.labels import get_scheme
from fedgin.engine.metrics import case_metrics, dice_score, hd95_mm, mean_sd, outcome_counts
from fedgin.evaluation.scoring import summarise, summary_markdown


def test_dice_known_values():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[0:4] = True  # 400 voxels
    b[2:6] = True  # 400 voxels, 200 shared
    assert dice_score(a, b) == pytest.approx(0.5)
    assert dice_score(a, a) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) is None


def test_hd95_shifted_cube_in_mm():
    a = np.zeros((30, 30, 30), bool)
    a[10:20, 10:20, 10:20] = True
    b = np.roll(a, 3, axis=0)
    # shift of 3 voxels along an axis of 2 mm spacing: every boundary distance is at most 6 mm
    assert hd95_mm(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0, abs=1e-6)
    assert hd95_mm(a, a, (2.0, 1.0, 1.0)) == 0.0
    assert hd95_mm(a, np.zeros_like(a), (1.0, 1.0, 1.0)) is None


def _monai_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(torch.from_numpy(pred[None, None].astype(np.uint8)),
                                           torch.from_numpy(ref[None, None].astype(np.uint8)),
                                           percentile=95, spacing=list(spacing))
    return float(value.item())


@pytest.mark.parametrize("case", ["blobs", "speckled", "touching-the-border", "far-apart", "one-voxel"])
def test_hd95_equals_monais_on_shapes_it_finds_hard(case):
    """The distance-transform HD95 gives MONAI's ``compute_hausdorff_distance(percentile=95)``:
    random blobs, a speckled prediction (surfaces everywhere), masks cut by the array's border,
    two distant components, a single voxel; anisotropic spacing."""
    rng = np.random.default_rng(len(case))
    z, y, x = np.ogrid[:24, :40, :36]
    ref = ((x - 18) ** 2 / 100 + (y - 20) ** 2 / 150 + (z - 12) ** 2 / 40) < 1
    pred = ((x - 16) ** 2 / 80 + (y - 22) ** 2 / 120 + (z - 11) ** 2 / 50) < 1
    if case == "blobs":
        pred = pred ^ (rng.random(pred.shape) < 0.02)
    elif case == "speckled":
        pred = ((x - 18) ** 2 / 300 + (y - 20) ** 2 / 300 + (z - 12) ** 2 / 100) < 1
        pred &= rng.random(pred.shape) < 0.6
    elif case == "touching-the-border":
        ref, pred = np.roll(ref, 9, axis=2), np.roll(pred, -9, axis=1)
        ref[:, :, 30:] |= ref[:, :, 28:29]
    elif case == "far-apart":
        pred = np.zeros_like(ref)
        pred[1:4, 1:3, 30:34] = True
        pred[10:14, 15:25, 10:20] = True
    else:
        pred = np.zeros_like(ref)
        pred[5, 6, 7] = True
    spacing = (2.5, 0.7, 0.9)
    assert hd95_mm(pred, ref, spacing) == pytest.approx(_monai_hd95(pred, ref, spacing), rel=1e-5, abs=1e-5)


def test_case_metrics_null_rules():
    ref = np.zeros((8, 8, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:4, 1:4] = 1
    pred[1:4, 1:4] = 1
    pred[5:7, 5:7] = 2  # predicts kidneys where the case does not annotate them
    organs = {"liver": 1, "kidneys": 2, "spleen": 3}
    out = case_metrics(pred, ref, organs, annotated=("liver", "spleen"), spacing=(1.0, 1.0, 1.0))
    assert out["liver"]["dice"] == 1.0
    assert out["kidneys"] == {"dice": None, "hd95": None, "missed": None, "false_positive": None}  # not annotated
    assert out["spleen"] == {"dice": None, "hd95": None, "missed": False, "false_positive": False}  # absent from both


def test_mean_sd_skips_nulls():
    assert mean_sd([1.0, None, 0.5]) == {"mean": 0.75, "sd": pytest.approx(0.353553, abs=1e-6), "n": 2}
    assert mean_sd([None]) == {"mean": None, "sd": None, "n": 0}


def test_a_missed_organ_and_a_false_positive_are_flagged_and_counted():
    """A missed organ has no HD95, so it would drop out of the HD95 mean unseen: it is flagged, as is
    an organ predicted where the reference has none, and ``outcome_counts`` counts both."""
    ref = np.zeros((8, 8, 4), np.uint8)
    ref[1:4, 1:4] = 1  # liver in the reference, never predicted
    pred = np.zeros_like(ref)
    pred[5:7, 5:7] = 3  # spleen predicted, absent from the reference
    organs = {"liver": 1, "kidneys": 2, "spleen": 3}
    out = case_metrics(pred, ref, organs, annotated=("liver", "kidneys", "spleen"), spacing=(1.0, 1.0, 1.0))
    assert out["liver"] == {"dice": 0.0, "hd95": None, "missed": True, "false_positive": False}
    assert out["spleen"] == {"dice": 0.0, "hd95": None, "missed": False, "false_positive": True}
    assert out["kidneys"] == {"dice": None, "hd95": None, "missed": False, "false_positive": False}
    hit = case_metrics(ref, ref, organs, annotated=("liver",), spacing=(1.0, 1.0, 1.0))["liver"]
    not_annotated = case_metrics(ref, ref, organs, annotated=("liver",), spacing=(1.0, 1.0, 1.0))["spleen"]
    assert outcome_counts([out["liver"], hit, not_annotated]) == {
        "missed": 1, "false_positives": 0, "annotated": 2,
        "present": 2, "dice_below_0.5": 1, "dice_below_0.7": 1, "hd95_above_50mm": 1}  # the miss fails
    assert outcome_counts([out["spleen"], out["kidneys"]]) == {
        "missed": 0, "false_positives": 1, "annotated": 2,
        "present": 0, "dice_below_0.5": 0, "dice_below_0.7": 0, "hd95_above_50mm": 0}


def test_summaries_count_misses_and_false_positives_beside_the_means():
    scheme = get_scheme("abdomen5")
    none = {"dice": None, "hd95": None, "missed": None, "false_positive": None}

    def case(name, liver, spleen):
        metrics = {organ: dict(none) for organ in scheme.organs}
        metrics.update(liver=liver, spleen=spleen)
        return {"case": name, "dataset": "d", "modality": "MRI", "annotated": ["liver", "spleen"], "metrics": metrics}

    hit = {"dice": 0.9, "hd95": 4.0, "missed": False, "false_positive": False}
    missed = {"dice": 0.0, "hd95": None, "missed": True, "false_positive": False}
    fp = {"dice": 0.0, "hd95": None, "missed": False, "false_positive": True}
    summary = {"by_modality": summarise([case("a", hit, fp), case("b", missed, hit), case("c", missed, hit)], scheme)}
    liver, spleen = summary["by_modality"]["MRI"]["liver"], summary["by_modality"]["MRI"]["spleen"]
    assert liver["hd95"]["n"] == 1 and (liver["missed"], liver["false_positives"], liver["annotated"]) == (2, 0, 3)
    assert (spleen["missed"], spleen["false_positives"], spleen["annotated"]) == (0, 1, 3)
    markdown = summary_markdown(summary, scheme)
    assert "| organ | Dice | HD95 (mm) | missed | FP | n |" in markdown
    assert "| liver | 0.300 ± 0.520 | 4.0 ± 0.0 | 2 | 0 | 3 |" in markdown
    assert "| spleen | 0.600 ± 0.520 | 4.0 ± 0.0 | 0 | 1 | 3 |" in markdown
