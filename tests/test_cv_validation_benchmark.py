"""benchmarks/cv_validation.py: the final model's validation Dice per run and fold, and paired
comparisons, on a hand-made record."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import benchmark_module


def _run(record: Path, fold: int, method: str, rows: list[dict], finished: bool = True) -> None:
    run = record / "folds" / f"fold{fold}" / "runs" / "complete" / method / "seed0"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run / "eval" / "summary.json").write_text("{}")


def _federated(last: int, ct: dict, mri: dict) -> list[dict]:
    early = {"liver": 0.1, "kidneys": 0.1, "spleen": 0.1, "pancreas": 0.0}
    return [{"round": r, "site": s, "modality": m, "dice": d if r == last else early}
            for r in range(1, last + 1) for s, m, d in (("ct", "CT", ct), ("mri", "MRI", mri))]


def test_final_validation_comparisons_and_table(tmp_path):
    record = tmp_path / "record"
    # fold 0: the last round counts, pancreas is not one of the three organs, None is left out
    _run(record, 0, "fedgin", _federated(3, {"liver": 0.9, "kidneys": 0.8, "spleen": 0.7, "pancreas": 0.0},
                                         {"liver": 0.6, "kidneys": None, "spleen": 0.8}))
    _run(record, 0, "fedgin+fov", _federated(2, {"liver": 0.9, "kidneys": 0.9, "spleen": 0.9},
                                             {"liver": 0.7, "kidneys": 0.7, "spleen": 0.7}))
    _run(record, 1, "fedgin", _federated(2, {"liver": 0.5, "kidneys": 0.5, "spleen": 0.5},
                                         {"liver": 0.5, "kidneys": 0.5, "spleen": 0.5}))
    _run(record, 1, "fedgin+fov", _federated(2, {"liver": 1.0, "kidneys": 1.0, "spleen": 1.0},
                                             {"liver": 1.0, "kidneys": 1.0, "spleen": 1.0}), finished=False)
    # centralized logs epochs, one row per site
    _run(record, 1, "centralized", [{"epoch": e, "site": "ct", "modality": "CT",
                                     "dice": {"liver": 0.2 * e, "kidneys": 0.2 * e, "spleen": 0.2 * e}}
                                    for e in (1, 2)])
    with benchmark_module("cv_validation") as module:
        out = tmp_path / "val.json"
        result = module.main(["--record", str(record), "--out", str(out), "--compare", "fedgin+fov:fedgin"])
    assert result["runs"]["fedgin"] == {"0": {"CT": 0.8, "MRI": 0.7}, "1": {"CT": 0.5, "MRI": 0.5}}
    assert result["runs"]["centralized"] == {"1": {"CT": 0.4}}
    assert "1" not in result["runs"]["fedgin+fov"]  # unfinished: not read
    (c,) = result["comparisons"]
    assert c["folds"] == [0]
    assert c["CT"] == {"a": 0.9, "b": 0.8, "difference": 0.1, "per_fold": {0: 0.1}}
    assert c["MRI"]["difference"] == 0.0
    text = out.with_suffix(".md").read_text()
    assert "| fedgin+fov - fedgin | 0 | 0.900 / 0.800 | +0.100 (0: +0.100) |" in text
