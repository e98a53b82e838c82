"""benchmarks/cv_grid.py: what an export copies into the grid's record."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def cv_grid():
    with benchmark_module("cv_grid") as module:
        yield module


def _write(path: Path, text: str = "{}") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _experiment(work: Path, method: str, finished: bool = True) -> None:
    _write(work / "results.json", f'{{"methods": ["{method}"]}}')
    _write(work / "folds" / "fold0" / "split.json")
    run = work / "folds" / "fold0" / "runs" / "complete" / method / "seed0"
    _write(run / "config.json")
    _write(run / "metrics.jsonl", "")
    _write(run / "checkpoints" / "final.json")  # never exported
    _write(run / "eval" / "qa.html", "<html>")  # never exported
    if finished:
        _write(run / "eval" / "summary.json")


def test_export_copies_finished_runs_and_pooled_files_and_runs_only_adds_runs(tmp_path, cv_grid):
    record = tmp_path / "record"
    _experiment(tmp_path / "grid", "fedgin")
    _experiment(tmp_path / "grid", "fedavg", finished=False)
    copied = {p.relative_to(record).as_posix() for p in cv_grid.export(tmp_path / "grid", record)}
    run = "folds/fold0/runs/complete/fedgin/seed0"
    assert copied == {"results.json", "folds/fold0/split.json", f"{run}/config.json", f"{run}/metrics.jsonl",
                      f"{run}/eval/summary.json"}
    # a second experiment over the same folds adds its runs and leaves the grid's pooled files alone
    _experiment(tmp_path / "more", "fedgin+fov")
    copied = {p.relative_to(record).as_posix() for p in cv_grid.export(tmp_path / "more", record, runs_only=True)}
    assert copied == {f"folds/fold0/runs/complete/fedgin+fov/seed0/{name}"
                      for name in ("config.json", "metrics.jsonl", "eval/summary.json")}
    assert "fov" not in (record / "results.json").read_text()
