"""``--seed`` makes CPU runs repeatable: the same tiny configuration twice gives the same
``metrics.jsonl`` numbers (losses and Dice exactly; ``seconds`` is wall time) and the same
weights; another seed gives other losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_nnunet
from fedgin.cli import main
from fedgin.engine.checkpoint import load_checkpoint

TINY = ["--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", "--device", "cpu"]


def numbers(run: Path) -> list[dict]:
    """The metrics lines without their wall-clock field."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert lines
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_train_local_is_repeatable_with_a_seed(tmp_path, capsys):
    # 4 cases: 2 train, 1 validation (Dice), 1 test
    site = write_nnunet(tmp_path / "Dataset001_Site", cases=[f"case_{i:03d}" for i in range(4)])
    cache = tmp_path / "cache"

    def train(name: str, seed: int) -> Path:
        out = tmp_path / name
        rc = main(["train", "--mode", "local", "--site", f"ct={site}", "--out", str(out), "--epochs", "2",
                   "--seed", str(seed), "--cache-dir", str(cache), *TINY])
        assert rc == 0, capsys.readouterr().err
        return out / "ct"

    first, again, other = train("a", 0), train("b", 0), train("c", 1)

    assert numbers(first) == numbers(again)
    assert all(line["dice"] for line in numbers(first))  # the validation case was scored
    assert_same_weights(first / "checkpoints" / "last.pt", again / "checkpoints" / "last.pt")
    losses = [line["loss"] for line in numbers(first)]
    assert [line["loss"] for line in numbers(other)] != losses


@pytest.mark.slow
def test_federate_is_repeatable_with_a_seed(tmp_path, capsys, phantom_datasets):
    ct, mri = phantom_datasets(4, 4)
    cache = tmp_path / "cache"

    def federate(name: str) -> Path:
        out = tmp_path / name
        rc = main(["federate", "--site", f"ct={ct}", "--site", f"mri={mri}", "--out", str(out), "--rounds", "1",
                   "--local-epochs", "1", "--seed", "0", "--cache-dir", str(cache), *TINY])
        assert rc == 0, capsys.readouterr().err
        return out

    first, again = federate("a"), federate("b")

    lines = numbers(first)
    assert [(line["round"], line["site"]) for line in lines] == [(1, "ct"), (1, "mri")]
    assert lines == numbers(again)
    assert_same_weights(first / "checkpoints" / "last.pt", again / "checkpoints" / "last.pt")


def test_seeding_makes_torch_deterministic_without_loading_inductor():
    """``seed_everything`` turns on torch's deterministic kernels (warn-only) in a fresh process
    without importing inductor (3 s at the start of every ClientApp process); a compiled step then
    sets inductor's own flag from torch's, as ``torch.use_deterministic_algorithms`` would have."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent("""
        import json, sys
        import torch
        from fedgin.engine.trainer import seed_everything
        seed_everything(0)
        state = [torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                 "torch._inductor" in sys.modules]
        import torch._inductor.config as inductor_config
        from fedgin.engine.compiled import CompiledOrEager
        fn = lambda x: x + 1  # noqa: E731
        CompiledOrEager._compiled[fn] = fn  # stands in for torch.compile's result: no compilation here
        step = CompiledOrEager(fn, compiled=True)
        inductor_config.deterministic = False
        step(torch.ones(2))
        print(json.dumps(state + [inductor_config.deterministic]))
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [True, True, False, True]
