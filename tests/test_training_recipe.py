"""The training recipe every mode shares: the learning-rate schedule, the site's optimiser state
across federated rounds (and across a resume), the standard intensity augmentation, multi-view GIN
with Ouyang's consistency term."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedgin.augment import RandomIntensity
from fedgin.config import TrainConfig
from fedgin.data.labels import get_scheme
from fedgin.engine.losses import view_consistency
from fedgin.engine.model import build_model
from fedgin.engine.runs import load_sites, train_non_federated
from fedgin.engine.trainer import Trainer, poly_lr
from fedgin.federated import client_app
from fedgin.federated.task import run_config_to_json, state_to_numpy, train_round
from loopback import tiny_config

SCHEME = get_scheme("abdomen5")


@pytest.fixture(scope="module")
def sites(phantom_datasets) -> dict[str, Path]:
    ct, mri = phantom_datasets(3, 3)
    return {"ct": ct, "mri": mri}


# --- the schedule --------------------------------------------------------------------------------

def test_poly_schedule_starts_at_the_base_rate_and_ends_near_zero():
    assert poly_lr(1e-3, 0, 100) == 1e-3
    assert poly_lr(1e-3, 50, 100) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert poly_lr(1e-3, 99, 100) == pytest.approx(1e-3 * 0.01 ** 0.9)
    assert poly_lr(1e-3, 100, 100) == 0.0


def _last_step_lr(cfg_train: TrainConfig, total_steps: int) -> float:
    return poly_lr(cfg_train.lr, total_steps - 1, total_steps, cfg_train.poly_exponent)


@pytest.mark.parametrize("mode", ["local", "centralized"])
def test_the_schedule_reaches_its_end_value_at_the_last_step(mode, sites, tmp_path):
    cfg = replace(tiny_config(tmp_path / "run", sites), mode=mode)
    cfg = replace(cfg, train=replace(cfg.train, epochs=3, validate=False))

    out = train_non_federated(cfg, log=lambda _: None)

    run = out / "ct" if mode == "local" else out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = sorted({x["epoch"]: x["lr"] for x in lines}.items())
    steps = cfg.train.steps_per_epoch
    assert [e for e, _ in epochs] == [1, 2, 3]
    for epoch, lr in epochs:  # the rate of each epoch's last step
        assert lr == pytest.approx(poly_lr(cfg.train.lr, epoch * steps - 1, 3 * steps))
    assert epochs[-1][1] == pytest.approx(_last_step_lr(cfg.train, 3 * steps))


def test_a_constant_schedule_keeps_the_rate(sites, tmp_path):
    cfg = replace(tiny_config(tmp_path / "run", {"ct": sites["ct"]}), mode="local")
    cfg = replace(cfg, train=replace(cfg.train, epochs=2, validate=False, lr_schedule="constant"))
    run = train_non_federated(cfg, log=lambda _: None) / "ct"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in lines] == [cfg.train.lr] * 2


# --- the site's optimiser across rounds ------------------------------------------------------------

def _global(cfg) -> dict[str, np.ndarray]:
    torch.manual_seed(cfg.seed)
    return state_to_numpy(build_model(cfg.model).state_dict())


def test_federated_rounds_follow_one_schedule_and_carry_the_optimiser(sites, tmp_path):
    cfg = replace(tiny_config(tmp_path / "run", {"ct": sites["ct"]}, rounds=3), train=replace(
        tiny_config(tmp_path, {}).train, validate=False))
    site = cfg.sites[0]
    arrays, optimizer = _global(cfg), None
    steps = cfg.train.steps_per_epoch
    for server_round in (1, 2, 3):
        arrays, metrics, optimizer = train_round(cfg, site, 0, arrays, server_round, optimizer_state=optimizer)
        assert metrics["lr"] == pytest.approx(poly_lr(cfg.train.lr, server_round * steps - 1, 3 * steps))
        # AdamW counts every step of the run, not of the round
        assert {int(s["step"]) for s in optimizer["optimizer"]["state"].values()} == {server_round * steps}
    assert metrics["lr"] == pytest.approx(_last_step_lr(cfg.train, 3 * steps))


def test_a_federated_round_scores_its_validation_cases_once_after_its_last_epoch(phantom_datasets, tmp_path,
                                                                                monkeypatch):
    ct, _ = phantom_datasets(4, 4)  # 3 cases leave none for validation
    cfg = tiny_config(tmp_path / "run", {"ct": ct}, rounds=2)
    cfg = replace(cfg, local_epochs=3, train=replace(cfg.train, validate=True))
    calls = []
    real = Trainer.validate
    monkeypatch.setattr(Trainer, "validate", lambda self, cases: calls.append(len(cases)) or real(self, cases))
    _, metrics, _ = train_round(cfg, cfg.sites[0], 0, _global(cfg), 1)
    assert len(calls) == 1 and calls[0] > 0
    assert not np.isnan(metrics["dice-liver"])
    # local and centralized training still score every epoch (their metrics lines and checkpoints)
    trainer = Trainer(build_model(cfg.model), cfg.train, SCHEME, torch.device("cpu"))
    data = load_sites(cfg)[0]
    results = trainer.fit(data.train, 3, val_cases=data.val)
    assert len(calls) == 4 and all(r.dice for r in results)


def _train_message(cfg, arrays: dict[str, np.ndarray], server_round: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "config": ConfigRecord({"run-config": run_config_to_json(cfg), "server-round": server_round}),
    })
    metadata = Metadata(run_id=1, message_id=f"train-{server_round}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=0.0,
                        ttl=DEFAULT_TTL, message_type="train")
    return Message(content=content, metadata=metadata)


def _context(state_dir: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "state-dir": str(state_dir)},
                   state=RecordDict(), run_config={})


def _reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    assert not reply.has_error(), reply.error
    assert not reply.content.config_records, "the optimiser state never leaves the site"
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def test_the_client_keeps_its_optimiser_in_context_state_and_a_resume_restores_it(sites, tmp_path):
    cfg = replace(tiny_config(tmp_path / "run", {"ct": sites["ct"]}, rounds=3),
                  train=replace(tiny_config(tmp_path, {}).train, validate=False))
    state_dir = tmp_path / "site-state"
    context = _context(state_dir)
    arrays = {1: _global(cfg)}
    for server_round in (1, 2, 3):
        reply = client_app.app(_train_message(cfg, arrays[server_round], server_round), context)
        arrays[server_round + 1] = _reply_arrays(reply)
        record = context.state.config_records[client_app.OPTIMIZER_KEY]
        assert int(record["round"]) == server_round
    # the state dir keeps the last two rounds only (a server killed mid-round resumes one back)
    assert sorted(p.name for p in (state_dir / "ct").glob("optimizer_round_*.pt")) == [
        "optimizer_round_002.pt", "optimizer_round_003.pt"]

    # a resumed run is a new Flower run: empty context.state, the same state dir
    resumed = _context(state_dir)
    (state_dir / "ct" / "optimizer_round_003.pt").unlink()  # as if killed during round 3
    reply = client_app.app(_train_message(cfg, arrays[3], 3), resumed)
    again = _reply_arrays(reply)
    for key, value in arrays[4].items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)

    # without the stored state the round differs: the state is what made the two equal
    (state_dir / "ct" / "optimizer_round_002.pt").unlink()
    fresh = _reply_arrays(client_app.app(_train_message(cfg, arrays[3], 3), _context(state_dir)))
    assert any(not np.array_equal(fresh[k], v) for k, v in arrays[4].items() if v.dtype.kind == "f")


def test_site_state_is_keyed_by_run_so_a_later_run_on_the_same_state_dir_starts_clean(sites, tmp_path):
    """A SuperNode's state-dir outlives runs: a second FedBN run there must start from neither the
    first run's normalisation layers nor its optimiser, while the first run, resumed, finds both."""
    base = replace(tiny_config(tmp_path / "run", {"ct": sites["ct"]}, rounds=2, strategy="fedbn"),
                   train=replace(tiny_config(tmp_path, {}).train, validate=False))
    first, second = replace(base, run_id="run0000first"), replace(base, run_id="run000second")
    state_dir = tmp_path / "state"
    site = first.sites[0]
    _reply_arrays(client_app.app(_train_message(first, _global(first), 1), _context(state_dir)))
    own = state_dir / "ct" / "run0000first"
    assert (own / "local_norm_layers.npz").is_file() and (own / "optimizer_round_001.pt").is_file()

    later = _context(state_dir)
    assert client_app._local_arrays(later, second, site) is None
    assert client_app.load_optimizer_state(later, second, site, 2) is None
    _reply_arrays(client_app.app(_train_message(second, _global(second), 1), later))
    assert sorted(p.name for p in (state_dir / "ct").iterdir()) == ["run0000first", "run000second"]

    resumed = _context(state_dir)  # the first run resumed: a new Flower run, the same run id
    assert client_app._local_arrays(resumed, first, site) is not None
    assert client_app.load_optimizer_state(resumed, first, site, 2) is not None


def test_a_run_draws_its_id_when_created_and_keeps_it_on_resume(tmp_path):
    from fedgin.engine.runs import prepare_run_dir
    from fedgin.federated.server_app import config_from_run_config

    def recorded(out: Path) -> str | None:
        return json.loads((out / "config.json").read_text()).get("run_id")

    cfg = tiny_config(tmp_path / "a", {"ct": "-"})
    prepare_run_dir(cfg, resume=False)
    first = recorded(tmp_path / "a")
    assert first and len(first) == 12
    prepare_run_dir(cfg, resume=True)
    assert recorded(tmp_path / "a") == first
    prepare_run_dir(replace(cfg, out=str(tmp_path / "b")), resume=False)
    assert recorded(tmp_path / "b") != first
    # a run from before run ids keeps none on resume (its sites' state stays where it was)
    legacy = json.loads((tmp_path / "a" / "config.json").read_text())
    legacy.pop("run_id")
    (tmp_path / "a" / "config.json").write_text(json.dumps(legacy))
    prepare_run_dir(cfg, resume=True)
    assert recorded(tmp_path / "a") is None
    # flwr run: the same out again (a resume after a coordinator crash) keeps the id
    keys = {"sites": "ct=- mri=-", "out": str(tmp_path / "deployed"), "rounds": 2}
    deployed = config_from_run_config(keys).run_id
    assert deployed and config_from_run_config(keys).run_id == deployed


# --- intensity augmentation, views and consistency -------------------------------------------------

def test_consistency_is_zero_for_identical_views_and_positive_otherwise():
    logits = torch.randn(3, 6, 8, 8)
    same = logits.repeat(2, 1, 1, 1)
    assert float(view_consistency(same, 2)) == pytest.approx(0.0, abs=1e-7)
    other = torch.cat([logits, torch.randn(3, 6, 8, 8)])
    assert float(view_consistency(other, 2)) > 0.01
    assert float(view_consistency(logits, 1)) == 0.0


def test_consistency_is_the_per_voxel_kl_from_the_mean():
    a, b = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    pa, pb = a.softmax(1), b.softmax(1)
    mean = (pa + pb) / 2
    expected = 0.5 * ((mean * (mean.log() - pa.log())).sum(1).mean() + (mean * (mean.log() - pb.log())).sum(1).mean())
    assert float(view_consistency(torch.cat([a, b]), 2)) == pytest.approx(float(expected), rel=1e-5)


def test_intensity_augmentation_is_repeatable_and_keeps_shape_and_input():
    x = torch.randn(16, 1, 12, 12)
    before = x.clone()
    aug = RandomIntensity(p_brightness=1.0, p_contrast=1.0, p_noise=1.0, p_gamma=1.0)
    y1 = aug(x, generator=torch.Generator().manual_seed(0))
    y2 = aug(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y1, y2) and y1.shape == x.shape and y1.dtype == x.dtype
    assert torch.equal(x, before) and not torch.allclose(y1, x)
    off = RandomIntensity(p_brightness=0.0, p_contrast=0.0, p_noise=0.0, p_gamma=0.0)
    torch.testing.assert_close(off(x, generator=torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("views", "clean", "slices", "images"), [(1, False, 8, 8), (2, False, 4, 8),
                                                                  (1, True, 4, 8), (3, False, 3, 9)])
def test_multi_view_gin_spends_the_batch_on_views_of_fewer_slices(views, clean, slices, images, sites, tmp_path):
    cfg = TrainConfig(batch_size=8, steps_per_epoch=1, gin=True, gin_views=views, clean_view=clean,
                      consistency=2.0, num_threads=1, validate=False)
    model = build_model(tiny_config(tmp_path, {}).model)
    seen = []
    model.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    trainer = Trainer(model, cfg, SCHEME, torch.device("cpu"), seed=0)
    (site,) = load_sites(tiny_config(tmp_path / "run", {"ct": sites["ct"]}))
    result = trainer.fit(site.train, 1)[0]
    assert trainer.slices_per_step == slices and seen == [images]
    assert np.isfinite(result.loss)


def test_without_gin_the_views_setting_changes_nothing(sites, tmp_path):
    base = TrainConfig(batch_size=4, steps_per_epoch=2, gin=False, num_threads=1, validate=False)
    (site,) = load_sites(tiny_config(tmp_path / "run", {"ct": sites["ct"]}))
    losses = []
    for cfg in (base, replace(base, gin_views=3, consistency=5.0, clean_view=True)):
        torch.manual_seed(0)
        trainer = Trainer(build_model(tiny_config(tmp_path, {}).model), cfg, SCHEME, torch.device("cpu"), seed=0)
        losses.append([r.loss for r in trainer.fit(site.train, 2)])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("command", ["train", "federate", "experiment"])
def test_without_preset_a_command_gets_the_converged_budget(command):
    """The default is the measured budget (docs/results/time_to_accuracy.json: validation Dice within
    0.01 of its plateau by 4800-6400 steps per site), 6000 steps per site; ``quick`` is the same
    recipe with a sixth of them."""
    from fedgin.cli import _new_run_defaults, build_parser
    from fedgin.config import DEFAULT_PRESET, PRESETS

    extra = {"train": ["--mode", "local"], "federate": [],
             "experiment": ["--scenario", "complete", "--methods", "fedgin"]}[command]
    args = build_parser().parse_args([command, "--site", "ct=/data", "--out", "/run", *extra])
    if command != "experiment":  # a new run's defaults (a resumed one takes its recorded preset)
        _new_run_defaults(args, command)
    assert args.preset == DEFAULT_PRESET == "standard"
    standard, quick = PRESETS["standard"], PRESETS["quick"]
    per_site = standard["rounds"] * standard["local_epochs"] * standard["train"].steps_per_epoch
    assert per_site == standard["train"].epochs * standard["train"].steps_per_epoch == 6000
    assert quick["rounds"] * 6 == standard["rounds"]
    # the same recipe but the budget, 2.5D and the field-of-view windows: grid, U-Net, training settings
    assert standard["model"].in_channels == 3 and quick["model"].in_channels == 1
    assert replace(standard["model"], in_channels=1) == quick["model"]
    assert standard["preprocess"] == quick["preprocess"]
    assert standard["train"].fov_p == 0.5 and quick["train"].fov_p == 0.0
    assert replace(standard["train"], epochs=quick["train"].epochs, fov_p=0.0) == quick["train"]
