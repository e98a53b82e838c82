"""The default recipe on the real bundle, as a new user runs it: ``fedgin federate`` with no
options but the sites (the ``standard`` preset: 60 rounds, 6000 steps per site, 2.5D), the same
in 2D (``--context 1``) and FedAvg in 2D (``--no-gin --context 1``), then ``fedgin evaluate`` on the
shipped test split.

Per method: the wall time of ``fedgin federate`` on this machine (the goal: at most 20 minutes on
2 cores), each site's validation Dice after the last round (the run's own ``metrics.jsonl``, liver,
kidneys, spleen), and the test split's per-organ Dice, HD95 and failure counts per modality (the
evaluation's ``summary.json``). Everything else is equal: seed 0, the same preset, the same code.

Usage: ``python benchmarks/default_budget.py --work DIR [--methods fedgin,fedgin-2d,fedavg-2d]``. A method whose
run and evaluation are already in ``DIR/<method>/`` (with ``timing.json``, written when this script
ran it) is reused, so an interrupted benchmark continues. Writes ``docs/results/default_budget.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, provenance, write_result  # noqa: E402

BUNDLE = ROOT.parent / "shared" / "data" / "abdomen-ct-mr"
SITES = {"ct": BUNDLE / "Dataset801_AbdomenCT", "mri": BUNDLE / "Dataset802_AbdomenMR"}
#: the default (standard preset: 2.5D, GIN on), the same in 2D, and FedAvg (GIN off) in 2D
METHODS = {"fedgin": [], "fedgin-2d": ["--context", "1"], "fedavg-2d": ["--no-gin", "--context", "1"]}
ORGANS = ("liver", "kidneys", "spleen")
FEDGIN = [sys.executable, "-m", "fedgin.cli"]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def run_method(work: Path, method: str) -> dict:
    folder = work / method
    run, evaluation, timing = folder / "run", folder / "eval", folder / "timing.json"
    if not timing.exists():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        subprocess.run([*FEDGIN, "federate", *(f"--site={n}={p}" for n, p in SITES.items()), "--out", str(run),
                        "--seed", "0", *METHODS[method]], check=True)
        timing.write_text(json.dumps({"federate_seconds": round(time.perf_counter() - start, 1)}))
    if not (evaluation / "summary.json").exists():
        subprocess.run([*FEDGIN, "evaluate", "--model", str(run), "--data", *map(str, SITES.values()),
                        "--out", str(evaluation), "--no-qa"], check=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = max(x["round"] for x in lines)
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((evaluation / "summary.json").read_text())
    test = {}
    for modality, stats in summary["by_modality"].items():
        if modality == "all":
            continue
        test[modality] = {"mean_dice": _mean(stats[o]["dice"]["mean"] for o in ORGANS), "cases": stats["cases"],
                          **{o: {k: stats[o][k] for k in ("dice", "hd95", "failure_share")} for o in ORGANS},
                          "per_case": {r["case"]: {o: r["metrics"][o]["dice"] for o in ORGANS}
                                       for r in summary["metric_per_case"] if r["modality"] == modality}}
    return {"options": METHODS[method], "preset": config["preset"], "rounds": config["rounds"],
            "steps_per_site": config["rounds"] * config["local_epochs"] * config["train"]["steps_per_epoch"],
            **json.loads(timing.read_text()),
            "validation_dice_last_round": {x["site"]: _mean(x["dice"][o] for o in ORGANS)
                                           for x in lines if x["round"] == last},
            "test": test}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="runs and evaluations (reused when there)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS / "default_budget.json")
    args = parser.parse_args(argv)
    if not all(p.is_dir() for p in SITES.values()):
        print(f"default_budget: the real bundle is not at {BUNDLE}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = {**provenance(), "data": str(BUNDLE), "methods": {m: run_method(args.work, m) for m in methods}}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
