"""``fedgin experiment --folds K``: every ground-truth patient of each site is tested exactly once,
model-labelled cases never, validation never on a test case; the grid runs per fold, resumes, and
the results pool the folds."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest
import torch

from fedgin.cli import main
from fedgin.config import SiteSpec
from fedgin.errors import FedginError
from fedgin.experiments.folds import fold_splits, model_labelled_cases, write_fold_split_files

IDS = [f"case_{i:02d}" for i in range(11)]


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_the_test_folds_partition_the_candidates_and_validation_never_tests(folds):
    never = {"case_03", "case_07"}
    splits = fold_splits(IDS, folds, never_test=never)
    assert len(splits) == folds
    tested = [c for s in splits for c in s.test]
    assert sorted(tested) == sorted(set(IDS) - never)  # each candidate exactly once
    sizes = [len(s.test) for s in splits]
    assert max(sizes) - min(sizes) <= 1
    for s in splits:
        assert sorted(s.train + s.val + s.test) == IDS  # nothing lost, nothing twice
        assert not set(s.val) & never and len(s.val) == 1
        assert never <= set(s.train)
    assert splits == fold_splits(IDS, folds, never_test=never)  # fixed: the same folds every time
    assert fold_splits(IDS, folds, never_test=never) != fold_splits(IDS[1:], folds, never_test=never)


def test_too_few_cases_for_the_folds_are_refused():
    with pytest.raises(FedginError, match="fewer than --folds 5"):
        fold_splits(IDS[:6], 5, never_test=set(IDS[:2]), name="ct")


def test_the_shared_bundle_folds_test_every_ground_truth_patient_once(shared_data, tmp_path):
    sites = [SiteSpec("ct", str(shared_data / "Dataset801_AbdomenCT")),
             SiteSpec("mri", str(shared_data / "Dataset802_AbdomenMR"))]
    assert model_labelled_cases(shared_data / "Dataset801_AbdomenCT") == {"ts_example_ct"}
    paths = write_fold_split_files(sites, 5, tmp_path)
    splits = [json.loads(p.read_text())["datasets"] for p in paths]
    ct = [c for s in splits for c in s["Dataset801_AbdomenCT"]["test"]]
    mri = [c for s in splits for c in s["Dataset802_AbdomenMR"]["test"]]
    assert len(ct) == len(set(ct)) == 7 and "ts_example_ct" not in ct
    assert len(mri) == len(set(mri)) == 14 and "ts_example_mr" not in mri
    assert write_fold_split_files(sites, 5, tmp_path) == paths  # a resumed grid keeps its folds
    with pytest.raises(FedginError, match="other folds"):
        write_fold_split_files(sites, 4, tmp_path)


@pytest.mark.slow
def test_a_cross_validated_grid_pools_every_fold(phantom_datasets, tmp_path):
    ct, mri = phantom_datasets(4, 4)
    args = ["experiment", "--site", f"ct={ct}", "--site", f"mri={mri}", "--methods", "local-ct",
            "--folds", "2", "--rounds", "1", "--local-epochs", "1", "--steps-per-epoch", "1", "--no-overlays",
            "--out", str(tmp_path / "cv"), "--cache-dir", str(tmp_path / "cache")]
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    out = tmp_path / "cv"
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cases = {(r["fold"], r["modality"], r["case"]) for r in rows}
    assert {f for f, _, _ in cases} == {"0", "1"}
    assert len({c for _, _, c in cases}) == len(cases) == 8  # every phantom tested once over the folds
    results = json.loads((out / "results.json").read_text())
    assert results["folds"] == 2 and results["finished_folds"] == [0, 1]
    assert "Cross-validated over 2 folds" in (out / "report.md").read_text()
    assert (out / "folds" / "fold1" / "report.md").exists()

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # resumed: nothing retrained
        assert main(args) == 0
    assert printed.getvalue().count("done before, reused") == 2
    assert main(["report", str(out), "--no-overlays"]) == 0
    assert main(args + ["--split", str(out / "folds" / "fold0" / "split.json")]) == 2
