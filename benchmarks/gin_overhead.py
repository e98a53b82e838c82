"""GIN's cost as a fraction of one training step, and batched GIN against a per-sample loop.

Setting: the default model (``build_model(ModelConfig())``, a 2D MONAI U-Net, 1 -> 6
channels), a batch of 8 slices of 128 x 128, AdamW (lr 5e-4), DiceCE loss, 2 CPU threads. Times
are medians over ``--repeats`` interleaved rounds after ``--warmup`` untimed rounds; rounds
alternate the step, GIN and the per-sample loop so that other processes' load hits all three.
Writes ``docs/results/gin_overhead.json`` and prints it.

Usage: ``python benchmarks/gin_overhead.py [--repeats 20] [--out docs/results/gin_overhead.json]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.losses import DiceCELoss

from fedgin.augment import GIN
from fedgin.engine.model import ModelConfig, build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, provenance, write_result  # noqa: E402

GOAL = 0.03
BATCH, SIZE, THREADS = 8, (128, 128), 2


def interleaved_ms(
    fns: dict[str, tuple[Callable[[], object], int]], rounds: int, warmup: int
) -> dict[str, float]:
    """Median wall time in milliseconds of each ``fn`` called ``calls`` times per round.

    Rounds alternate between the functions so that load from other processes on a shared
    machine affects all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + rounds):
        for name, (fn, calls) in fns.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--out", type=Path, default=RESULTS / "gin_overhead.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    images = torch.rand(BATCH, 1, *SIZE)
    labels = torch.randint(0, ModelConfig().out_channels, (BATCH, 1, *SIZE))
    gin = GIN(spatial_dims=2)

    def train_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimiser.step()

    def per_sample_loop() -> torch.Tensor:
        return torch.cat([gin(images[b : b + 1]) for b in range(BATCH)])

    # GIN calls are cheap: several per round give a stable median at no real cost
    gin_calls = 5
    ms = interleaved_ms(
        {
            "step": (train_step, 1),
            "gin": (lambda: gin(images), gin_calls),
            "loop": (per_sample_loop, gin_calls),
        },
        args.repeats,
        args.warmup,
    )
    t_step, t_gin, loop_ms = ms["step"], ms["gin"], ms["loop"]

    result = {
        **provenance(),
        "setting": {
            "model": "build_model(ModelConfig())",
            "batch": BATCH,
            "slice_size": list(SIZE),
            "optimiser": "AdamW lr=5e-4",
            "loss": "DiceCELoss(to_onehot_y=True, softmax=True)",
            "gin": repr(gin),
            "timing": f"median over {args.repeats} interleaved rounds after {args.warmup}: "
            f"1 step, {gin_calls} GIN calls, {gin_calls} per-sample loops per round",
        },
        "t_step_ms": round(t_step, 3),
        "t_gin_ms": round(t_gin, 3),
        "fraction": round(t_gin / t_step, 5),
        "goal": GOAL,
        "meets_goal": t_gin / t_step <= GOAL,
        "loop_ms": round(loop_ms, 3),
        "batched_ms": round(t_gin, 3),
        "speedup": round(loop_ms / t_gin, 2),
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
