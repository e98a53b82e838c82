"""``fedgin experiment --folds K``: the grid cross-validated, so a comparison rests on every
patient of the sites and not on one fixed test split.

The scheme (nnU-Net's K-fold cross-validation, per site, with the test split folded in):

- per site, every labelled case whose label is ground truth is a *test candidate*; cases whose
  manifest says their label is a model's prediction (``label_kind: model_prediction``, as the
  shared bundle's TotalSegmentator examples) are never tested on and always train;
- the candidates are shuffled with a fixed seed (:data:`FOLD_SEED`, the same for every training
  seed, so seeds vary the training and not the folds) and cut into K folds of near-equal size;
- fold ``f`` tests on its candidates; of the site's other cases one (two from 12 on) is drawn as
  validation (post-processing decision, logged Dice; never a test case and never a model-labelled
  one), the rest train; the shipped split file is not used.

So each test-candidate patient is tested exactly once over the K folds. Each fold is a complete
experiment dir, ``out/folds/fold<f>/`` (its ``split.json``, runs, results and report; resumable
like any grid), and ``out/`` gets the results pooled over folds: per (scenario, method, seed, modality,
organ) the mean over every patient of every fold, then mean +- sd over seeds.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ..config import SiteSpec
from ..data.datasets import open_dataset
from ..data.labels import get_scheme
from ..data.splits import Split
from ..errors import FedginError
from .experiment import RESULT_FIELDS, aggregate, collect_rows, csv_row, run_experiment
from .grid_report import write_experiment_report
from .layout import run_dir

#: the seed of the fold assignment (nnU-Net's, for the same reason: folds fixed across runs)
FOLD_SEED = 12345
MODEL_LABEL = "model_prediction"


def fold_dir(out: Path, fold: int) -> Path:
    return Path(out) / "folds" / f"fold{fold}"


def model_labelled_cases(root: Path) -> set[str]:
    """Cases whose ``manifest.json`` entry says their label is a model's prediction."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        return set()
    try:
        entries = json.loads(path.read_text()).get("cases", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {e["case"] for e in entries if isinstance(e, dict) and e.get("label_kind") == MODEL_LABEL and "case" in e}


def fold_splits(case_ids: list[str], folds: int, *, never_test: set[str] | frozenset = frozenset(),
                name: str = "dataset") -> list[Split]:
    """The ``folds`` splits of one site (module docstring): test folds partition the cases not in
    ``never_test``; validation is drawn from the rest of each fold."""
    ids = sorted(case_ids)
    candidates = [c for c in ids if c not in never_test]
    if folds < 2:
        raise FedginError(f"--folds must be at least 2, got {folds}")
    if len(candidates) < folds:
        raise FedginError(f"{name}: {len(candidates)} case(s) to test on, fewer than --folds {folds}")
    order = np.random.default_rng(FOLD_SEED).permutation(len(candidates))
    parts = np.array_split(np.array([candidates[i] for i in order]), folds)
    splits = []
    for f, part in enumerate(parts):
        test = sorted(str(c) for c in part)
        rest = [c for c in ids if c not in test]
        drawable = [c for c in rest if c not in never_test]
        n_val = (2 if len(rest) >= 12 else 1) if len(drawable) >= 2 else 0
        pick = np.random.default_rng([FOLD_SEED, folds, f]).permutation(len(drawable))[:n_val]
        val = sorted(drawable[i] for i in pick)
        train = sorted(c for c in rest if c not in val)
        splits.append(Split(tuple(train), tuple(val), tuple(test), source=f"fold {f} of {folds}"))
    return splits


def write_fold_split_files(sites: list[SiteSpec], folds: int, out: Path,
                           label_map: dict[str, str] | None = None) -> list[Path]:
    """``out/folds/fold<f>/split.json`` for every fold, in the split-file format (every site's
    dataset); an existing file is kept when it says the same (a resumed grid), refused otherwise."""
    scheme = get_scheme("abdomen5")
    per_dataset = {}
    for site in sites:
        dataset = open_dataset(site.dataset, scheme, label_map=label_map)
        ids = [c.case_id for c in dataset.cases]
        per_dataset[dataset.name] = fold_splits(ids, folds, never_test=model_labelled_cases(dataset.root),
                                                name=site.name)
    paths = []
    for f in range(folds):
        payload = {"description": f"fedgin experiment --folds {folds}: fold {f} (fedgin.experiments.folds)",
                   "datasets": {name: {k: v for k, v in splits[f].to_dict().items() if k != "source"}
                                for name, splits in per_dataset.items()}}
        path = fold_dir(out, f) / "split.json"
        if path.exists():
            if json.loads(path.read_text()).get("datasets") != payload["datasets"]:
                raise FedginError(f"{path}: this experiment dir was cross-validated over other folds or cases; "
                                  "use another --out")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=2))
        paths.append(path)
    return paths


def run_folds(sites: list[SiteSpec], scenarios: list[str], methods: list[str], seeds: int, out: Path, *,
              folds: int, split_file: str | None = None, overlays: bool = True,
              label_map: dict[str, str] | None = None, log=print, **options) -> Path:
    """Every fold's grid (:func:`fedgin.experiments.experiment.run_experiment`), then the pooled
    results and report in ``out``."""
    if split_file:
        raise FedginError("--folds makes its own splits (every case tested once); it does not take --split")
    paths = write_fold_split_files(sites, folds, out, label_map)
    for f, path in enumerate(paths):
        log(f"fold {f + 1}/{folds} -> {path.parent}")
        run_experiment(sites, scenarios, methods, seeds, path.parent, split_file=str(path), overlays=overlays,
                       label_map=label_map, log=log, **options)
    return write_cv_results(out, scenarios, methods, seeds, folds)


def collect_fold_rows(out: Path, scenarios: list[str], methods: list[str], seeds: int, folds: int) -> list[dict]:
    rows = []
    for f in range(folds):
        rows += [{**r, "fold": f} for r in collect_rows(fold_dir(out, f), scenarios, methods, seeds)]
    return rows


def finished_folds(out: Path, scenarios: list[str], methods: list[str], seeds: int, folds: int) -> list[int]:
    """The folds whose every (scenario, method, seed) run has its evaluation."""
    return [f for f in range(folds) if all((run_dir(fold_dir(out, f), s, m, seed) / "eval" / "summary.json").exists()
                                           for s in scenarios for m in methods for seed in range(seeds))]


def write_cv_results(out: Path, scenarios: list[str], methods: list[str], seeds: int, folds: int) -> Path:
    """``results.csv`` (a ``fold`` column), ``results.json`` and ``report.md`` pooled over the folds."""
    rows = collect_fold_rows(out, scenarios, methods, seeds, folds)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["fold", *RESULT_FIELDS])
    writer.writeheader()
    for r in rows:
        writer.writerow({"fold": r["fold"], **csv_row(r)})
    (out / "results.csv").write_text(buf.getvalue())
    table = aggregate(rows)
    done = finished_folds(out, scenarios, methods, seeds, folds)
    (out / "results.json").write_text(json.dumps({"scenarios": scenarios, "methods": methods, "seeds": seeds,
                                                  "folds": folds, "finished_folds": done, "table": table}, indent=2))
    patients = {(r["modality"], r["case"]) for r in rows}
    notes = [f"**Cross-validated over {folds} folds** (`fedgin.experiments.folds`): every ground-truth-labelled "
             "patient of each site is tested once, by the models of the fold that held it out; the means pool "
             f"every patient of every fold per seed. Finished folds: {len(done)} of {folds} "
             f"({', '.join(map(str, done)) or 'none'}); patients scored: "
             f"{sum(m == 'CT' for m, _ in patients)} CT, {sum(m == 'MRI' for m, _ in patients)} MRI. "
             "Each fold's own report: `folds/fold<f>/report.md`.", ""]
    return write_experiment_report(out, scenarios, methods, seeds, table, notes=notes, overlays=False)
