"""Peak memory of ``fedgin train`` as a site grows: 6 phantom CT cases against 120.

Each case count gets its own phantom CT dataset (``write_phantom_datasets(..., n_mri=0)``, seed 0;
the seeded split keeps most cases for training) and its own preprocessing cache. ``fedgin train
--mode local`` runs twice per count, each in a fresh process: the first fills the cache (``cold``:
reading and preprocessing every case, one at a time), the second trains from the warm cache
(``warm``), which is what every later run and every federated round does. The quick preset, 1
epoch of ``--steps`` steps, validation on, 2 threads.

Peak RSS is the child's ``ru_maxrss``, read in a fresh Python parent that runs only that command
(``RUSAGE_CHILDREN`` of a parent that had no other child). The figure of the issue is the ratio of
the warm peak at 120 cases to the one at 6 (goal <= 1.3; 1.65 before training read its slices from
the cache on disk). ``--src`` runs another checkout's code (``PYTHONPATH``), to measure before/after.
Writes ``docs/results/train_memory.json`` and prints it.

Usage: ``python benchmarks/train_memory.py [--cases 6,120] [--steps 20] [--src DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, provenance, write_result  # noqa: E402

GOAL = 1.3
THREADS = 2

_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
print(json.dumps({"rc": done.returncode, "seconds": seconds, "stderr": done.stderr[-2000:],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(command: list[str], env: dict) -> dict:
    """Peak RSS and wall time of ``command`` run alone under a fresh parent."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, env=env,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result['stderr']}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="6,120", help="comma-separated phantom CT case counts")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the one epoch")
    parser.add_argument("--src", type=Path, default=None, help="the fedgin sources to run (PYTHONPATH)")
    parser.add_argument("--work", type=Path, default=None, help="where datasets and caches go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_memory.json")
    args = parser.parse_args(argv)

    from fedgin.synthetic import write_phantom_datasets

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    if args.src:
        env["PYTHONPATH"] = str(args.src.resolve())
    work = args.work or Path(tempfile.mkdtemp(prefix="fedgin-bench-memory-"))
    counts = [int(n) for n in args.cases.split(",")]
    rows = {}
    for n in counts:
        data = work / f"ct{n}"
        if not (data / "done").exists():
            start = time.perf_counter()
            ct = write_phantom_datasets(data, n, 0, seed=0)[0]
            (data / "done").write_text(str(ct))
            print(f"{n} phantom cases written in {time.perf_counter() - start:.0f} s", flush=True)
        ct = Path((data / "done").read_text())
        tag = f"{n}-{args.src.name if args.src else 'here'}"
        cache = work / f"cache{tag}"
        shutil.rmtree(cache, ignore_errors=True)  # the cold run starts from an empty cache
        row = {}
        for phase in ("cold", "warm"):
            command = [sys.executable, "-c", "import sys; from fedgin.cli import main; sys.exit(main())",
                       "train", "--site", f"ct={ct}", "--mode", "local", "--epochs", "1",
                       "--steps-per-epoch", str(args.steps), "--threads", str(THREADS),
                       "--out", str(work / f"run{tag}-{phase}"), "--cache-dir", str(cache)]
            shutil.rmtree(work / f"run{tag}-{phase}", ignore_errors=True)
            row[phase] = measure(command, env)
            row[phase].pop("stderr")
            row[phase].pop("rc")
            print(f"{n} cases, {phase}: {row[phase]}", flush=True)
        rows[str(n)] = row
    small, large = str(min(counts)), str(max(counts))
    ratio = rows[large]["warm"]["peak_rss_mb"] / rows[small]["warm"]["peak_rss_mb"]
    result = {**provenance(THREADS), "src": str(args.src) if args.src else "this checkout",
              "steps": args.steps, "runs": rows,
              "ratio_warm": round(ratio, 3),
              "ratio_cold": round(rows[large]["cold"]["peak_rss_mb"] / rows[small]["cold"]["peak_rss_mb"], 3),
              "goal": f"warm peak RSS at {large} cases / at {small} <= {GOAL}", "met": ratio <= GOAL}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
