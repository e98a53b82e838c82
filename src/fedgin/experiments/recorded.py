"""``fedgin experiment`` as the command runs it: the grid (:mod:`.experiment`) or its
cross-validation (:mod:`.folds`), with its provenance in ``out/experiment.json``."""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from pathlib import Path

from ..config import DEFAULT_PRESET, SiteSpec
from .experiment import DEFAULT_METHODS, run_experiment, write_results
from .folds import run_folds, write_cv_results


def run_recorded_experiment(sites: list[SiteSpec], scenarios: list[str], methods: list[str] | None, seeds: int,
                            out: Path, *, argv: list[str], preset: str = DEFAULT_PRESET, rounds: int | None = None,
                            local_epochs: int | None = None, steps_per_epoch: int | None = None,
                            split_file: str | None = None, cache_dir: str | None = None,
                            overlays: bool = True, label_map: dict[str, str] | None = None,
                            folds: int | None = None, context: int | None = None,
                            fov_p: float | None = None) -> Path:
    """``fedgin experiment``: :func:`run_experiment` with its provenance in ``out/experiment.json``;
    ``folds`` K: cross-validated over K folds (:mod:`fedgin.experiments.folds`).

    Before the run: the command (``argv``, the arguments after ``fedgin``), date and machine; after
    it also the wall time, scenarios, methods and seeds, and the report is redrawn with them.
    ``methods`` None: :data:`DEFAULT_METHODS`. Returns the report.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(DEFAULT_METHODS) if methods is None else methods
    meta = {"command": "fedgin " + " ".join(shlex.quote(a) for a in argv),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}"}
    if folds:
        meta["folds"] = folds
    (out / "experiment.json").write_text(json.dumps(meta, indent=2))
    options = dict(preset=preset, rounds=rounds, local_epochs=local_epochs, steps_per_epoch=steps_per_epoch,
                   cache_dir=cache_dir, overlays=overlays, label_map=label_map, context=context, fov_p=fov_p)
    if folds:
        run_folds(sites, scenarios, methods, seeds, out, folds=folds, split_file=split_file, **options)
    else:
        run_experiment(sites, scenarios, methods, seeds, out, split_file=split_file, **options)
    meta["wall_minutes"] = round((time.perf_counter() - start) / 60, 1)
    meta["scenarios"], meta["methods"], meta["seeds"] = scenarios, methods, seeds
    (out / "experiment.json").write_text(json.dumps(meta, indent=2))
    if folds:
        return write_cv_results(out, scenarios, methods, seeds, folds)
    return write_results(out, scenarios, methods, seeds, overlays=overlays)
