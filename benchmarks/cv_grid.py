"""The cross-validated grid of issue 22, run across sessions: ``fedgin experiment --folds 3`` on the
shared bundle, both scenarios, the default methods, the default (``standard``) preset, one seed.

The grid takes many hours of CPU on 2 cores, more than one session, and a work dir does not
outlive its session, so this script keeps the grid's *record* in the repository
(``docs/results/cv3/``): every file of the experiment dir but checkpoints and patient images
(``*.json``, ``*.jsonl``, ``*.md``, ``*.csv``; no ``checkpoints/``, ``qa.html``, ``qa.npz``). A run
whose ``eval/summary.json`` and ``config.json`` are there counts as finished for ``fedgin experiment``
(it reuses it and checks that its recipe is this one), so:

- ``--restore`` copies the record into the work dir (files not there yet), so a new session's run
  resumes where the last stopped; a run that was training when its session ended starts again;
- the grid then runs in the work dir (``fedgin experiment ... --out WORK``, in a child process);
- ``--export`` copies what is finished back into the record (commit it with ``git add -f
  docs/results/cv3``: the folder is in ``.gitignore`` so that ``flwr run`` leaves it out of the Flower
  app it packages, whose paths may be at most 10 deep; run it while the grid runs to commit
  the finished runs; it copies only runs with their evaluation, and the pooled results).

Usage::

    python benchmarks/cv_grid.py --work /work/runs/cv3 --restore --run --export   # a session's share
    python benchmarks/cv_grid.py --work /work/runs/cv3 --export                   # while it runs

3 folds, not 5: 2 scenarios x 6 methods x 5 folds is about 10 h of CPU here, 3 folds about 6 h;
every ground-truth patient is still tested once (7 CT, 14 MRI).

Methods: the experiment's defaults and ``local-ct+ipa-p100``, the CT-only model with GIN + IPA on
every training slice, which the CT-only probe favours for zero-shot MRI
(``docs/results/domain_gap_real_gin_p.md``: 0.556 against the default recipe's 0.456 on the
selection cases, at 6000 steps in 2.5D); it was added after fold 1's first runs, so the grid runs
it for each fold when it resumes (a local CT run, shared by both scenarios, about 12 min).

The grid trains every method on whole fields (``--fov-p 0``, :data:`GRID_FOV_P`), as it was recorded.
FedGIN and FedAvg with the random field-of-view windows that the ``standard`` preset now trains with
were run as a second experiment over the record's split files and added to it::

    fedgin experiment --site ct=... --site mri=... --scenario complete --methods fedgin+fov,fedavg+fov \
        --folds 3 --out /work/runs/cvfov            # folds/fold<f>/split.json copied from the record first
    python benchmarks/cv_grid.py --work /work/runs/cvfov --export --runs-only
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT  # noqa: E402

BUNDLE = ROOT.parent / "shared" / "data" / "abdomen-ct-mr"
RECORD = RESULTS / "cv3"
FOLDS = 3
SCENARIOS = "complete,limited-1to5"
METHODS = "local-ct,local-ct+gin,local-mri,centralized,fedavg,fedgin,local-ct+ipa-p100"
#: the grid was recorded before the field-of-view windows became the `standard` preset's (they
#: were off for every method); a resumed grid keeps them off, so it trains what it recorded. The
#: windows' own runs (fedgin+fov, fedavg+fov) set theirs in their recipe.
GRID_FOV_P = 0.0
KEPT = (".json", ".jsonl", ".md", ".csv")
LEFT_OUT_DIRS = {"checkpoints", "overlays"}
LEFT_OUT_FILES = {"qa.html", "qa.npz"}


def kept(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return (path.is_file() and path.suffix in KEPT and path.name not in LEFT_OUT_FILES
            and not LEFT_OUT_DIRS.intersection(parts))


def finished_runs(work: Path) -> list[Path]:
    """Run dirs (``.../runs/<scenario>/<method>/seed<k>``) with their evaluation."""
    return sorted(p.parent.parent for p in work.glob("folds/fold*/runs/*/*/seed*/eval/summary.json"))


def export(work: Path, record: Path, runs_only: bool = False) -> list[Path]:
    """Copy the finished runs and the experiment's own files (split files, results, reports) from
    ``work`` into ``record``; returns the files copied. ``runs_only``: the finished runs alone (a
    second experiment dir over the same folds, e.g. one more method, adds its runs to the record
    without replacing the grid's pooled files)."""
    copied = []
    sources = [] if runs_only else [p for p in work.glob("*") if p.is_file()]
    sources += [] if runs_only else [p for p in work.glob("folds/fold*/*") if p.is_file()]
    for run in finished_runs(work):
        sources += [p for p in run.rglob("*")]
    for path in sources:
        if kept(path, work):
            dest = record / path.relative_to(work)
            if not dest.exists() or dest.read_bytes() != path.read_bytes():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
                copied.append(dest)
    return copied


def restore(record: Path, work: Path) -> list[Path]:
    """Copy the record's files into ``work`` where they are not there yet."""
    copied = []
    for path in sorted(record.rglob("*")):
        dest = work / path.relative_to(record)
        if path.is_file() and not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            copied.append(dest)
    return copied


def experiment_command(work: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "fedgin.cli", "experiment",
            f"--site=ct={BUNDLE / 'Dataset801_AbdomenCT'}", f"--site=mri={BUNDLE / 'Dataset802_AbdomenMR'}",
            "--scenario", SCENARIOS, "--methods", METHODS, "--folds", str(FOLDS), "--seeds", "1", "--out", str(work),
            "--cache-dir", str(cache), "--no-overlays", "--fov-p", str(GRID_FOV_P)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="the experiment dir (outside the repository)")
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: WORK/../cache")
    parser.add_argument("--restore", action="store_true", help="copy the record into WORK first")
    parser.add_argument("--run", action="store_true", help="run (resume) the grid in WORK")
    parser.add_argument("--export", action="store_true", help="copy what is finished into the record")
    parser.add_argument("--runs-only", action="store_true",
                        help="with --export: copy the finished runs only, not WORK's pooled results and reports "
                             "(WORK is another experiment over the record's folds)")
    args = parser.parse_args(argv)
    if not (args.restore or args.run or args.export):
        parser.error("nothing to do: give --restore, --run and/or --export")
    if args.restore and args.record.is_dir():
        print(f"restored {len(restore(args.record, args.work))} file(s) into {args.work}", flush=True)
    rc = 0
    if args.run:
        if not BUNDLE.is_dir():
            print(f"the shared bundle is not at {BUNDLE}", file=sys.stderr)
            return 2
        cache = args.cache_dir or args.work.parent / "cache"
        rc = subprocess.run(experiment_command(args.work, cache)).returncode
    if args.export:
        files = export(args.work, args.record, runs_only=args.runs_only)
        print(f"exported {len(files)} file(s) of {len(finished_runs(args.work))} finished run(s) to {args.record}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
