"""``fedgin experiment``: method names, limited scenarios, the grid's result files, reuse of finished
runs and of CT-only runs across scenarios.

One tiny grid (4 CT + 4 MRI phantoms, two scenarios, three local methods, one training step each,
no overlays) runs once and is shared; the models are untrained, the tests check the bookkeeping.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from fedgin.cli import main
from fedgin.config import SiteSpec
from fedgin.errors import FedginError
from fedgin.experiments.experiment import aggregate, parse_method, scenario_train_cases

METHODS = ("local-ct", "local-ct+ipa", "local-mri")
SCENARIOS = ("complete", "limited-1to2")


@pytest.mark.parametrize("name, kind, modality, overrides", [
    ("local-ct", "local", "CT", {"gin": False}),
    ("local-ct+gin", "local", "CT", {"gin": True}),
    ("local-mri+ipa", "local", "MRI", {"gin": True, "ipa": True}),
    ("centralized", "centralized", None, {"gin": False}),
    ("fedavg", "federated", None, {"gin": False}),
    ("fedgin", "federated", None, {"gin": True}),
    ("fedgin+ipa", "federated", None, {"gin": True, "ipa": True}),
    ("fedavg+gin1", "federated", None, {"gin": True, "gin_p": 1.0, "ipa": False, "gin_views": 1,
                                        "clean_view": False, "consistency": 0.0}),
    ("fedgin+ipa-p50", "federated", None, {"gin": True, "ipa": True, "gin_p": 0.5}),
    ("local-ct+gin-p5", "local", "CT", {"gin": True, "gin_p": 0.05}),
    ("fedavg+ouyang", "federated", None, {"gin": True, "gin_p": 1.0, "ipa": True, "gin_views": 3,
                                          "clean_view": False, "consistency": 2.0}),
    ("centralized+clean-p50", "centralized", None, {"gin": True, "gin_p": 0.5, "ipa": True, "gin_views": 1,
                                                    "clean_view": True, "consistency": 2.0}),
])
def test_method_names(name, kind, modality, overrides):
    method = parse_method(name)
    assert (method.name, method.kind, method.site_modality, method.train_overrides) == (name, kind, modality, overrides)
    assert method.gin == overrides["gin"]


@pytest.mark.parametrize("name", ["fedgin+gin", "fedavg+dp", "local", "local-ct+gin+ipa",
                                  "fedgin-p50", "fedavg-p50", "local-ct+ipa-p0", "local-ct+ipa-p101"])
def test_unknown_method_names_are_refused(name):
    with pytest.raises(FedginError, match="unknown method"):
        parse_method(name)


@pytest.fixture(scope="module")
def sites(phantom_datasets) -> tuple[Path, Path]:
    return phantom_datasets(4, 4)


def test_limited_scenarios_keep_one_mri_case_per_k_ct_cases(sites):
    ct, mri = sites
    specs = [SiteSpec("ct", str(ct)), SiteSpec("mri", str(mri))]
    modalities = {"ct": "CT", "mri": "MRI"}
    assert scenario_train_cases("complete", specs, modalities, 0, None, "abdomen5") is None
    limits = scenario_train_cases("limited-1to2", specs, modalities, 0, None, "abdomen5")
    assert set(limits) == {"mri"}  # the CT site is never limited
    assert len(limits["mri"]) == 1  # 2 CT training cases of 4 phantoms (1 val, 1 test) // 2
    assert limits == scenario_train_cases("limited-1to2", specs, modalities, 0, None, "abdomen5")
    with pytest.raises(FedginError, match="unknown scenario"):
        scenario_train_cases("limited-half", specs, modalities, 0, None, "abdomen5")


def grid_args(sites: tuple[Path, Path], out: Path, cache: Path) -> list[str]:
    ct, mri = sites
    return ["experiment", "--site", f"ct={ct}", "--site", f"mri={mri}", "--scenario", ",".join(SCENARIOS),
            "--methods", ",".join(METHODS), "--seeds", "1", "--rounds", "1", "--local-epochs", "1",
            "--steps-per-epoch", "1", "--no-overlays", "--out", str(out), "--cache-dir", str(cache)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, sites) -> tuple[Path, str]:
    """The grid's dir and what it printed."""
    out = tmp_path_factory.mktemp("grid") / "exp"
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(grid_args(sites, out, tmp_path_factory.mktemp("cache"))) == 0
    return out, printed.getvalue()


def test_the_grid_writes_one_row_per_scenario_method_seed_case_organ(grid):
    out, _ = grid
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["scenario", "method", "seed", "modality", "case", "organ", "dice", "hd95", "missed",
                            "false_positive"]
    assert {(r["scenario"], r["method"]) for r in rows} == {(s, m) for s in SCENARIOS for m in METHODS}
    # every model scored on the same test cases: one CT and one MRI phantom with seed 0
    cases: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        cases.setdefault((r["scenario"], r["method"]), set()).add(r["case"])
    assert len({frozenset(v) for v in cases.values()}) == 1 and len(next(iter(cases.values()))) == 2
    table = json.loads((out / "results.json").read_text())
    assert table["scenarios"] == list(SCENARIOS) and table["methods"] == list(METHODS)
    report = (out / "report.md").read_text()
    assert "## complete" in report and "## limited-1to2" in report and "local-ct+ipa" in report
    assert "| mean | HD95 mean (mm) | missed / FP |" in report
    # each organ's misses and false positives are counted over the annotated test cases
    for modality in ("CT", "MRI"):
        liver = [r for r in rows if r["scenario"] == "complete" and r["method"] == "local-ct"
                 and r["modality"] == modality and r["organ"] == "liver" and r["missed"] != ""]
        outcomes = table["table"]["complete"]["local-ct"][modality]["liver"]["outcomes"]
        assert outcomes["annotated"] == len(liver) >= 1
        assert outcomes["missed"] == sum(r["missed"] == "True" for r in liver)
        assert outcomes["false_positives"] == sum(r["false_positive"] == "True" for r in liver)


def test_ct_only_runs_are_trained_once_and_copied_into_the_limited_scenario(grid):
    out, log = grid
    for method in ("local-ct", "local-ct+ipa"):
        assert f"[limited-1to2 {method} seed 0] same training as complete, copied" in log
        a = json.loads((out / f"runs/complete/{method}/seed0/eval/summary.json").read_text())
        b = json.loads((out / f"runs/limited-1to2/{method}/seed0/eval/summary.json").read_text())
        assert a["metric_per_case"] == b["metric_per_case"]
    config = json.loads((out / "runs/complete/local-ct+ipa/seed0/ct/config.json").read_text())
    assert config["train"]["gin"] and config["train"]["ipa"]
    # the MRI site is limited: its local model is trained in each scenario, on different cases
    assert "[limited-1to2 local-mri seed 0] training" in log
    limited = json.loads((out / "runs/limited-1to2/local-mri/seed0/mri/config.json").read_text())
    assert len(limited["train_cases"]["mri"]) == 1


def test_a_rerun_reuses_every_finished_run(grid, sites, tmp_path, capsys):
    out, _ = grid
    assert main(grid_args(sites, out, tmp_path / "cache")) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before, reused") == len(SCENARIOS) * len(METHODS)
    assert "training ..." not in printed


def test_a_finished_run_with_another_recipe_is_not_reused(grid, sites, tmp_path, capsys):
    out, _ = grid
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    path = copy / "runs/complete/local-ct+ipa/seed0/ct/config.json"
    config = json.loads(path.read_text())
    config["train"]["gin_p"] = 0.3  # as if an older fedgin had trained it with another recipe
    path.write_text(json.dumps(config))
    # GIN's settings do not matter to a run without GIN (local-ct comes first and is still reused)
    plain = copy / "runs/complete/local-ct/seed0/ct/config.json"
    plain.write_text(json.dumps({**json.loads(plain.read_text()), "train": config["train"] | {"gin": False}}))
    assert main(grid_args(sites, copy, tmp_path / "cache")) == 2
    err = capsys.readouterr().err
    assert "local-ct+ipa/seed0/ct/config.json" in err and "train.gin_p" in err and "another --out" in err


def test_report_puts_the_hand_written_reading_after_the_claims(grid, tmp_path):
    out, _ = grid
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    (copy / "analysis.md").write_text("GIN needs a longer budget here.\n")
    assert main(["report", str(copy), "--no-overlays"]) == 0
    report = (copy / "report.md").read_text()
    assert report.index("## The paper's claims") < report.index("## Reading the results") \
        < report.index("GIN needs a longer budget here.") < report.index("## Overlays")


def test_aggregate_gives_mean_and_sd_over_seeds_of_per_seed_means():
    def row(seed, case, organ, dice):
        return {"scenario": "complete", "method": "fedavg", "seed": seed, "modality": "MRI", "case": case,
                "organ": organ, "dice": dice, "hd95": None if dice is None else 10.0}

    rows = [row(0, "a", "liver", 0.8), row(0, "b", "liver", 0.6), row(0, "a", "spleen", 0.4), row(0, "b", "spleen", None),
            row(1, "a", "liver", 0.9), row(1, "b", "liver", 0.9), row(1, "a", "spleen", 0.5), row(1, "b", "spleen", 0.7)]
    table = aggregate(rows)["complete"]["fedavg"]["MRI"]
    # liver: seed means 0.7 and 0.9; spleen: 0.4 (the null is not a zero) and 0.6
    assert table["liver"]["dice"]["mean"] == pytest.approx(0.8)
    assert table["liver"]["dice"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert table["spleen"]["dice"] == pytest.approx({"mean": 0.5, "sd": 0.1414, "seeds": 2}, abs=1e-4)
    # per seed: (0.7 + 0.4) / 2 = 0.55 and (0.9 + 0.6) / 2 = 0.75
    assert table["mean"]["dice"] == pytest.approx({"mean": 0.65, "sd": 0.1414, "seeds": 2}, abs=1e-4)
    # rows of runs scored before misses were recorded count nothing
    assert table["liver"]["outcomes"] == {"missed": 0, "false_positives": 0, "annotated": 0, "present": 0,
                                          "dice_below_0.5": 0, "dice_below_0.7": 0, "hd95_above_50mm": 0}


def test_aggregate_counts_misses_and_false_positives_over_seeds_and_cases():
    def row(seed, case, organ, dice, missed, fp):
        return {"scenario": "complete", "method": "fedgin", "seed": seed, "modality": "CT", "case": case,
                "organ": organ, "dice": dice, "hd95": None, "missed": missed, "false_positive": fp}

    rows = [row(0, "a", "liver", 0.0, True, False), row(0, "b", "liver", 0.9, False, False),
            row(1, "a", "liver", 0.0, True, False), row(1, "b", "liver", 0.0, False, True),
            row(0, "a", "spleen", None, None, None)]  # not annotated: not counted
    table = aggregate(rows)["complete"]["fedgin"]["CT"]
    assert table["liver"]["outcomes"] == {"missed": 2, "false_positives": 1, "annotated": 4, "present": 3,
                                          "dice_below_0.5": 2, "dice_below_0.7": 2, "hd95_above_50mm": 2}
    assert table["spleen"]["outcomes"] == {"missed": 0, "false_positives": 0, "annotated": 0, "present": 0,
                                           "dice_below_0.5": 0, "dice_below_0.7": 0, "hd95_above_50mm": 0}
