"""What secure aggregation costs per round: `fedgin federate` on phantom sites with and without
`--secagg` (Flower's SecAgg+), the same seed and budget, run one after the other; a round's time is
the gap between consecutive round checkpoints (round 1, which includes Ray's start, is left out).
Writes docs/results/secagg_overhead.json.

    python benchmarks/secagg_overhead.py [--rounds 5] [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_result  # noqa: E402


def fedgin(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fedgin.cli", *args], check=True, stdout=subprocess.DEVNULL)


def round_seconds(run: Path, rounds: int) -> list[float]:
    times = [(run / "checkpoints" / f"round_{r:03d}.pt").stat().st_mtime for r in range(1, rounds + 1)]
    return [b - a for a, b in zip(times, times[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="training steps per site and round")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (plain, secagg), alternating")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fedgin("phantoms", "--out", str(root / "data"), "--ct", "6", "--mri", "6")
        sites = [f"--site=ct={root / 'data' / 'Dataset901_PhantomCT'}", f"--site=mri={root / 'data' / 'Dataset902_PhantomMR'}"]
        seconds: dict[str, list[float]] = {"plain": [], "secagg": []}
        for repeat in range(args.repeats):
            for name, extra in (("plain", []), ("secagg", ["--secagg"])):
                run = root / f"{name}-{repeat}"
                fedgin("federate", "--out", str(run), *sites, "--rounds", str(args.rounds), "--local-epochs", "1",
                       "--steps-per-epoch", str(args.steps), "--cache-dir", str(root / "cache"), *extra)
                seconds[name] += round_seconds(run, args.rounds)
                print(name, repeat, [round(s, 1) for s in seconds[name][-(args.rounds - 1):]], flush=True)
    plain, secagg = statistics.median(seconds["plain"]), statistics.median(seconds["secagg"])
    write_result("secagg_overhead", {
        **provenance(),
        "what": f"fedgin federate on 6 + 6 phantom cases (CT, MRI sites), quick preset, {args.steps} steps per site "
                f"and round, {args.rounds} rounds x {args.repeats} runs each; seconds per round from checkpoint "
                "times, rounds 2.. only; medians",
        "round_seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
        "median_round_seconds": {"plain": round(plain, 2), "secagg": round(secagg, 2)},
        "secagg_over_plain": round(secagg / plain, 3),
        "secagg_extra_seconds_per_round": round(secagg - plain, 2),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
