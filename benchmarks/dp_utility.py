"""What differential privacy costs in Dice on the real bundle: `fedgin federate` (the default recipe,
FedGIN, quick preset) without DP, with clipping only, and at two noise multipliers, each model
scored on the test split with `fedgin evaluate`. Writes docs/results/dp_utility.json.

Every run gets the same seed, rounds and schedule; only the DP options differ. The spent epsilon
is the one Flower's RDP accountant reported (``metrics.jsonl``). A finished run is reused, so the
script can be resumed.

    python benchmarks/dp_utility.py --out /tmp/dp_utility [--clip 5] [--noise 0.001 0.01]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, provenance, write_result  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "abdomen-ct-mr"
SITES = {"ct": DATA / "Dataset801_AbdomenCT", "mri": DATA / "Dataset802_AbdomenMR"}
ORGANS = ("liver", "kidneys", "spleen")  # the organs every test case annotates


def fedgin(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fedgin.cli", *args], check=True)


def test_dice(summary: dict) -> dict:
    out = {}
    for modality in ("CT", "MRI"):
        stats = summary["by_modality"][modality]
        values = [stats[o]["dice"]["mean"] for o in ORGANS]
        out[modality] = round(sum(values) / len(values), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs")
    parser.add_argument("--clip", type=float, default=5.0)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.001, 0.01])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"the real bundle is not at {DATA}", file=sys.stderr)
        return 2
    variants = {"no-dp": []}
    variants["clip-only"] = ["--dp-clip", str(args.clip)]
    for sigma in args.noise:
        variants[f"noise-{sigma:g}"] = ["--dp-clip", str(args.clip), "--dp-noise", str(sigma)]
    runs = {}
    for name, extra in variants.items():
        run = args.out / name
        start = time.perf_counter()
        if not (run / "checkpoints" / "last.pt").exists():
            resume = ["--resume"] if (run / "config.json").exists() else []
            fedgin("federate", "--out", str(run), "--seed", str(args.seed), *resume,
                   *(f"--site={n}={p}" for n, p in SITES.items()), *extra)
        summary = run / "eval" / "summary.json"
        if not summary.exists():
            fedgin("evaluate", "--model", str(run), "--data", *map(str, SITES.values()), "--out", str(run / "eval"))
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        privacy = lines[-1].get("privacy")
        runs[name] = {"options": " ".join(extra) or "(none)", "test_dice": test_dice(json.loads(summary.read_text())),
                      "epsilon": privacy["epsilon"] if privacy else None,
                      "delta": privacy["delta"] if privacy else None,
                      "noise_sd_per_weight": privacy["noise_sd"] if privacy else None,
                      "seconds_this_call": round(time.perf_counter() - start, 1)}
        print(name, runs[name], flush=True)
    write_result("dp_utility", {
        **provenance(),
        "what": "fedgin federate (default recipe: FedGIN, quick preset, 10 rounds) on the real bundle, seed "
                f"{args.seed}; test Dice mean over {', '.join(ORGANS)} per modality; DP with Flower's "
                "server-side fixed clipping, every site weighted equally under DP",
        "runs": runs,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
