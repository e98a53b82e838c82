"""Does compiling inference pay? Eager vs ``torch.compile`` of the prediction network, per batch
and per process, on the quick preset's U-Net (16-32-64-128, 6 classes, random weights), batch 32
of 128 x 128 slices, 2 CPU threads, no grad, eval mode: the path ``predict``/``evaluate`` take
(``fedgin.engine.inference._softmax``).

Each variant runs in its own fresh process, three in turn sharing one inductor cache (empty at
first): ``eager``, ``compiled_cold`` (compiles from scratch) and ``compiled_warm`` (loads from the
cache). Each process times its first call (compilation or cache load included) and the best of
10 later calls. ``break_even_batches`` = warm first-call overhead / per-batch saving: the batches
a job must hold before compiling (with a warm cache) is faster than eager. A CHAOS MRI volume is
one batch. Writes ``docs/results/compile_inference.json`` and prints it.

Usage: ``python benchmarks/compile_inference.py``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_result  # noqa: E402

BATCH, THREADS = 32, 2

CHILD = """
import json, sys, time
import torch
from fedgin.config import ModelConfig
from fedgin.engine.compiled import compiled_or_eager
from fedgin.engine.inference import _softmax
from fedgin.engine.model import build_model

torch.set_num_threads(%d)
torch.manual_seed(0)
model = build_model(ModelConfig(out_channels=6)).eval()
step = compiled_or_eager(_softmax, sys.argv[1] == "compiled", torch.device("cpu"), what="inference")
x = torch.randn(%d, 1, 128, 128)
with torch.no_grad():
    start = time.perf_counter(); step(model, x); first = time.perf_counter() - start
    times = []
    for _ in range(10):
        start = time.perf_counter(); step(model, x); times.append(time.perf_counter() - start)
print(json.dumps({"first_call_s": first, "per_batch_s": min(times), "compiled": step.compiled}))
""" % (THREADS, BATCH)


def run(mode: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="fedgin-bench-inductor-"),
           "FEDGIN_COMPILE": "1"}
    runs = {"eager": run("eager", env), "compiled_cold": run("compiled", env), "compiled_warm": run("compiled", env)}
    eager, warm = runs["eager"], runs["compiled_warm"]
    saving = eager["per_batch_s"] - warm["per_batch_s"]
    overhead = warm["first_call_s"] - warm["per_batch_s"] - (eager["first_call_s"] - eager["per_batch_s"])
    result = {
        **provenance(THREADS),
        "setting": {"model": "quick U-Net 16-32-64-128, 6 classes, random weights", "batch": [BATCH, 1, 128, 128],
                    "path": "fedgin.engine.inference._softmax under no_grad, eval", "threads": THREADS,
                    "timing": "one fresh process per variant, in turn, one inductor cache (empty at first); "
                              "first call and best of 10 later calls"},
        **{name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for name, r in runs.items()},
        "per_batch_ratio_compiled_vs_eager": round(warm["per_batch_s"] / eager["per_batch_s"], 4),
        "break_even_batches": round(overhead / saving, 1) if saving > 0 else None,
    }
    write_result("compile_inference", result)
    return result


if __name__ == "__main__":
    main()
