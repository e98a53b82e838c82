"""``fedgin report``: (re)draw the tables and plots of a run dir, a demo dir or an experiment dir,
and the QA page (``qa.html``) of a run dir, an evaluation folder or a prediction folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.labels import get_scheme
from ..errors import FedginError
from ..evaluation.prediction import case_name
from ..evaluation.qa import QA_VIEWS, evaluation_page, prediction_page, rebuild_prediction_views
from .run_report import write_run_report


def redraw_qa(folder: Path, log=print) -> Path:
    """Redraw ``folder/qa.html`` of an evaluation (``summary.json``; its images from ``qa.npz``, a
    table-only page without one) or of a ``fedgin predict`` folder (``provenance.json``; without
    ``qa.npz``, the images are read again from the inputs it names and its label maps)."""
    folder = Path(folder)
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
        if not (folder / QA_VIEWS).is_file():
            log(f"{folder}: no {QA_VIEWS} (evaluated with --no-qa?): the page gets the table, no images")
        return evaluation_page(folder, summary, get_scheme(summary["scheme"]["name"]))
    provenance = json.loads((folder / "provenance.json").read_text())
    scheme = get_scheme(provenance["scheme"]["name"])
    if not (folder / QA_VIEWS).is_file():
        inputs = [Path(p) for p in provenance.get("inputs", [])]
        if rebuild_prediction_views(folder, provenance, scheme, [(case_name(p), p) for p in inputs]) is None:
            log(f"{folder}: neither {QA_VIEWS} nor the inputs named in provenance.json: the page has no cases")
    return prediction_page(folder, provenance, scheme)


def redraw_report(path: str | Path, *, overlays: bool = True, log=print) -> Path:
    """Rewrite the report of ``path`` from what its runs wrote; returns the report.

    An experiment dir (``experiment.json``) gets its results, report and, with ``overlays``, its
    overlay PNGs (they need the runs' models and the test scans); a run dir (``config.json``) and
    a demo dir (``run/config.json``) get their ``report.md`` and, where their evaluation kept its
    images (``eval/qa.npz``), ``eval/qa.html``; an evaluation folder (``summary.json``) and a
    prediction folder (``provenance.json``) get their ``qa.html``.
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
    for run, eval_dir, report, title in ((path, path / "eval", path / "report.md", f"fedgin run {path.name}"),
                                         (path / "run", path / "eval", path / "report.md", "fedgin demo")):
        if (run / "config.json").exists():
            evaluated = (eval_dir / "summary.json").exists()
            if evaluated and (eval_dir / QA_VIEWS).exists():
                log(f"wrote {redraw_qa(eval_dir, log)}")
            return write_run_report(run, eval_dir if evaluated else None, report, title=title)
    if (path / "summary.json").exists() or (path / "provenance.json").exists():
        return redraw_qa(path, log)
    raise FedginError(f"{path}: not a run dir, demo dir, experiment dir, evaluation folder or prediction folder")
