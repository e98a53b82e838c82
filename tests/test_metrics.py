"""Per-case Dice and HD95 on hand-made volumes with known answers."""

import numpy as np
import pytest

from fedgin.engine.metrics import case_metrics, dice_score, hd95_mm, mean_sd


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


def test_case_metrics_null_rules():
    ref = np.zeros((8, 8, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:4, 1:4] = 1
    pred[1:4, 1:4] = 1
    pred[5:7, 5:7] = 2  # predicts kidneys where the case does not annotate them
    organs = {"liver": 1, "kidneys": 2, "spleen": 3}
    out = case_metrics(pred, ref, organs, annotated=("liver", "spleen"), spacing=(1.0, 1.0, 1.0))
    assert out["liver"]["dice"] == 1.0
    assert out["kidneys"] == {"dice": None, "hd95": None}  # not annotated
    assert out["spleen"] == {"dice": None, "hd95": None}  # absent from both


def test_mean_sd_skips_nulls():
    assert mean_sd([1.0, None, 0.5]) == {"mean": 0.75, "sd": pytest.approx(0.353553, abs=1e-6), "n": 2}
    assert mean_sd([None]) == {"mean": None, "sd": None, "n": 0}
