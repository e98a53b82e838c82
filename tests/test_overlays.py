"""Prediction overlays in the experiment report: ``fedgin experiment`` draws them, ``fedgin report``
redraws them, ``--no-overlays`` leaves them out.

One tiny experiment (4 CT + 4 partially labelled MRI phantoms, three non-federated methods, one
training step each) is run once through ``fedgin.cli.main`` and shared; tests that change it work
on a copy. The models are untrained: the tests check files, panels and slices, not predictions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from fedgin.cli import main
from fedgin.data.datasets import CaseRef
from fedgin.data.labels import get_scheme
from fedgin.experiments.overlays import (DPI, OVERLAY_DIR, PANEL_INCHES, annotated_reference, case_mean_dice,
                                         display_window, draw_overlays, first_cases, foreground_slice)

METHODS = ("local-ct", "local-mri", "centralized")
#: The test split of 4 phantoms per site with seed 0: one case each.
PNGS = ["complete_phantom_ct_002.png", "complete_phantom_mr_002.png"]


@pytest.fixture(scope="module")
def sites(phantom_datasets) -> tuple[Path, Path]:
    return phantom_datasets(4, 4, mri_partial=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Passed explicitly: the autouse ``FEDGIN_CACHE_DIR`` fixture is function-scoped."""
    return tmp_path_factory.mktemp("overlays-cache")


def experiment_args(sites: tuple[Path, Path], out: Path, cache_dir: Path, *extra: str) -> list[str]:
    ct, mri = sites
    return ["experiment", "--site", f"ct={ct}", "--site", f"mri={mri}", "--methods", ",".join(METHODS),
            "--rounds", "1", "--local-epochs", "1", "--steps-per-epoch", "1", "--out", str(out),
            "--cache-dir", str(cache_dir), *extra]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, sites, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("experiment") / "exp"
    torch.set_num_threads(1)
    assert main(experiment_args(sites, out, cache_dir)) == 0
    return out


def copy_without_overlays(experiment: Path, dest: Path) -> Path:
    return Path(shutil.copytree(experiment, dest, ignore=shutil.ignore_patterns(OVERLAY_DIR)))


def png_panels(path: Path) -> int:
    """Panels in an overlay PNG: each is PANEL_INCHES x DPI pixels wide."""
    width = plt.imread(path).shape[1]
    panel = round(PANEL_INCHES * DPI)
    assert width % panel == 0, width
    return width // panel


def test_experiment_draws_one_overlay_per_test_case_with_a_panel_per_method(experiment):
    scored = json.loads((experiment / "runs/complete/local-ct/seed0/eval/summary.json").read_text())
    assert sorted(f"complete_{r['case']}.png" for r in scored["metric_per_case"]) == PNGS
    assert sorted(p.name for p in (experiment / OVERLAY_DIR).iterdir()) == PNGS
    for name in PNGS:
        assert png_panels(experiment / OVERLAY_DIR / name) == 2 + len(METHODS)  # image, reference, methods

    report = (experiment / "report.md").read_text()
    overlays = report[report.index("## Overlays"):]
    assert "patient images" in overlays and "--no-overlays" in overlays
    for name in PNGS:
        assert f"]({OVERLAY_DIR}/{name})" in overlays


def test_report_redraws_the_overlays_of_a_moved_experiment(experiment, tmp_path, capsys):
    moved = copy_without_overlays(experiment, tmp_path / "moved")
    assert main(["report", str(moved)]) == 0
    assert sorted(p.name for p in (moved / OVERLAY_DIR).iterdir()) == PNGS
    assert "overlays complete: 2 PNG(s)" in capsys.readouterr().out


def test_no_overlays_draws_none_and_says_so(experiment, sites, cache_dir, tmp_path):
    copy = copy_without_overlays(experiment, tmp_path / "copy")
    assert main(["report", str(copy), "--no-overlays"]) == 0
    assert not (copy / OVERLAY_DIR).exists()
    assert main(experiment_args(sites, copy, cache_dir, "--no-overlays")) == 0  # every run reused, report rewritten
    assert not (copy / OVERLAY_DIR).exists()
    report = (copy / "report.md").read_text()
    assert "Not drawn (`--no-overlays`)" in report and "patient images" in report
    assert "![" not in report[report.index("## Overlays"):]


def test_a_method_without_a_run_or_a_model_is_left_out_with_a_note(experiment, tmp_path):
    copy = copy_without_overlays(experiment, tmp_path / "copy")
    # the copy's own models count: local-mri's is gone here, though the original still has it
    (copy / "runs/complete/local-mri/seed0/mri/checkpoints/last.pt").unlink()
    log: list[str] = []
    written = draw_overlays(copy, ["complete"], ["local-ct", "fedavg", "local-mri", "centralized"], log=log.append)
    assert sorted(p.name for p in written) == PNGS
    assert all(png_panels(p) == 2 + 2 for p in written)  # local-ct and centralized
    assert "overlays complete: left out, no finished run (seed 0): fedavg" in log, log
    assert "overlays complete: left out, no usable model: local-mri" in log, log

    assert draw_overlays(copy, ["limited-1to2"], ["local-ct"], log=log.append) == []  # never run: no error
    assert "not drawn" in log[-1]


def test_foreground_slice_is_the_one_with_the_most_reference_voxels():
    label = np.zeros((5, 4, 4), dtype=np.uint8)
    label[1, :2, :2] = 1  # 4 voxels
    label[3, :3, :3] = 2  # 9 voxels
    label[4, :3, :3] = 3  # 9 voxels: a tie goes to the first
    assert foreground_slice(label) == 3
    assert foreground_slice(np.zeros((5, 4, 4), dtype=np.uint8)) == 2  # empty: the middle slice


def test_reference_keeps_only_annotated_organs_and_dice_averages_them():
    scheme = get_scheme("abdomen5")
    ids = scheme.label_ids
    label = np.array([[[ids["liver"], ids["pancreas"], ids["spleen"], 0]]], dtype=np.uint8)
    shown = annotated_reference(label, ("liver", "spleen"), scheme)
    assert shown.tolist() == [[[ids["liver"], 0, ids["spleen"], 0]]]
    volume = np.zeros((2, 1, 4), dtype=np.uint8)
    volume[0, 0, 0] = ids["liver"]
    volume[1] = ids["pancreas"]  # more voxels, but not annotated: not reference
    assert foreground_slice(annotated_reference(volume, ("liver", "spleen"), scheme)) == 0

    ref = CaseRef("case_1", "Dataset002_MR", "MRI", Path("case_1_0000.nii.gz"), annotated=("liver", "spleen"))
    metrics = {"liver": {"dice": 0.8}, "spleen": {"dice": 0.4}, "pancreas": {"dice": None}}
    summary = {"metric_per_case": [
        {"case": "case_1", "dataset": "Dataset001_CT", "annotated": ["liver"], "metrics": {"liver": {"dice": 0.0}}},
        {"case": "case_1", "dataset": "Dataset002_MR", "annotated": ["liver", "spleen"], "metrics": metrics},
    ]}
    assert case_mean_dice(summary, ref) == pytest.approx(0.6)
    assert case_mean_dice({"metric_per_case": []}, ref) is None


def test_first_cases_are_the_first_per_modality_by_case_id():
    refs = [CaseRef(c, "d", m, Path(f"{c}.nii.gz")) for c, m in
            [("mr_9", "MRI"), ("ct_2", "CT"), ("mr_1", "MRI"), ("ct_1", "CT"), ("ct_3", "CT")]]
    assert [r.case_id for r in first_cases(refs, 1)] == ["ct_1", "mr_1"]
    assert [r.case_id for r in first_cases(refs, 2)] == ["ct_1", "ct_2", "mr_1", "mr_9"]


def test_the_grey_window_follows_the_slice_not_a_fixed_unit_range():
    plane = np.linspace(-2.0, 3.0, 101 * 100, dtype=np.float32).reshape(101, 100)  # z-scored: not in [0, 1]
    plane[0, :5] = 50.0  # a few bright voxels do not set the window
    lo, hi = display_window(plane)
    assert lo == pytest.approx(float(np.percentile(plane, 1)))
    assert hi == pytest.approx(float(np.percentile(plane, 99))) and hi < 3.0
    assert lo < 0.0 and hi > 1.0
    assert display_window(np.full((4, 4), -0.7)) == pytest.approx((-1.2, -0.2))  # flat: still a window
