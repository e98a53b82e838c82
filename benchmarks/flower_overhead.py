"""Flower's overhead on a federated round, and the memory of a 2-site run.

Setting: ``fedgin federate`` (Flower's simulation engine, one Ray worker per site) on two phantom
sites (CT and MRI, ``--ct``/``--mri`` cases each), preset ``quick``, 1 local epoch per round, 1 torch
thread per site, ``--steps-per-epoch`` sized so that one local epoch takes about ``--target``
seconds (measured in this process before the run, unless ``--steps`` is given).

Per round, the critical path of the work itself is the slowest site's local training (the sites
train in parallel): ``max`` over sites of ``seconds`` in ``metrics.jsonl`` (local epoch plus its
validation). The round's wall time comes from the arrival of the server's per-round progress line.
``ratio = sum(round wall) / sum(max local seconds)`` over rounds 2..R; round 1 also carries the
one-off start-up (data loading, Ray, worker processes, imports), which is reported separately as
``startup_s``: the time from launch to the end of round 1, less round 1's critical path and less
the mean per-round overhead of the later rounds. What is
left per round (``overhead_s``) is Flower (messages, serialisation, Ray), fedgin's per-round
evaluation of the global model at each site, and the checkpoint.

Peak memory: the sum of RSS over the ``fedgin federate`` process and all its descendants (Ray's
GCS, raylet and workers; the tree from psutil if installed, else /proc), sampled every 0.5 s, and
the sum of PSS (shared pages split among the processes that map them, closer to what the machine
really gives up).

Writes ``docs/results/flower_overhead.json`` and prints it.

The two sites share the machine's cores, so on 2 busy cores a local epoch sized to 30 s alone
takes about twice that in the run; the default 3 rounds take about 4 minutes there.

Usage: ``python benchmarks/flower_overhead.py [--rounds 3] [--target 30] [--steps N]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, now_iso, write_result  # noqa: E402

GOAL = 1.15
ROUND_LINE = re.compile(r"^round (\d+)/(\d+) \((\d+)s\)")


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(root)
            return [root, *(p.pid for p in proc.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def memory_of(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes; RSS counts pages shared between processes (torch's
    libraries in every Ray worker) once per process, PSS splits them among the sharers."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


class MemorySampler(threading.Thread):
    """Peak RSS and PSS of a process tree, sampled every ``interval`` seconds until ``stop``."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            rss, pss = memory_of(tree(self.pid))
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.samples += 1
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join()


def seconds_per_step(site_path: Path, cache: Path) -> float:
    """One training step of the quick preset on 1 thread (GIN on), median of a short run."""
    import torch

    from fedgin.config import SiteSpec, resolve
    from fedgin.data.labels import get_scheme
    from fedgin.engine.model import build_model
    from fedgin.engine.runs import load_sites
    from fedgin.engine.trainer import Trainer, seed_everything

    cfg = resolve("quick", command="benchmark", out="-", sites=(SiteSpec("ct", str(site_path)),),
                  cache_dir=str(cache), train_overrides={"num_threads": 1, "steps_per_epoch": 4, "validate": False})
    (site,) = load_sites(cfg)
    seed_everything(0)
    trainer = Trainer(build_model(cfg.model), cfg.train, get_scheme(cfg.scheme), torch.device("cpu"))
    trainer.fit(site.train, 1)  # warm-up
    runs = [trainer.fit(site.train, 1)[0].seconds / 4 for _ in range(3)]
    return sorted(runs)[1]


def run_federate(sites: dict[str, Path], out: Path, cache: Path, rounds: int, steps: int) -> dict:
    """``fedgin federate`` in a child process; round end times and the peak memory of its tree."""
    args = [sys.executable, "-m", "fedgin.cli", "federate", "--out", str(out), "--rounds", str(rounds),
            "--local-epochs", "1", "--steps-per-epoch", str(steps), "--threads", "1", "--cache-dir", str(cache),
            *(f"--site={name}={path}" for name, path in sites.items())]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    ends: dict[int, float] = {}
    log = []
    for line in proc.stdout:
        log.append(line)
        match = ROUND_LINE.match(line.strip())
        if match:
            ends[int(match.group(1))] = time.perf_counter() - start
            print(f"  {line.strip()}", flush=True)
    code = proc.wait()
    total = time.perf_counter() - start
    sampler.stop()
    if code != 0:
        sys.exit("fedgin federate failed:\n" + "".join(log[-40:]))
    return {"round_end_s": ends, "total_s": total, "peak_rss": sampler.peak_rss,
            "peak_pss": sampler.peak_pss, "samples": sampler.samples,
            "command": shlex.join(["python", *args[1:]])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (round 1 carries the start-up)")
    parser.add_argument("--target", type=float, default=30.0, help="seconds of local training per round")
    parser.add_argument("--steps", type=int, help="steps per local epoch (default: sized to --target)")
    parser.add_argument("--ct", type=int, default=5, help="CT phantom cases")
    parser.add_argument("--mri", type=int, default=5, help="MRI phantom cases")
    parser.add_argument("--out", type=Path, default=RESULTS / "flower_overhead.json")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 carries the start-up)")
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    from fedgin.synthetic import write_phantom_datasets

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="flower-overhead-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        ct, mri = write_phantom_datasets(tmp / "data", n_ct=args.ct, n_mri=args.mri, seed=0)
        step_s = None
        steps = args.steps
        if steps is None:
            step_s = seconds_per_step(ct, cache)
            steps = max(1, math.ceil(args.target / step_s))
            print(f"one step: {step_s:.3f} s on 1 thread -> {steps} steps per local epoch", flush=True)
        run = run_federate({"ct": ct, "mri": mri}, tmp / "run", cache, args.rounds, steps)
        lines = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]

    per_round = []
    previous_end = 0.0
    for r in range(1, args.rounds + 1):
        local = {row["site"]: row["seconds"] for row in lines if row["round"] == r}
        end = run["round_end_s"][r]
        wall = end - previous_end
        per_round.append({"round": r, "wall_s": round(wall, 2), "local_s": {k: round(v, 2) for k, v in local.items()},
                          "max_local_s": round(max(local.values()), 2),
                          "overhead_s": round(wall - max(local.values()), 2)})
        previous_end = end
    steady = per_round[1:]
    wall = sum(r["wall_s"] for r in steady)
    critical = sum(r["max_local_s"] for r in steady)
    ratio = wall / critical
    first = per_round[0]
    result = {
        "command": command_line(argv, script=__file__),
        "date": now_iso(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_1min_before": round(load_before, 2),
                    "load_average_1min_after": round(os.getloadavg()[0], 2)},
        "setting": {"runtime": "fedgin federate (Flower simulation engine, Ray), 2 sites in parallel",
                    "sites": {"ct": args.ct, "mri": args.mri}, "preset": "quick", "rounds": args.rounds,
                    "local_epochs": 1, "steps_per_epoch": steps, "threads_per_site": 1,
                    "target_local_s": args.target,
                    "seconds_per_step_1_thread": round(step_s, 4) if step_s else None,
                    "federate": run["command"]},
        "rounds": per_round,
        "startup_s": round(first["overhead_s"] - (wall - critical) / len(steady), 2),
        "steady_rounds": [r["round"] for r in steady],
        "steady_wall_s": round(wall, 2),
        "steady_sum_max_local_s": round(critical, 2),
        "ratio": round(ratio, 4),
        "mean_overhead_per_round_s": round((wall - critical) / len(steady), 2),
        "ratio_including_round_1": round(sum(r["wall_s"] for r in per_round)
                                         / sum(r["max_local_s"] for r in per_round), 4),
        "total_wall_s": round(run["total_s"], 2),
        "peak_rss_mib": round(run["peak_rss"] / 2**20, 1),
        "peak_pss_mib": round(run["peak_pss"] / 2**20, 1),
        "memory_samples": run["samples"],
        "goal": GOAL,
        "meets_goal": ratio <= GOAL,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
