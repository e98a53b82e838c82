"""Differential privacy (`fedgin federate --dp-clip C --dp-noise SIGMA`): the noise Flower's wrapper
adds is SIGMA x C / sites on the mean, updates are clipped to C (on the server, or at the site by
the ClientApp's mod), the spent epsilon comes from Flower's accountant and behaves as it must,
bad combinations are refused, and a run with DP is written, reported and repeatable."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedgin.config import SiteSpec, resolve
from fedgin.engine.checkpoint import load_raw
from fedgin.errors import FedginError
from fedgin.experiments.run_report import write_run_report
from fedgin.federated.privacy import (ClientSideDP, clip_when_asked, epsilon_after, make_private,
                                     secure_standard_normal)
from fedgin.federated.recorder import RoundRecorder, privacy_words
from fedgin.federated.strategy import check_options, make_strategy
from fedgin.federated.task import run_config_to_json
from server_side import FakeGrid

pytestmark = pytest.mark.usefixtures("server_task_identity")

SIZE = 40_000  # weights per model: enough for the noise's spread to be measured to ~1%
METRICS = {"loss": 1.0, "seconds": 1.0, "modality": 0, "lr": 1e-3}


def _config(tmp_path: Path, num_sites: int = 2, **options):
    sites = tuple(SiteSpec(f"site{i}", "-") for i in range(num_sites))
    return resolve("quick", command="test", out=str(tmp_path), sites=sites, **options)


def _private_strategy(cfg, tmp_path, reference, log=None):
    n = len(cfg.sites)
    strategy = make_strategy(cfg.strategy, num_sites=n, min_sites=n, reference=reference,
                             recorder=RoundRecorder(cfg, tmp_path, log=log or (lambda _: None)),
                             run_config_json=run_config_to_json(cfg), uniform_weights=True)
    return make_private(strategy, cfg, n)


def _round(strategy, server_round, global_arrays, site_arrays, num_examples=None):
    """One round as the server runs it: configure, every site replies with its arrays."""
    instructions = list(strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in global_arrays.items()}),
                                                 ConfigRecord(), FakeGrid(range(1, len(site_arrays) + 1))))
    replies = []
    for index, (message, arrays) in enumerate(zip(instructions, site_arrays)):
        metrics = {**METRICS, "site-index": index, "num-examples": (num_examples or [10] * len(site_arrays))[index]}
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=message))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return instructions, None if arrays is None else {k: v.numpy() for k, v in arrays.items()}


def test_the_noise_on_the_mean_has_sd_sigma_times_clip_over_sites(tmp_path):
    reference = {"w": np.zeros(SIZE, np.float32)}
    update = {"w": np.full(SIZE, 1e-3, np.float32)}  # norm 0.2 < clip: no clipping
    for sigma, clip, sites in ((0.5, 1.0, 2), (2.0, 0.3, 4)):
        spreads = []
        for seed in range(3):
            cfg = _config(tmp_path, sites, seed=seed, dp_clip=clip, dp_noise=sigma)
            _, aggregate = _round(_private_strategy(cfg, tmp_path, reference), 1, reference, [update] * sites)
            noise = aggregate["w"] - update["w"]
            spreads.append(noise.std())
            assert abs(noise.mean()) < 5 * sigma * clip / sites / np.sqrt(SIZE)
        assert np.allclose(spreads, sigma * clip / sites, rtol=0.02), (sigma, clip, sites, spreads)


def test_the_noise_is_fresh_per_release_and_secure_unless_the_debugging_switch_is_on(tmp_path):
    reference = {"w": np.zeros(SIZE, np.float32)}
    update = [{"w": np.full(SIZE, 1e-3, np.float32)}] * 2

    def noise(seed, server_round, **options):
        lines = []
        cfg = _config(tmp_path, seed=seed, dp_clip=1.0, dp_noise=1.0, **options)
        strategy = _private_strategy(cfg, tmp_path, reference, log=lines.append)
        aggregate = _round(strategy, server_round, reference, update)[1]["w"]
        return aggregate - update[0]["w"], strategy.recorder.privacy[server_round], lines

    state = np.random.get_state()
    # the same seed and round release different noise: nothing a site knows regenerates it
    first, record, lines = noise(0, 1)
    again, _, _ = noise(0, 1)
    assert not np.allclose(first, again) and abs(np.corrcoef(first, again)[0, 1]) < 0.05
    assert record["noise_source"].startswith("os.urandom") and not any("WARNING" in line for line in lines)
    # without noise (clipping only) the same replies give the same model, bit for bit
    quiet = [_round(_private_strategy(_config(tmp_path, dp_clip=1.0, dp_noise=0.0), tmp_path, reference), 1,
                    reference, update)[1]["w"] for _ in range(2)]
    assert np.array_equal(quiet[0], quiet[1])
    # the debugging switch: repeatable per (seed, round), logged as insecure and recorded
    seeded, record, lines = noise(0, 1, dp_insecure_seeded_noise=True)
    assert np.array_equal(seeded, noise(0, 1, dp_insecure_seeded_noise=True)[0])
    assert not np.allclose(seeded, noise(1, 1, dp_insecure_seeded_noise=True)[0])
    assert not np.allclose(seeded, noise(0, 2, dp_insecure_seeded_noise=True)[0])
    assert any(line.startswith("WARNING: --dp-insecure-seeded-noise") and "NO privacy" in line for line in lines)
    assert "INSECURE" in record["noise_source"] and "NO PRIVACY" in privacy_words(record)
    # numpy's global generator is neither used nor moved
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_secure_normal_draws_are_standard_normal():
    draws = secure_standard_normal((300, 400))
    assert draws.shape == (300, 400) and np.all(np.isfinite(draws))
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1.0) < 0.01
    assert abs(np.mean(np.abs(draws) > 1.96) - 0.05) < 0.005  # the tails of N(0, 1)
    assert secure_standard_normal((3,)).shape == (3,) and secure_standard_normal(()).shape == ()


def _independent_epsilon(noise_multiplier: float, rounds: int, delta: float, conversion: str) -> float:
    """The Gaussian mechanism's RDP, alpha / (2 z^2) per release with z the noise's sd over the
    replace-one sensitivity of the mean (noise SIGMA x C / n, sensitivity 2 C / n: z = SIGMA / 2),
    composed over the rounds and converted to (epsilon, delta) over a dense grid of orders:
    Mironov's conversion (2017, Prop. 3) or the tighter one of Balle et al. (2020, Thm. 21) that
    dp_accounting applies."""
    clip, sites = 1.0, 2
    z = (noise_multiplier * clip / sites) / (2 * clip / sites)
    alphas = np.concatenate([np.linspace(1.001, 3, 20_000), np.linspace(3, 500, 20_000)])
    rdp = rounds * alphas / (2 * z ** 2)
    if conversion == "mironov":
        eps = rdp + np.log(1 / delta) / (alphas - 1)
    else:
        eps = rdp + np.log1p(-1 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(eps.min())


@pytest.mark.parametrize("z, rounds, delta", [(1.0, 20, 1e-5), (0.5, 5, 1e-5), (2.0, 50, 1e-6), (4.0, 10, 1e-3)])
def test_epsilon_is_replace_one_against_an_independent_computation(z, rounds, delta):
    import dp_accounting

    got = epsilon_after(rounds, z, 2, delta)
    tight = _independent_epsilon(z, rounds, delta, "balle")
    # the accountant's grid of orders is coarser than ours, so it can only be a little above
    assert tight <= got <= tight * 1.01 + 1e-6, (got, tight)
    assert got <= _independent_epsilon(z, rounds, delta, "mironov")
    # dp_accounting through its own API: a Gaussian of multiplier SIGMA / 2 (replace-one)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z / 2), rounds)
    assert got == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    # the add-or-remove figure (sensitivity C / n) is lower: fedgin no longer reports it
    add_remove = dp_accounting.rdp.RdpAccountant()
    add_remove.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert add_remove.get_epsilon(delta) < got
    if (z, rounds, delta) == (1.0, 20, 1e-5):  # the example: 30.1 add-or-remove, ~81 replace-one
        assert add_remove.get_epsilon(delta) == pytest.approx(30.1, abs=0.05)
        assert got == pytest.approx(81.1, abs=0.1)


def test_client_mode_refuses_or_drops_a_site_that_did_not_clip(tmp_path):
    reference = {"w": np.zeros(100, np.float32), "b": np.ones(4, np.float32)}
    clipped = {"w": np.full(100, 0.05, np.float32), "b": np.ones(4, np.float32)}  # update norm 0.5 = C
    unclipped = {"w": np.full(100, 0.2, np.float32), "b": np.ones(4, np.float32)}  # norm 2.0 > C
    lines = []
    cfg = _config(tmp_path, dp_clip=0.5, dp_noise=1.0, dp_mode="client")
    # a site exactly at the clip passes (float rounding included)
    strategy = _private_strategy(cfg, tmp_path, reference, log=lines.append)
    assert _round(strategy, 1, reference, [clipped, clipped])[1] is not None
    strategy = _private_strategy(cfg, tmp_path, reference, log=lines.append)
    with pytest.raises(FedginError, match=r"round 1: site site1 sent an update of L2 norm 2 above the DP clip 0.5: "
                                          r"it did not clip .*the run stops"):
        _round(strategy, 1, reference, [clipped, unclipped])
    dropping = _private_strategy(replace(cfg, dp_drop_unclipped=True), tmp_path, reference, log=lines.append)
    assert _round(dropping, 1, reference, [unclipped, clipped])[1] is None  # nothing released
    assert any("site site0 sent an update" in line and "dropped" in line for line in lines)
    assert dropping.recorder.privacy[1]["released"] is False and dropping.recorder.privacy[1]["epsilon"] == 0.0
    with pytest.raises(FedginError, match="--dp-drop-unclipped goes with --dp-mode client"):
        check_options(_config(tmp_path, dp_clip=0.5, dp_drop_unclipped=True))


def test_server_side_clipping_bounds_each_update_and_weights_sites_equally(tmp_path):
    reference = {"w": np.ones(100, np.float32), "b": np.zeros(3, np.float32)}
    big = {"w": reference["w"] + 3.0, "b": np.full(3, 4.0, np.float32)}   # update norm ~31.5
    small = {"w": reference["w"] + 0.01, "b": np.zeros(3, np.float32)}    # norm 0.1
    cfg = _config(tmp_path, dp_clip=2.0, dp_noise=0.0)
    _, aggregate = _round(_private_strategy(cfg, tmp_path, reference), 1, reference, [big, small],
                          num_examples=[1000, 1])
    delta_big = {k: big[k] - reference[k] for k in big}
    norm_big = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in delta_big.values()))
    for key in reference:
        clipped = reference[key] + delta_big[key] * (2.0 / norm_big)
        # the plain mean of the clipped updates: 1000 slices count no more than 1
        expected = (clipped + small[key]) / 2
        assert np.allclose(aggregate[key], expected, atol=1e-6), key


def test_client_side_clipping_clips_at_the_site_and_passes_other_messages():
    sent = {"w": np.zeros(50, np.float32)}
    trained = {"w": np.full(50, 2.0, np.float32)}  # update norm ~14.1

    def train_handler(msg, context):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
                              "metrics": MetricRecord({"num-examples": 5})})
        return Message(content, reply_to=msg)

    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config={})
    for config, expected_norm in (({KEY_CLIPPING_NORM: 1.5}, 1.5), ({}, float(np.sqrt(50) * 2))):
        msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
                                  "config": ConfigRecord({"server-round": 1, **config})}),
                      dst_node_id=1, message_type="train")
        reply = clip_when_asked(msg, context, train_handler)
        assert not reply.has_error()
        got = reply.content["arrays"]["w"].numpy()
        assert np.linalg.norm(got - sent["w"]) == pytest.approx(expected_norm, rel=1e-5)


def test_client_mode_sends_the_clipping_norm(tmp_path):
    reference = {"w": np.zeros(4, np.float32)}
    cfg = _config(tmp_path, dp_clip=0.7, dp_noise=1.0, dp_mode="client")
    strategy = _private_strategy(cfg, tmp_path, reference)
    instructions, _ = _round(strategy, 1, reference, [{"w": reference["w"] + 0.3}] * 2)  # norm 0.6: clipped
    assert all(m.content["config"][KEY_CLIPPING_NORM] == 0.7 for m in instructions)
    assert isinstance(strategy, ClientSideDP)


def test_epsilon_grows_with_rounds_and_falls_with_noise(tmp_path):
    by_rounds = [epsilon_after(r, 1.0, 2, 1e-5) for r in (1, 2, 5, 20)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:])), by_rounds
    by_noise = [epsilon_after(10, s, 2, 1e-5) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:])), by_noise
    assert epsilon_after(10, 0.0, 2, 1e-5) == float("inf")

    # the strategy records what the accountant says after each release, and resumes the account
    reference = {"w": np.zeros(10, np.float32)}
    update = {"w": np.full(10, 0.1, np.float32)}
    cfg = _config(tmp_path, dp_clip=1.0, dp_noise=1.0)
    strategy = _private_strategy(cfg, tmp_path, reference)
    for server_round in (1, 2, 3):
        _round(strategy, server_round, reference, [update, update])
    spent = {r: strategy.recorder.privacy[r]["epsilon"] for r in (1, 2, 3)}
    assert spent == pytest.approx({r: epsilon_after(r, 1.0, 2, 1e-5) for r in (1, 2, 3)})
    assert "epsilon" in strategy.recorder.privacy_line(3) and "delta 1e-05" in strategy.recorder.privacy_line(3)
    resumed = _private_strategy(cfg, tmp_path, reference)
    resumed.load_state(strategy.state())
    _round(resumed, 1, reference, [update, update])
    assert resumed.recorder.privacy[1]["epsilon"] == pytest.approx(epsilon_after(4, 1.0, 2, 1e-5))
    assert resumed.recorder.privacy[1]["releases"] == 4


def test_a_round_missing_a_site_keeps_the_global_model(tmp_path):
    lines = []
    reference = {"w": np.zeros(10, np.float32)}
    cfg = _config(tmp_path, 3, dp_clip=1.0, dp_noise=1.0)
    strategy = _private_strategy(cfg, tmp_path, reference, log=lines.append)
    strategy.strategy.min_sites = 2  # as a lost site would leave it; check_options refuses --min-sites < sites
    instructions = list(strategy.configure_train(1, ArrayRecord({"w": Array(reference["w"])}), ConfigRecord(),
                                                 FakeGrid([1, 2, 3])))
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(reference["w"] + 1)}),
                                   "metrics": MetricRecord({**METRICS, "site-index": i, "num-examples": 5})}),
                       reply_to=m) for i, m in enumerate(instructions[:2])]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert any("differential privacy needs every site's update (2 of 3 replied)" in line for line in lines)
    # nothing released, and the round's record still says what was spent so far (checkpoint meta.privacy)
    assert strategy.recorder.privacy[1]["released"] is False
    assert (strategy.recorder.privacy[1]["releases"], strategy.recorder.privacy[1]["epsilon"]) == (0, 0.0)


@pytest.mark.parametrize("options, message", [
    ({"dp_noise": 1.0}, "--dp-noise needs --dp-clip"),
    ({"dp_clip": 1.0, "strategy": "fedadam"}, "not fedadam"),
    ({"dp_clip": 1.0, "min_sites": 1}, "needs every site"),
    ({"dp_clip": 1.0, "dp_mode": "local"}, "--dp-mode"),
    ({"dp_clip": 1.0, "dp_delta": 1.0}, "--dp-delta"),
    ({"dp_clip": -1.0}, "--dp-clip must be > 0"),
    ({"dp_insecure_seeded_noise": True}, "--dp-insecure-seeded-noise needs --dp-clip"),
    ({"min_sites": 3}, "--min-sites 3 is more than the run's 2 site"),
    ({"strategy": "fedmedian"}, "at least 3 sites"),
])
def test_bad_combinations_are_refused_in_one_line(tmp_path, options, message):
    with pytest.raises(FedginError, match=message):
        check_options(_config(tmp_path, **options))


def _federate(sites, out, *extra):
    args = [sys.executable, "-m", "fedgin.cli", "federate", "--out", str(out),
            *(f"--site={n}={p}" for n, p in sites.items()), "--rounds", "2", "--local-epochs", "1",
            "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_run_with_dp_records_its_epsilon_and_its_noise_is_not_repeatable(phantom_datasets, tmp_path):
    """Two DP runs of the same seed release different models (the noise is fresh, from the OS's
    CSPRNG), while everything before the noise repeats exactly: the sites' round-1 training from the
    same initial model. The same runs without DP repeat bit for bit
    (``test_determinism.py::test_federate_is_repeatable_with_a_seed``)."""
    ct, mri = phantom_datasets(4, 4)
    sites = {"ct": ct, "mri": mri}
    dp = ("--dp-clip", "0.5", "--dp-noise", "0.01", "--dp-mode", "client")
    procs = [_federate(sites, tmp_path / name, *dp) for name in ("a", "b")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]

    expected = [epsilon_after(r, 0.01, 2, 1e-5) for r in (1, 2)]
    assert f"differential privacy: epsilon {expected[1]:.4g} at delta 1e-05 after 2 round(s) (replace-one site" \
        in outputs[0]
    assert "WARNING: --dp-insecure-seeded-noise" not in outputs[0]  # fresh noise: no insecure-noise warning
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["privacy"]["epsilon"]) for r in lines] == \
        [(1, pytest.approx(expected[0])), (1, pytest.approx(expected[0])),
         (2, pytest.approx(expected[1])), (2, pytest.approx(expected[1]))]
    assert all(r["privacy"]["mode"] == "client" and r["privacy"]["noise_sd"] == pytest.approx(0.5 * 0.01 / 2)
               and r["privacy"]["neighbouring"] == "replace-one site" and r["privacy"]["released"]
               and r["privacy"]["noise_source"].startswith("os.urandom") for r in lines)
    last = load_raw(tmp_path / "a" / "checkpoints" / "last.pt")
    assert last["meta"]["privacy"]["epsilon"] == pytest.approx(expected[1])
    # the same seed: the same training before the noise, another noise, so another model
    other_lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines[:2]] == [r["loss"] for r in other_lines[:2]]
    other = load_raw(tmp_path / "b" / "checkpoints" / "last.pt")["state_dict"]
    floats = [key for key, value in last["state_dict"].items() if value.is_floating_point()]
    assert floats and not any(torch.equal(last["state_dict"][key], other[key]) for key in floats)
    first_a = load_raw(tmp_path / "a" / "checkpoints" / "round_001.pt")["state_dict"]
    first_b = load_raw(tmp_path / "b" / "checkpoints" / "round_001.pt")["state_dict"]
    assert not any(torch.equal(first_a[key], first_b[key]) for key in floats)
    report = write_run_report(tmp_path / "a", None, tmp_path / "report.md")
    assert f"epsilon {expected[1]:.4g}" in Path(report).read_text()
    assert "replace-one site" in Path(report).read_text()
