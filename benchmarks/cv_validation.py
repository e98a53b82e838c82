"""Choices on validation, never test: the cross-validated grid's runs scored on their validation cases.

Every run of the grid's record (``docs/results/cv3``, ``benchmarks/cv_grid.py``) logs, after its last
round (federated) or epoch (local, centralized), the Dice of its final model on each site's
validation cases, as ``fedgin predict`` writes them (image-only preprocessing, the input grid, no
post-processing). Each fold's validation cases are apart from its test patients, so a recipe chosen
on these numbers has not seen the test set. This script reads them, mean over liver, kidneys and
spleen per modality, for every run and fold, and compares pairs of methods fold by fold (``--compare
A:B``, A - B on the folds where both finished); the mean over folds weighs each fold's validation
cases alike (one CT and one MRI case per fold in the shipped grid).

Usage::

    python benchmarks/cv_validation.py [--record DIR] [--scenario complete] [--compare fedgin+fov:fedgin ...]

Writes ``docs/results/cv3_validation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, now_iso  # noqa: E402

ORGANS = ("liver", "kidneys", "spleen")
MODALITIES = ("CT", "MRI")
DEFAULT_COMPARISONS = ("fedgin:fedavg", "fedgin+fov:fedgin", "fedavg+fov:fedavg", "fedgin+fov:fedavg+fov")


def final_validation(metrics: Path) -> dict[str, float]:
    """Modality -> the final model's mean validation Dice over ``ORGANS`` (the organs its
    validation cases annotate) from a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("dice") and r.get("modality") in MODALITIES]
    if not rows:
        return {}
    step = "round" if "round" in rows[-1] else "epoch"
    last = max(r[step] for r in rows if step in r)
    out = {}
    for r in rows:
        if r.get(step) != last:
            continue
        values = [r["dice"][o] for o in ORGANS if r["dice"].get(o) is not None]
        if values:
            out[r["modality"]] = sum(values) / len(values)
    return out


def read_record(record: Path, scenario: str) -> dict[str, dict[int, dict[str, float]]]:
    """Method -> fold -> modality -> final validation Dice, for the finished runs of ``scenario``."""
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for summary in sorted(record.glob(f"folds/fold*/runs/{scenario}/*/seed0/eval/summary.json")):
        run = summary.parents[1]
        metrics = run / "metrics.jsonl"
        if metrics.exists():
            fold = int(run.parents[3].name.removeprefix("fold"))
            runs.setdefault(run.parent.name, {})[fold] = final_validation(metrics)
    return runs


def compare(runs: dict, a: str, b: str) -> dict:
    """``a`` - ``b`` per modality: per fold, and the mean over the folds both finished."""
    folds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    out = {"a": a, "b": b, "folds": folds}
    for modality in MODALITIES:
        pairs = [(runs[a][f].get(modality), runs[b][f].get(modality)) for f in folds]
        pairs = [(f, x, y) for f, (x, y) in zip(folds, pairs) if x is not None and y is not None]
        out[modality] = {
            "a": round(sum(x for _, x, _ in pairs) / len(pairs), 4) if pairs else None,
            "b": round(sum(y for _, _, y in pairs) / len(pairs), 4) if pairs else None,
            "difference": round(sum(x - y for _, x, y in pairs) / len(pairs), 4) if pairs else None,
            "per_fold": {f: round(x - y, 4) for f, x, y in pairs},
        }
    return out


def _cell(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.3f}"


def markdown(result: dict) -> str:
    runs, folds = result["runs"], sorted({int(f) for r in result["runs"].values() for f in r})
    lines = [f"# Validation Dice of the grid's runs ({result['scenario']})", "",
             f"`{result['command']}` ({result['date']}); record: `{result['record']}`. The final model of every "
             "finished run on its fold's validation cases, as `predict` writes them (no post-processing); mean "
             "Dice over liver, kidneys, spleen. Recipes are chosen on these numbers; the test patients are "
             "never looked at for a choice.", "",
             "| method | " + " | ".join(f"fold {f}: {m}" for f in folds for m in MODALITIES) + " | mean: CT | mean: MRI |",
             "|---|" + "---|" * (2 * len(folds) + 2)]
    for method, per_fold in runs.items():
        cells = [_cell(per_fold.get(str(f), {}).get(m)) for f in folds for m in MODALITIES]
        means = []
        for m in MODALITIES:
            values = [v[m] for v in per_fold.values() if v.get(m) is not None]
            means.append(_cell(sum(values) / len(values) if values else None))
        lines.append(f"| {method} | " + " | ".join(cells + means) + " |")
    lines += ["", "| comparison | folds | CT: A / B | CT: A - B (per fold) | MRI: A / B | MRI: A - B (per fold) |",
              "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        cells = []
        for m in MODALITIES:
            d = c[m]
            per_fold = ", ".join(f"{f}: {v:+.3f}" for f, v in d["per_fold"].items())
            cells += [f"{_cell(d['a'])} / {_cell(d['b'])}", f"{_signed(d['difference'])} ({per_fold})"]
        lines.append(f"| {c['a']} - {c['b']} | {', '.join(map(str, c['folds'])) or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, default=RESULTS / "cv3")
    parser.add_argument("--scenario", default="complete")
    parser.add_argument("--compare", nargs="*", default=list(DEFAULT_COMPARISONS), metavar="A:B")
    parser.add_argument("--out", type=Path, default=RESULTS / "cv3_validation.json")
    args = parser.parse_args(argv)
    runs = read_record(args.record, args.scenario)
    comparisons = [compare(runs, *pair.split(":", 1)) for pair in args.compare]
    try:
        record = args.record.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        record = str(args.record)
    result = {"command": command_line(argv, __file__), "date": now_iso(), "record": record,
              "scenario": args.scenario,
              "runs": {m: {str(f): {k: round(v, 4) for k, v in d.items()} for f, d in sorted(per.items())}
                       for m, per in runs.items()},
              "comparisons": comparisons}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
