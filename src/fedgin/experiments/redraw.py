"""``fedgin report``: (re)draw the tables and plots of a run dir, a demo dir or an experiment dir."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FedginError
from .run_report import write_run_report


def redraw_report(path: str | Path, *, overlays: bool = True) -> Path:
    """Rewrite the report of ``path`` from what its runs wrote; returns the report.

    An experiment dir (``experiment.json``) gets its results, report and, with ``overlays``, its
    overlay PNGs (they need the runs' models and the test scans); a run dir (``config.json``) and
    a demo dir (``run/config.json``) get their ``report.md``.
    """
    path = Path(path)
    if (path / "experiment.json").exists():
        from .experiment import write_results

        meta = json.loads((path / "experiment.json").read_text())
        if meta.get("folds"):  # cross-validated: every fold's report, then the pooled one
            from .folds import fold_dir, write_cv_results

            for f in range(meta["folds"]):
                if (fold_dir(path, f) / "runs").is_dir():
                    write_results(fold_dir(path, f), meta["scenarios"], meta["methods"], meta["seeds"],
                                  overlays=False)
            return write_cv_results(path, meta["scenarios"], meta["methods"], meta["seeds"], meta["folds"])
        if overlays:  # they need the runs' models and the test scans
            from .overlays import draw_overlays

            draw_overlays(path, meta["scenarios"], meta["methods"])
        return write_results(path, meta["scenarios"], meta["methods"], meta["seeds"], overlays=overlays)
    if (path / "config.json").exists():
        eval_dir = path / "eval" if (path / "eval" / "summary.json").exists() else None
        return write_run_report(path, eval_dir, path / "report.md", title=f"fedgin run {path.name}")
    if (path / "run" / "config.json").exists():  # a demo dir
        return write_run_report(path / "run", path / "eval", path / "report.md", title="fedgin demo")
    raise FedginError(f"{path}: not a run dir, demo dir or experiment dir")
