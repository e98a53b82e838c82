"""Why the grid's MRI failures happen: each MRI case's organ contrast, next to every method's Dice.

For each MRI case of the bundle: the mean image intensity inside each labelled organ (liver,
kidneys, spleen) on the raw scan, the spleen / liver ratio (on T2 the spleen is the brighter,
about 2x), and a z-score of that ratio against the other cases. Where the cross-validated grid's
record (``docs/results/cv3``, from ``benchmarks/cv_grid.py``) holds a case as a test patient, every
finished method's liver and spleen Dice on it are listed too, so a patient that every method
misses can be told from a method that misses.

Usage::

    python benchmarks/mri_contrast.py          # writes docs/results/mri_contrast.{json,md}

Reads labels: a data-quality look at the bundle (which case is unlike the others), not a model
choice; nothing here picks a recipe.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, provenance, write_result, write_text  # noqa: E402

from fedgin.data.datasets import CaseRef, open_dataset  # noqa: E402
from fedgin.data.labels import get_scheme  # noqa: E402

BUNDLE = ROOT.parent / "shared" / "data" / "abdomen-ct-mr" / "Dataset802_AbdomenMR"
ORGANS = ("liver", "kidneys", "spleen")
SCHEME = get_scheme("abdomen5")  # both kidneys one class, as fedgin scores them


def organ_means(case: CaseRef) -> dict[str, float | None]:
    """Mean image intensity inside each of ``ORGANS`` the case annotates (its label read and mapped
    to the scheme as training reads it); None for an organ it does not annotate or that is absent."""
    image, label, _ = case.read(SCHEME)
    out = {}
    for organ in ORGANS:
        mask = label == SCHEME.label_ids[organ]
        out[organ] = float(image[mask].mean()) if organ in case.annotated and mask.any() else None
    return out


def grid_dice(record: Path) -> dict[str, dict[str, dict[str, float]]]:
    """case -> "scenario/method" -> organ -> Dice, from every finished run's eval/metrics.csv."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    paths = sorted(record.glob("folds/fold*/runs/*/*/seed0/eval/metrics.csv"))
    paths += sorted(record.glob("folds/fold*/runs/*/*/seed0/*/eval/metrics.csv"))
    for path in paths:
        parts = path.relative_to(record).parts  # folds, foldK, runs, scenario, method, seed0, ...
        name = f"{parts[1]}/{parts[3]}/{parts[4]}"
        with path.open() as f:
            for row in csv.DictReader(f):
                if row["modality"] == "MRI" and row["organ"] in ORGANS and row["dice"] != "":
                    found.setdefault(row["case"], {}).setdefault(name, {})[row["organ"]] = float(row["dice"])
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BUNDLE)
    parser.add_argument("--record", type=Path, default=RESULTS / "cv3")
    parser.add_argument("--out", type=Path, default=RESULTS / "mri_contrast")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"the bundle is not at {args.data}", file=sys.stderr)
        return 2
    cases = {}
    for ref in open_dataset(args.data, SCHEME).cases:
        means = organ_means(ref)
        if means["liver"] and means["spleen"]:
            cases[ref.case_id] = {"mean_intensity": means, "spleen_over_liver": means["spleen"] / means["liver"]}
    ratios = {c: v["spleen_over_liver"] for c, v in cases.items()}
    for case, value in cases.items():
        # against the other cases of the same source (the case id's prefix: chaos, ts): one sequence
        value["source"] = source = case.split("_")[0]
        others = [r for c, r in ratios.items() if c != case and c.split("_")[0] == source]
        value["ratio_z_vs_others"] = ((value["spleen_over_liver"] - statistics.mean(others)) / statistics.stdev(others)
                                      if len(others) >= 3 else None)
    dice = grid_dice(args.record) if args.record.exists() else {}
    for case, value in cases.items():
        value["grid_dice"] = dice.get(case, {})
    result = {**provenance(), "data": str(args.data), "record": str(args.record), "cases": cases}
    write_result(args.out.with_suffix(".json"), result)

    lines = ["# MRI organ contrast per case, next to the grid's Dice", "",
             f"`{result['command']}` ({result['date']}). Mean raw intensity inside each labelled organ; "
             "z: the spleen / liver ratio against the other cases of its source (mean, sd; a source of fewer than 4 cases has none). Dice: every finished run "
             "of the cross-validated grid that has the case as a test patient (liver / spleen).", "",
             "| case | liver | kidneys | spleen | spleen / liver | z | grid Dice, liver / spleen |",
             "|---|---|---|---|---|---|---|"]
    def z_key(kv):
        return kv[1]["ratio_z_vs_others"] if kv[1]["ratio_z_vs_others"] is not None else float("inf")

    for case, value in sorted(cases.items(), key=z_key):
        m = value["mean_intensity"]
        runs = "; ".join(f"{name}: {d.get('liver', float('nan')):.2f} / {d.get('spleen', float('nan')):.2f}"
                         for name, d in sorted(value["grid_dice"].items())) or "–"
        kidneys = f"{m['kidneys']:.0f}" if m["kidneys"] is not None else "–"
        z = f"{value['ratio_z_vs_others']:+.1f}" if value["ratio_z_vs_others"] is not None else "–"
        lines.append(f"| {case} | {m['liver']:.0f} | {kidneys} | {m['spleen']:.0f} | "
                     f"{value['spleen_over_liver']:.2f} | {z} | {runs} |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
