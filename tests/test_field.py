"""Random field-of-view windows (fedgin.augment.RandomField): what a training crop becomes, and the
option from the command line to the experiment's recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgin.augment import RandomField
from fedgin.config import TrainConfig
from fedgin.data.labels import get_scheme
from fedgin.data.preprocess import PreprocessConfig, preprocess
from fedgin.data.sites import CaseData
from fedgin.engine.model import build_model
from fedgin.engine.sampling import SliceIndex
from fedgin.engine.trainer import Trainer
from fedgin.errors import FedginError
from fedgin.experiments.experiment import _compare_recipe, parse_method
from loopback import tiny_config


def _body(shape=(64, 64), air=-2.0, seed=0):
    """An H x W z-scored-like plane: an elliptic body (values around 0-2) in air, an organ label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    body = ((yy - shape[0] / 2) / (shape[0] * 0.45)) ** 2 + ((xx - shape[1] / 2) / (shape[1] * 0.45)) ** 2 < 1
    image = np.where(body, np.clip(rng.normal(0.5, 0.7, shape), -0.9, None), air).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[20:40, 10:30] = 1
    label[30:45, 40:55] = 3
    return image, label


def test_a_window_keeps_its_voxels_makes_the_rest_air_and_background_and_rescales_the_body():
    image, label = _body()
    field = RandomField(p=1.0, min_size=(20, 20))
    out, lab = field(image, label, "CT", np.random.default_rng(3), air=-2.0)
    assert out.shape == image.shape and out.dtype == image.dtype and lab.dtype == label.dtype
    rows = np.flatnonzero((out != out.min()).any(axis=1))
    cols = np.flatnonzero((out != out.min()).any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    assert rows[-1] - rows[0] + 1 >= 15 and cols[-1] - cols[0] + 1 >= 15
    # outside: one air value and no label; inside: the label kept, the body an affine map of the input
    outside = np.ones(image.shape, bool)
    outside[window] = False
    assert np.unique(out[outside]).size == 1 and not lab[outside].any()
    assert np.array_equal(lab[window], label[window])
    inside_body = image[window] > -2.0
    scaled = out[window][inside_body]
    assert abs(scaled.mean()) < 1e-4 and abs(scaled.std() - 1) < 1e-3  # z-scored over the window's body
    slope = np.polyfit(image[window][inside_body], scaled, 1)[0]
    assert np.allclose(scaled, (image[window][inside_body] - image[window][inside_body].mean()) * slope, atol=1e-4)
    # air stays the lowest value, below every body voxel
    assert out[outside][0] < scaled.min()


def test_p_zero_draws_nothing_and_returns_the_inputs():
    image, label = _body()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out, lab = RandomField(p=0.0, min_size=(10, 10))(image, label, "MRI", rng)
    assert out is image and lab is label and rng.bit_generator.state == state


def test_windows_are_drawn_between_the_smallest_side_and_the_crop():
    field = RandomField(p=1.0, min_size=(30, 50))
    rng = np.random.default_rng(1)
    sizes = []
    for _ in range(300):
        rows, cols = field.window((64, 64), rng)
        assert 0 <= rows.start < rows.stop <= 64 and 0 <= cols.start < cols.stop <= 64
        sizes.append((rows.stop - rows.start, cols.stop - cols.start))
    sizes = np.array(sizes)
    assert sizes[:, 0].min() >= 30 and sizes[:, 1].min() >= 50 and sizes.max() == 64
    assert field.window((20, 20), rng)[0].stop - field.window((20, 20), rng)[0].start == 20  # crop below min


def test_a_stack_gets_one_window_and_one_rescaling():
    image, label = _body()
    body = image > -2.0
    stack = np.stack([image, np.where(body, image + 0.5, -2.0), np.where(body, image * 2, -2.0)])
    out, lab = RandomField(p=1.0, min_size=(20, 20))(stack, label, "CT", np.random.default_rng(5), air=-2.0)
    air = out.min()
    masks = [o != air for o in out]
    assert all(np.array_equal(masks[0], m) for m in masks[1:]) and not masks[0].all()
    # one mean and sd for the stack: the channels' offset survives as one constant
    shift = (out[1] - out[0])[masks[0]]
    assert np.allclose(shift, shift[0], atol=1e-4) and shift[0] > 0


def test_the_mri_body_is_what_preprocessing_calls_body():
    image, label = _body(air=0.0)
    image = np.clip(image, 0, None)
    field = RandomField(p=1.0, min_size=(64, 64))  # the whole crop: only the rescaling acts
    out, _ = field(image, label, "MRI", np.random.default_rng(0), air=0.0)
    floor = 0.05 * image.max()
    body = image[image > floor]
    assert np.allclose(out[image > floor], (body - body.mean()) / body.std(), atol=1e-4)


def test_a_window_that_looks_like_a_cropped_scan_after_preprocessing():
    """A phantom CT cropped in-plane and preprocessed as predict would see it: its plane is the
    window in air, z-scored over the window, like the augmentation's output."""
    rng = np.random.default_rng(0)
    hu = np.full((80, 80, 4), -1000.0, np.float32)
    yy, xx = np.mgrid[:80, :80]
    body = ((yy - 40) / 36.0) ** 2 + ((xx - 40) / 36.0) ** 2 < 1
    hu[body] = rng.normal(40, 60, (body.sum(), 4)).astype(np.float32)
    hu[body & (xx < 20)] = -100.0  # fat at the body's side
    cfg = PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(96, 96))
    whole = preprocess(hu, np.diag([2.5, 2.5, 5.0, 1.0]), "CT", cfg)
    cropped = preprocess(hu[25:65, 25:65], np.diag([2.5, 2.5, 5.0, 1.0]), "CT", cfg)
    # the cropped scan's body is z-scored over the window: mean 0 over its body voxels
    air = cropped.image.min()
    body_values = cropped.image[cropped.image > air]
    assert abs(body_values.mean()) < 0.05
    plane = whole.image[0]
    rows = np.flatnonzero((plane > plane.min()).any(axis=1))
    out, _ = RandomField(p=1.0, min_size=(40, 40))(plane, np.zeros_like(plane, np.uint8), "CT",
                                                    np.random.default_rng(2), air=float(plane.min()))
    inside = out[out > out.min()]
    assert rows.size and abs(inside.mean()) < 0.05 and abs(inside.std() - 1) < 0.05


def test_random_field_rejects_bad_settings():
    with pytest.raises(ValueError):
        RandomField(p=1.5, min_size=(10, 10))
    with pytest.raises(ValueError):
        RandomField(p=0.5, min_size=(0, 10))
    with pytest.raises(ValueError, match="fov_p"):
        TrainConfig(fov_p=-0.1)
    with pytest.raises(ValueError, match="fov_min_mm"):
        TrainConfig(fov_min_mm=0)


def _case(image, label):
    return CaseData(case_id="c", modality="CT", image=image, label=label,
                    annotated=np.ones(6, bool), geometry=None, ref=None)


def test_slice_reading_draws_the_same_crops_without_windows_and_windows_them_when_asked():
    image, label = _body((96, 96))
    case = _case(np.stack([image] * 5), np.stack([label] * 5))
    index = SliceIndex([case])
    idx = np.array([0, 2, 4, 1])
    plain = index.read(idx, (64, 64), np.random.default_rng(7))
    again = index.read(idx, (64, 64), np.random.default_rng(7), field=None)
    assert all(np.array_equal(a, b) for a, b in zip(plain, again))
    windowed = index.read(idx, (64, 64), np.random.default_rng(7), 3, RandomField(1.0, (20, 20)))
    assert windowed[0].shape == (4, 3, 64, 64)
    air_share = (windowed[0] == windowed[0].min(axis=(1, 2, 3), keepdims=True)).mean()
    assert air_share > (plain[0] == plain[0].min()).mean()


def test_the_trainer_builds_windows_in_voxels_of_the_preprocessed_plane(tmp_path):
    model_cfg = tiny_config(tmp_path, {}).model
    for p in (0.0, 0.5):
        cfg = TrainConfig(batch_size=4, gin=False, fov_p=p, fov_min_mm=150, num_threads=1, validate=False,
                          compile=False)
        trainer = Trainer(build_model(model_cfg), cfg, get_scheme("abdomen5"), torch.device("cpu"), seed=0,
                          spacing_mm=(2.5, 2.0))
        assert (trainer.field is None) == (p == 0.0)
    assert trainer.field.min_size == (60, 75) and trainer.field.p == 0.5


def test_experiment_methods_with_windows_and_runs_recorded_before_them():
    assert parse_method("fedgin+fov").train_overrides == {"gin": True, "fov_p": 0.5}
    assert parse_method("fedavg+fov").train_overrides == {"gin": False, "fov_p": 0.5}
    assert parse_method("fedavg+gin-fov").train_overrides == {"gin": True, "fov_p": 0.5}
    assert parse_method("local-ct+gin-fov-p100").train_overrides == {"gin": True, "fov_p": 0.5, "gin_p": 1.0}
    fields = ("lr", "weight_decay", "batch_size", "gin", "lr_schedule", "poly_exponent", "intensity_augment",
              "spatial_augment", "curve_p")
    train = {k: 1 for k in fields} | {"gin": False, "curve_p": 0.0}
    expected = {"train": {**train, "fov_p": 0.0, "fov_min_mm": 150.0}, "model": {}, "preprocess": {},
                "rounds": 1, "local_epochs": 1}
    old = {**expected, "train": train}  # recorded before the windows existed: trained without them
    _compare_recipe("run", json.loads(json.dumps(old)), expected)
    with pytest.raises(FedginError, match="train.fov_p"):
        _compare_recipe("run", old, {**expected, "train": {**expected["train"], "fov_p": 0.5}})


def test_the_command_line_options_set_the_windows(tmp_path):
    from fedgin.arguments import build_parser
    from fedgin.cli import _run_config
    from fedgin.config import resolve

    def config(argv):
        args = build_parser().parse_args(argv)
        return _run_config(args, "federate", lambda overrides: resolve(
            "quick", command="federate", out=args.out, sites=tuple(args.site), train_overrides=overrides))

    cfg = config(["federate", "--site", "ct=-", "--out", str(tmp_path / "a"), "--fov-p", "0.25",
                  "--fov-min-mm", "120"])
    assert (cfg.train.fov_p, cfg.train.fov_min_mm) == (0.25, 120.0)
    Path(tmp_path / "a").mkdir()
    cfg.write(tmp_path / "a" / "config.json")
    from fedgin.engine.runs import resume_run_config
    with pytest.raises(FedginError, match=r"--fov-p \(recorded 0.25, now 0.5\)"):
        resume_run_config(config(["federate", "--out", str(tmp_path / "a"), "--resume", "--fov-p", "0.5"]))


def test_an_experiment_wide_share_goes_to_every_method_and_a_fov_recipe_keeps_its_own(phantom_datasets, tmp_path,
                                                                                      monkeypatch):
    from fedgin.config import SiteSpec
    from fedgin.experiments import experiment

    ct, mri = phantom_datasets(2, 2)
    seen = {}

    class Stop(Exception):
        pass

    def record(base, method, *args):
        seen[method.name] = base.train.fov_p
        if len(seen) == 3:
            raise Stop
        Path(base.out).mkdir(parents=True)

    monkeypatch.setattr(experiment, "_train_method", record)
    import fedgin.evaluation.scoring as scoring
    monkeypatch.setattr(scoring, "evaluate", lambda *a, **k: None)
    sites = [SiteSpec("ct", str(ct)), SiteSpec("mri", str(mri))]
    with pytest.raises(Stop):
        experiment.run_experiment(sites, ["complete"], ["fedavg", "fedgin+fov", "local-ct"], 1, tmp_path / "x",
                                  preset="quick", overlays=False, fov_p=0.2, log=lambda *a: None)
    assert seen == {"fedavg": 0.2, "fedgin+fov": 0.5, "local-ct": 0.2}
    args = __import__("fedgin.arguments", fromlist=["build_parser"]).build_parser().parse_args(
        ["experiment", "--site", "ct=a", "--site", "mri=b", "--out", "o", "--fov-p", "0.3"])
    assert args.fov_p == 0.3
