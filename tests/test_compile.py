"""The compiled training step (:mod:`fedgin.engine.compiled`): the same losses and weights as eager
within float tolerance, exactly repeatable, the fallback to eager in one log line, the switches that
turn it off, and inductor's on-disk cache sparing a second process the compilation.

Every test here compiles the same graph (the quick preset's U-Net, batch 8, 128 x 128 crops, one
view), so the session compiles it once (``compiled_training``: one inductor cache for the session).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch

import fedgin.engine.compiled as compiled
from fedgin.cli import _train_overrides, build_parser
from fedgin.config import TrainConfig, resolve
from fedgin.data.labels import get_scheme
from fedgin.data.sites import load_site
from fedgin.engine.model import build_model
from fedgin.engine.trainer import Trainer, forward_loss, seed_everything

pytestmark = pytest.mark.slow

#: the quick preset's training step, without GIN (GIN runs before the compiled part either way)
CFG = TrainConfig(batch_size=8, lr=1e-3, steps_per_epoch=1, gin=False, validate=False, num_threads=2)
STEPS = 4


@pytest.fixture(scope="module")
def site(phantom_datasets, tmp_path_factory):
    ct, _ = phantom_datasets(4, 4)
    cfg = resolve("quick", command="test", out="-", sites=())
    return cfg, load_site("ct", str(ct), get_scheme(cfg.scheme), cfg.preprocess,
                          cache_dir=tmp_path_factory.mktemp("compile-cache"))


def train(site, *, compile: bool, seed: int = 0) -> tuple[list[float], list[torch.Tensor], Trainer]:
    """``STEPS`` one-step epochs from the same initial weights; the per-step losses, final weights."""
    cfg, data = site
    seed_everything(seed)
    model = build_model(cfg.model)
    trainer = Trainer(model, replace(CFG, compile=compile), get_scheme(cfg.scheme), torch.device("cpu"), seed=seed)
    losses = [r.loss for r in trainer.fit(data.train, STEPS)]
    return losses, [p.detach().clone() for p in model.parameters()], trainer


@pytest.mark.long
def test_compiled_training_matches_eager_within_float_tolerance(site, compiled_training):
    eager_losses, _, eager = train(site, compile=False)
    losses, _, trainer = train(site, compile=True)
    assert trainer.forward_loss.compiled and not eager.forward_loss.compiled
    assert any(compiled_training.rglob("*")), "inductor wrote nothing to its cache"
    assert eager_losses[-1] < eager_losses[0]  # the steps trained
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)


@pytest.mark.long
def test_compiled_gradients_match_eager(site, compiled_training):
    """One batch, the same weights: every parameter's gradient within 1e-3 of its norm (plus a floor
    of 1e-5 of the whole gradient's). (Weights after
    a few AdamW steps are no test: a bias ahead of instance norm has a gradient of rounding noise,
    which Adam turns into a full step of either sign.)"""
    cfg, data = site
    scheme = get_scheme(cfg.scheme)
    seed_everything(0)  # the same weights whatever ran before in this worker (the margin depends on them)
    model = build_model(cfg.model)
    trainer = Trainer(model, CFG, scheme, torch.device("cpu"))
    eager = compiled.CompiledOrEager(forward_loss, compiled=False)
    case = data.train[0]
    h, w = case.image.shape[1:]
    centre = (slice((h - 128) // 2, (h - 128) // 2 + 128), slice((w - 128) // 2, (w - 128) // 2 + 128))
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(case.image[0:8])[:, centre[0], centre[1]]))[:, None]
    y = torch.from_numpy(np.asarray(case.label[0:8])[:, centre[0], centre[1]].astype(np.int64))[:, None]
    annotated = torch.ones(8, scheme.num_classes, dtype=torch.bool)
    grads = []
    for step in (eager, trainer.forward_loss):
        model.zero_grad(set_to_none=True)
        loss = step(model, trainer.loss_fn, x, y, annotated, 1, 0.0, False)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
    assert trainer.forward_loss.compiled
    (eager_loss, eager_grads), (loss, grads) = grads
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    total = float(torch.cat([e.flatten() for e in eager_grads]).norm())
    # each parameter's error over its bound; the floor (1e-5 of the whole gradient's norm) is for
    # the rounding-noise gradients
    ratios = [float((g - e).norm()) / (1e-3 * float(e.norm()) + 1e-5 * total) for g, e in zip(grads, eager_grads)]
    print(f"worst gradient error / bound: {max(ratios):.3f}")
    assert max(ratios) <= 1, ratios


@pytest.mark.long
def test_compiled_training_repeats_exactly(site, compiled_training):
    first, first_weights, _ = train(site, compile=True)
    again, again_weights, _ = train(site, compile=True)
    assert first == again
    assert all(torch.equal(a, b) for a, b in zip(first_weights, again_weights))


@pytest.mark.long
def test_a_compiler_error_falls_back_to_eager_with_one_log_line(site, compiled_training, monkeypatch, caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    real_compile = torch.compile
    monkeypatch.setattr(compiled.CompiledOrEager, "_compiled", {})
    monkeypatch.setattr(compiled.torch, "compile", lambda fn, **kw: real_compile(fn, backend=broken_backend))
    monkeypatch.setattr(compiled, "_SAID", set())
    torch._dynamo.reset()
    eager_losses, eager_weights, _ = train(site, compile=False)
    with caplog.at_level(logging.WARNING, logger="fedgin.compile"):
        losses, weights, trainer = train(site, compile=True)
        train(site, compile=True)  # a later trainer in the process: eager at once, no second line
    torch._dynamo.reset()
    assert not trainer.forward_loss.compiled
    assert losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, eager_weights))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "torch.compile failed for the training step" in lines[0], lines
    assert "no compiler here" in lines[0] and "running it eagerly" in lines[0]


def test_without_a_cpp_compiler_training_is_eager_with_one_log_line(monkeypatch, caplog):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("Failed to find C++ compiler")

    monkeypatch.setenv(compiled.COMPILE_ENV, "1")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    monkeypatch.setattr(compiled, "_SAID", set())
    with caplog.at_level(logging.WARNING, logger="fedgin.compile"):
        for _ in range(2):
            step = compiled.compiled_or_eager(forward_loss, True, torch.device("cpu"))
            assert not step.compiled
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fedgin: no C++ compiler for torch.compile on the CPU (Failed to find C++ compiler); "
                     "running the training step eagerly"]


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_the_environment_and_the_config_turn_compilation_off_silently(monkeypatch, caplog, value):
    monkeypatch.setenv(compiled.COMPILE_ENV, value)
    monkeypatch.setattr(compiled, "_SAID", set())
    with caplog.at_level(logging.WARNING, logger="fedgin.compile"):
        assert not compiled.compiled_or_eager(forward_loss, True, torch.device("cpu")).compiled
        monkeypatch.setenv(compiled.COMPILE_ENV, "1")
        assert not compiled.compiled_or_eager(forward_loss, False, torch.device("cpu")).compiled
    assert compiled.why_eager(True, torch.device("cpu")) is None
    assert caplog.records == []


def test_no_compile_reaches_the_config(tmp_path):
    args = ["train", "--site", "ct=/data", "--out", str(tmp_path), "--mode", "local"]
    assert _train_overrides(build_parser().parse_args(args))["compile"] is None  # the preset's: on
    assert _train_overrides(build_parser().parse_args([*args, "--no-compile"]))["compile"] is False
    assert resolve("quick", command="t", out="-", sites=()).train.compile is True
    from fedgin.federated.server_app import config_from_run_config

    cfg = config_from_run_config({"sites": "ct=/data", "out": str(tmp_path / "run"), "compile": False})
    assert cfg.train.compile is False
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["compile"] is False


def test_the_compile_cache_defaults_to_fedgins_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(compiled.INDUCTOR_CACHE_ENV, raising=False)
    monkeypatch.setenv("FEDGIN_CACHE_DIR", str(tmp_path))
    assert compiled.compile_cache_dir() == tmp_path / "compile"
    monkeypatch.setenv(compiled.INDUCTOR_CACHE_ENV, str(tmp_path / "elsewhere"))
    assert compiled.compile_cache_dir() == tmp_path / "elsewhere"


CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from fedgin.config import TrainConfig, resolve
    from fedgin.data.labels import get_scheme
    from fedgin.data.sites import load_site
    from fedgin.engine.model import build_model
    from fedgin.engine.trainer import Trainer, seed_everything

    cfg = resolve("quick", command="test", out="-", sites=())
    data = load_site("ct", sys.argv[1], get_scheme(cfg.scheme), cfg.preprocess, cache_dir=sys.argv[2])
    seed_everything(0)
    trainer = Trainer(build_model(cfg.model), TrainConfig(batch_size=8, lr=1e-3, steps_per_epoch=1, gin=False,
                      validate=False, num_threads=2), get_scheme(cfg.scheme), torch.device("cpu"))
    start = time.perf_counter()
    first = trainer.fit(data.train, 1)[0].loss
    print(json.dumps({"first_step_s": time.perf_counter() - start, "loss": first,
                      "compiled": trainer.forward_loss.compiled}))
""")


@pytest.mark.long
def test_a_second_process_loads_the_compiled_step_from_the_disk_cache(phantom_datasets, tmp_path, monkeypatch):
    """Two fresh processes with one (empty at first) inductor cache: the second does not compile."""
    ct, _ = phantom_datasets(4, 4)
    monkeypatch.setenv(compiled.COMPILE_ENV, "1")
    monkeypatch.setenv(compiled.INDUCTOR_CACHE_ENV, str(tmp_path / "inductor"))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CHILD, str(ct), str(tmp_path / "data-cache")],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert all(r["compiled"] for r in runs)
    assert runs[0]["loss"] == runs[1]["loss"]  # the cached code computes what the fresh one did
    # a ratio within one run (absolute times swing with the machine's load): loading the cached
    # code is a fraction of compiling it
    assert runs[1]["first_step_s"] < runs[0]["first_step_s"] / 3, runs


@pytest.mark.long
def test_compiled_prediction_gives_the_same_labels_on_a_phantom(site, compiled_training):
    """Opt-in compiled inference (``predict/evaluate --compile``): the same labels as eager on every
    voxel of a phantom volume, the last, shorter batch padded to the compiled batch size."""
    from fedgin.engine.inference import iter_probs, tile_of

    _, _, trainer = train(site, compile=False)
    case = site[1].train[0]
    cpu = torch.device("cpu")

    def labels(compile: bool) -> tuple[np.ndarray, np.ndarray]:
        probs = torch.cat([p for _, p in iter_probs(trainer.model, case.image, cpu, batch_size=16,
                                                    tile=tile_of(case), compile=compile)], dim=1)
        return probs.argmax(0).numpy(), probs.numpy()

    assert len(case.image) % 16 != 0  # a padded last batch
    eager, eager_probs = labels(False)
    compiled_labels, probs = labels(True)
    np.testing.assert_allclose(probs, eager_probs, atol=1e-4)
    assert np.array_equal(compiled_labels, eager)
    assert len(np.unique(eager)) > 1


def test_predict_and_evaluate_take_compile():
    parser = build_parser()
    assert parser.parse_args(["predict", "-i", "x", "-o", "y", "--model", "m", "--compile"]).compile is True
    assert parser.parse_args(["predict", "-i", "x", "-o", "y", "--model", "m"]).compile is False
    assert parser.parse_args(["evaluate", "--model", "m", "--data", "d", "--out", "o", "--compile"]).compile is True
