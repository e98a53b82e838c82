"""``benchmarks/domain_gap.py`` without training: its options, its refusal of a missing real bundle,
and the report it draws from a result JSON (``--redraw``)."""

import json

import pytest

from conftest import benchmark_module

@pytest.fixture(scope="module")
def domain_gap():
    with benchmark_module("domain_gap") as module:
        yield module


def test_budgets_are_total_steps_and_epochs_give_one_budget(domain_gap):
    phantom = domain_gap.parse_args([])
    assert (phantom.budgets, phantom.steps, phantom.variants) == ([600], 50, ["no-gin", "gin"])
    assert domain_gap.parse_args(["--epochs", "3", "--steps", "10"]).budgets == [30]
    real = domain_gap.parse_args(["--data", "real"])
    assert (real.budgets, real.steps, real.variants) == (
        [1000], 50, ["no-gin", "gin", "gin+ipa", "gin-2v-c2", "gin-clean-c2", "ipa-2v-c2"])
    assert real.score_on == "selection"
    assert real.out.name == "domain_gap_real.json"
    for bad in (["--data", "real", "--budgets", "125"], ["--epochs", "2", "--budgets", "100"],
                ["--variants", "gin,nope"], ["--data", "real", "--train-cases", "3"]):
        with pytest.raises(SystemExit) as exc:
            domain_gap.parse_args(bad)
        assert exc.value.code == 2


def test_a_missing_real_bundle_exits_2_and_writes_nothing(domain_gap, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        domain_gap.main(["--data", "real", "--bundle", str(tmp_path / "absent"), "--work", str(tmp_path / "work"),
                         "--out", str(tmp_path / "out" / "result.json")])
    assert exc.value.code == 2
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "real data bundle not found" in err


def _run(ct: float, mri: float) -> dict:
    def modality(mean: float, cases: int) -> dict:
        organs = {o: {"mean": mean, "sd": 0.0, "n": cases} for o in ("liver", "kidneys", "spleen")}
        organs.update({o: {"mean": None, "sd": None, "n": 0} for o in ("pancreas", "gallbladder")})
        return {**organs, "mean_dice": mean, "cases": cases}

    return {"train_seconds": 10.0, "final_loss": 1.0, "epochs": 5, "steps_per_epoch": 100,
            "by_modality": {"CT": modality(ct, 2), "MRI": modality(mri, 4)}}


def test_the_report_compares_each_gin_variant_with_no_gin_per_budget(domain_gap, tmp_path):
    result = {
        "command": "python benchmarks/domain_gap.py --data real", "date": "2026-01-01T00:00:00+00:00",
        "machine": {"platform": "Linux", "cpu_count": 2, "torch": "2", "threads": 2, "load_average_1min": None},
        "setting": {"data": "real", "train": "5 CT cases", "test": "2 CT + 4 MRI cases"},
        "total_seconds": 60.0,
        "results": {"500": {"no-gin": _run(0.8, 0.2), "gin": _run(0.7, 0.3)},
                    "2000": {"no-gin": _run(0.9, 0.25), "gin": _run(0.9, 0.25)}},
    }
    out = tmp_path / "result.json"
    out.write_text(json.dumps(result))
    domain_gap.main(["--redraw", "--out", str(out)])
    md = out.with_suffix(".md").read_text()

    assert "## 500 steps (5 epochs x 100 steps)" in md and "## 2000 steps" in md
    assert "| gin | MRI (4) | 0.300 | 0.300 | 0.300 | - | - | **0.300** |" in md
    assert "| gin | **0.300** (0.700) | **0.250** (0.900) |" in md  # best MRI of each budget in bold, ties too
    assert "`gin`: MRI 0.300 (+0.100, better), CT 0.700 (-0.100, worse)." in md
    assert "`gin`: MRI 0.250 (+0.000, unchanged), CT 0.900 (+0.000, unchanged)." in md
    assert "'-': pancreas, gallbladder not scored" in md
