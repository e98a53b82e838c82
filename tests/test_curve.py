"""Random Bezier intensity curves (``fedgin.augment.RandomCurve``) and their place in the recipe:
off by default (a run draws what it drew before they existed), on with ``--curve-p``, for every
method, recorded so that an experiment never reuses a run trained without them as one with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedgin.augment import RandomCurve
from fedgin.config import TrainConfig
from fedgin.data.labels import get_scheme
from fedgin.engine.model import build_model
from fedgin.engine.trainer import Trainer
from fedgin.errors import FedginError
from fedgin.experiments.experiment import _compare_recipe, parse_method
from loopback import tiny_config


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_curve_keeps_shape_dtype_mean_sd_and_repeats_with_a_generator():
    x = torch.randn(6, 3, 16, 16) * 2 + 1
    before = x.clone()
    curve = RandomCurve(p=1.0)
    y1, y2 = curve(x, generator=_gen()), curve(x, generator=_gen())
    assert torch.equal(y1, y2) and y1.shape == x.shape and y1.dtype == x.dtype and not y1.requires_grad
    assert torch.equal(x, before) and not torch.allclose(y1, x, atol=1e-3)
    flat_x, flat_y = x.reshape(6, -1), y1.reshape(6, -1)
    torch.testing.assert_close(flat_y.mean(1), flat_x.mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat_y.std(1), flat_x.std(1), atol=1e-4, rtol=1e-4)
    half = RandomCurve(p=1.0)(x.half(), generator=_gen())
    assert half.dtype == torch.float16


def test_p_zero_is_the_identity_and_p_selects_samples():
    x = torch.randn(64, 1, 8, 8)
    assert torch.equal(RandomCurve(p=0.0)(x, generator=_gen()), x)
    y = RandomCurve(p=0.5)(x, generator=_gen(3))
    changed = [not torch.equal(y[i], x[i]) for i in range(64)]
    assert 15 < sum(changed) < 49
    # a constant sample has no grey levels to remap
    flat = torch.full((2, 1, 4, 4), 0.7)
    assert torch.equal(RandomCurve(p=1.0)(flat, generator=_gen()), flat)


def test_the_curve_is_a_function_of_the_grey_level_shared_by_a_stacks_channels():
    # the same value anywhere in a sample, in any channel, maps to the same output value
    levels = torch.linspace(-1, 3, 8)
    x = levels[torch.randint(0, 8, (4, 3, 10, 10), generator=_gen(1))]
    y = RandomCurve(p=1.0)(x, generator=_gen(2))
    for b in range(4):
        for level in levels:
            values = y[b][x[b] == level]
            if values.numel():
                assert torch.allclose(values, values[0].expand_as(values), atol=1e-5)


def test_the_darkest_level_stays_darkest_and_free_ends_can_swap_two_organs():
    # background, a darker organ, a brighter organ
    x = torch.zeros(200, 1, 3, 3)
    x[:, :, 1, :] = 0.5
    x[:, :, 2, :] = 1.0
    y = RandomCurve(p=1.0, p_free_end=1.0)(x, generator=_gen(5))
    background, dim, bright = y[:, 0, 0, 0], y[:, 0, 1, 0], y[:, 0, 2, 0]
    assert bool((background <= dim + 1e-5).all() and (background <= bright + 1e-5).all())
    assert bool((dim > bright).any()) and bool((dim < bright).any())


def test_sampled_curves_run_from_the_origin_with_non_decreasing_x():
    curve = RandomCurve(p=1.0)
    params = curve.draw(500, generator=_gen(7))
    xs, ys = curve.curves(params["control"], params["end"])
    assert bool((xs[:, 1:] >= xs[:, :-1]).all())
    assert torch.allclose(xs[:, 0], torch.zeros(500)) and torch.allclose(xs[:, -1], torch.ones(500))
    assert torch.allclose(ys[:, 0], torch.zeros(500)) and bool(((ys >= 0) & (ys <= 1)).all())
    ends = params["end"]
    assert 0.3 < float((ends == 1).float().mean()) < 0.7  # half the curves end at the top


def test_curve_rejects_bad_settings():
    for kwargs in ({"p": -0.1}, {"p": 1.5}, {"p_free_end": 2.0}, {"points": 1}):
        with pytest.raises(ValueError):
            RandomCurve(**kwargs)
    with pytest.raises(ValueError, match="curve_p"):
        TrainConfig(curve_p=1.2)
    with pytest.raises(ValueError, match="B x C"):
        RandomCurve()(torch.zeros(4, 4))


def test_the_trainer_builds_curves_only_when_asked_and_they_change_the_views(tmp_path):
    model_cfg = tiny_config(tmp_path, {}).model
    images = torch.randn(4, 1, 16, 16)
    views = {}
    for p in (0.0, 1.0):
        cfg = TrainConfig(batch_size=4, gin=False, curve_p=p, num_threads=1, validate=False, compile=False)
        trainer = Trainer(build_model(model_cfg), cfg, get_scheme("abdomen5"), torch.device("cpu"), seed=0)
        assert (trainer.curve is None) == (p == 0.0)
        views[p] = trainer._views(images, _gen(9))
    assert not torch.allclose(views[0.0], views[1.0])


def test_experiment_methods_with_curves_and_runs_recorded_before_them():
    assert parse_method("local-ct+ipa-curve-p100").train_overrides == {"gin": True, "ipa": True, "curve_p": 0.5,
                                                                       "gin_p": 1.0}
    assert parse_method("fedavg+curve").train_overrides == {"gin": False, "curve_p": 0.5}
    with pytest.raises(FedginError, match="unknown method"):
        parse_method("fedavg+curve-p50")  # -pNN is GIN's share: refused without GIN
    fields = ("lr", "weight_decay", "batch_size", "gin", "lr_schedule", "poly_exponent", "intensity_augment",
              "spatial_augment")
    train = {k: 1 for k in fields} | {"gin": False}
    expected = {"train": {**train, "curve_p": 0.0}, "model": {}, "preprocess": {}, "rounds": 1, "local_epochs": 1}
    old = {**expected, "train": train}  # recorded before curve_p existed: trained without curves
    _compare_recipe("run", json.loads(json.dumps(old)), expected)
    with pytest.raises(FedginError, match="train.curve_p"):
        _compare_recipe("run", old, {**expected, "train": {**train, "curve_p": 0.5}})


def test_the_command_line_option_sets_the_recipe_and_a_resume_refuses_to_change_it(tmp_path):
    from fedgin.arguments import build_parser
    from fedgin.cli import _run_config
    from fedgin.config import resolve

    def config(argv):
        args = build_parser().parse_args(argv)
        return _run_config(args, "federate", lambda overrides: resolve(
            "quick", command="federate", out=args.out, sites=tuple(args.site), train_overrides=overrides))

    out = str(tmp_path / "run")
    cfg = config(["federate", "--site", "ct=-", "--out", out, "--curve-p", "0.25"])
    assert cfg.train.curve_p == 0.25
    assert config(["federate", "--site", "ct=-", "--out", str(tmp_path / "b")]).train.curve_p == 0.0
    Path(out).mkdir()
    cfg.write(Path(out) / "config.json")
    assert config(["federate", "--out", out, "--resume"]).train.curve_p == 0.25
    from fedgin.engine.runs import resume_run_config
    with pytest.raises(FedginError, match=r"--curve-p \(recorded 0.25, now 0.5\)"):
        resume_run_config(config(["federate", "--out", out, "--resume", "--curve-p", "0.5"]))
