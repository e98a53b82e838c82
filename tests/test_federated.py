"""Federated training on Flower: what a site sends, how the server aggregates, `fedgin federate`
end to end (with an exact resume), and a real TLS deployment of Flower's own processes.

The ClientApp is called with Flower messages as the strategy builds them; the deployment test
starts `flower-superlink` and `flower-supernode` on loopback and submits the app with `flwr run`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from fedgin.config import RunConfig, SiteSpec, resolve
from fedgin.data.labels import get_scheme
from fedgin.engine.checkpoint import load_raw
from fedgin.engine.model import build_model
from fedgin.engine.runs import load_sites
from fedgin.errors import FedginError
from fedgin.federated import client_app
from fedgin.federated.recorder import RoundRecorder
from fedgin.federated.server_app import config_from_run_config
from fedgin.federated.strategy import make_strategy
from fedgin.federated.task import run_config_to_json
from loopback import BIN, REPO, TINY, Loopback, tiny_config
from loopback import alive as _alive
from loopback import stop as _stop
from loopback import wait as _wait
from server_side import FakeGrid

pytestmark = pytest.mark.usefixtures("server_task_identity")

ORGANS = get_scheme("abdomen5").organs
#: what a site may send besides the weights: numbers only (no case ids, paths or names)
TRAIN_METRICS = {"num-examples", "loss", "seconds", "modality", "site-index", "lr", *(f"dice-{o}" for o in ORGANS)}
#: evaluate replies also carry the Dice with each organ's candidate post-processing (fedgin.engine.postprocess)
EVALUATE_METRICS = {"num-examples", "modality", "site-index", *(f"dice-{o}" for o in ORGANS),
                    *(f"dice-pp-{o}" for o in ORGANS)}


@pytest.fixture(scope="module")
def sites(phantom_datasets) -> dict[str, Path]:
    """A CT and an MRI phantom site of 4 cases each (2 training, 1 validation, 1 test)."""
    ct, mri = phantom_datasets(4, 4)
    return {"ct": ct, "mri": mri}


def delivered(message: Message) -> Message:
    """``message`` as the receiving side gets it: serialised and parsed as Flower does on the wire."""
    return message_from_proto(message_to_proto(message))


def simulation_context(partition_id: int = 0, num_partitions: int = 1) -> Context:
    return Context(run_id=1, node_id=100 + partition_id, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions})


# --- 1. what leaves a site -----------------------------------------------------------------------

def _instructions(cfg: RunConfig, kind: str, tmp_path: Path) -> Message:
    """The server's train/evaluate message for node 100, built by fedgin's strategy."""
    model = build_model(cfg.model)
    reference = {k: v.numpy() for k, v in model.state_dict().items()}
    strategy = make_strategy("fedavg", num_sites=1, min_sites=1, reference=reference,
                             recorder=RoundRecorder(cfg, tmp_path / "server", log=lambda _: None),
                             run_config_json=run_config_to_json(cfg))
    configure = strategy.configure_train if kind == "train" else strategy.configure_evaluate
    (message,) = configure(1, ArrayRecord(model.state_dict()), ConfigRecord(), FakeGrid([100]))
    assert message.metadata.message_type == kind and message.metadata.dst_node_id == 100
    assert RunConfig.from_dict(json.loads(message.content["config"]["run-config"])) == cfg
    assert message.content["config"]["server-round"] == 1
    return delivered(message)


def _only_numbers(record: MetricRecord) -> None:
    for key, value in record.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)


def test_client_train_reply_holds_exactly_the_weights_and_scalar_metrics(sites, tmp_path):
    cfg = tiny_config(tmp_path / "run", {"ct": sites["ct"]})
    # BatchNorm (not the default instance norm) so the reply carries an integer buffer to check
    cfg = replace(cfg, model=replace(cfg.model, norm="batch"))
    message = _instructions(cfg, "train", tmp_path)

    reply = delivered(client_app.app(message, simulation_context()))

    assert not reply.has_error()
    content = reply.content
    assert list(content.array_records) == ["arrays"] and list(content.metric_records) == ["metrics"]
    assert not content.config_records
    expected = build_model(cfg.model).state_dict()
    received = content["arrays"].to_torch_state_dict()
    assert list(received) == list(expected)
    for key, tensor in expected.items():
        assert received[key].shape == tensor.shape and received[key].dtype == tensor.dtype, key
    assert received["model.0.conv.unit0.adn.N.num_batches_tracked"].dtype == torch.int64
    assert int(received["model.0.conv.unit0.adn.N.num_batches_tracked"]) == TINY["steps_per_epoch"]
    metrics = content["metrics"]
    assert set(metrics) == TRAIN_METRICS
    _only_numbers(metrics)
    (site,) = load_sites(cfg)
    assert metrics["num-examples"] == site.num_train_slices
    assert metrics["modality"] == 0 and metrics["site-index"] == 0
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0 and metrics["seconds"] > 0
    for organ in ORGANS:
        assert 0.0 <= metrics[f"dice-{organ}"] <= 1.0, organ
    # the weights changed: the site trained
    assert any(not torch.equal(received[k], v) for k, v in expected.items() if v.is_floating_point())


def test_client_evaluate_reply_holds_only_scalar_metrics(sites, tmp_path):
    cfg = tiny_config(tmp_path / "run", {"mri": sites["mri"]})
    message = _instructions(cfg, "evaluate", tmp_path)

    reply = delivered(client_app.app(message, simulation_context()))

    content = reply.content
    assert not content.array_records and not content.config_records
    assert list(content.metric_records) == ["metrics"]
    metrics = content["metrics"]
    assert set(metrics) == EVALUATE_METRICS
    _only_numbers(metrics)
    assert metrics["modality"] == 1 and metrics["num-examples"] == 1  # one validation case
    for organ in ORGANS:
        assert 0.0 <= metrics[f"dice-{organ}"] <= 1.0, organ


def test_deployment_node_config_names_the_site(sites, tmp_path):
    """A SuperNode's ``site-name`` picks its place in the server's site list; its data comes from
    its own ``data-dir``, whatever dataset the server's list names."""
    cfg = tiny_config(tmp_path / "run", {"ct": "-", "mri": "-"})
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(sites["mri"]), "modality": "MRI", "site-name": "mri"})
    site, index = client_app.resolve_site(context, cfg)
    assert (site.name, site.dataset, site.modality, index) == ("mri", str(sites["mri"]), "MRI", 1)


def test_run_config_keys_of_flwr_run(tmp_path):
    cfg = config_from_run_config({"sites": "ct=- mri=-", "out": str(tmp_path / "run"), "rounds": 4,
                                  "local-epochs": 2, "strategy": "fedprox", "gin": False, "preset": "quick",
                                  "seed": 3, "min-sites": 0, "config-file": ""})
    assert [s.name for s in cfg.sites] == ["ct", "mri"]
    assert (cfg.rounds, cfg.local_epochs, cfg.strategy, cfg.train.gin, cfg.seed, cfg.min_sites) == \
        (4, 2, "fedprox", False, 3, None)
    assert RunConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())) == cfg
    recipe = config_from_run_config({"sites": "ct=-", "out": str(tmp_path / "run2"), "gin-views": 3,
                                     "clean-view": True, "consistency": 1.5, "ipa": False, "gin-p": 0.25,
                                     "lr-schedule": "constant"}).train
    assert (recipe.gin_views, recipe.clean_view, recipe.consistency, recipe.ipa, recipe.gin_p, recipe.lr_schedule) == \
        (3, True, 1.5, False, 0.25, "constant")
    # `flwr run` again on the same out resumes under the recorded config.json: the same keys (or a new
    # round timeout) continue it, never rewriting it; keys that change the run are refused, named
    keys = {"sites": "ct=- mri=-", "out": str(tmp_path / "run"), "rounds": 4, "local-epochs": 2,
            "strategy": "fedprox", "gin": False, "seed": 3}
    recorded = (tmp_path / "run" / "config.json").read_bytes()
    again = config_from_run_config({**keys, "round-timeout": 60})
    assert again.round_timeout == 60 and again.run_id == cfg.run_id
    assert (tmp_path / "run" / "config.json").read_bytes() == recorded
    with pytest.raises(FedginError, match=r"recorded configuration \(config.json\).*dp-clip \(recorded none, now 1.0\), "
                                          r"dp-noise \(recorded 0.0, now 1.0\), rounds \(recorded 4, now 6\); drop those keys"):
        config_from_run_config({**keys, "rounds": 6, "dp-clip": 1.0, "dp-noise": 1.0})
    assert (tmp_path / "run" / "config.json").read_bytes() == recorded
    with pytest.raises(FedginError, match="absolute"):
        config_from_run_config({"sites": "ct=-", "out": "relative/run"})
    with pytest.raises(FedginError, match="sites and out"):
        config_from_run_config({"sites": "", "out": str(tmp_path)})


# --- 2. aggregation ------------------------------------------------------------------------------

BN = "bn"


def _reference() -> dict[str, np.ndarray]:
    return {"conv.weight": np.zeros((3, 4), np.float32), "conv.bias": np.zeros(3, np.float32),
            f"{BN}.running_mean": np.zeros(3, np.float32), f"{BN}.running_var": np.ones(3, np.float32),
            f"{BN}.num_batches_tracked": np.array(0, np.int64)}


def _site_arrays(seed: int, steps: int, stats: list[float]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(3, 4)).astype(np.float32),
            "conv.bias": rng.normal(size=3).astype(np.float32),
            f"{BN}.running_mean": np.array(stats, np.float32),
            f"{BN}.running_var": np.array(stats, np.float32) ** 2 + 1,
            f"{BN}.num_batches_tracked": np.array(steps, np.int64)}


def _train_reply(node_id: int, site_index: int, arrays: dict[str, np.ndarray], num_examples: int,
                 loss: float) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                          message_type="train")
    metrics = {"num-examples": num_examples, "loss": loss, "seconds": 1.0, "modality": site_index,
               "site-index": site_index, **{f"dice-{o}": 0.5 for o in ORGANS}}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return delivered(Message(content, reply_to=instruction))


def _error_reply(node_id: int) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                          message_type="train")
    reason = "Traceback (most recent call last):\n  File ...\nRuntimeError: disk full at the site"
    return delivered(Message(Error(code=2, reason=reason), reply_to=instruction))


def _strategy(name: str, tmp_path: Path, *, min_sites: int = 2, log=None):
    cfg = resolve("quick", command="test", out=str(tmp_path), sites=(SiteSpec("ct", "-"), SiteSpec("mri", "-")))
    recorder = RoundRecorder(cfg, tmp_path, log=log or (lambda _: None))
    strategy = make_strategy(name, num_sites=2, min_sites=min_sites, recorder=recorder, reference=_reference(),
                             run_config_json=run_config_to_json(cfg))
    # FedAdam keeps the arrays it sent: configure the round as the server does
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in _reference().items()}), ConfigRecord(),
                             FakeGrid([1, 2]))
    return strategy


A = _site_arrays(1, steps=3, stats=[1.0, -2.5, 4.0])
B = _site_arrays(2, steps=6, stats=[3.0, 0.5, -4.0])


def _hand_average(key: str) -> np.ndarray:
    return 0.75 * A[key] + 0.25 * B[key]


def test_fedavg_is_the_slice_weighted_mean_and_keeps_integer_buffers(tmp_path):
    strategy = _strategy("fedavg", tmp_path)
    replies = [_train_reply(2, 1, B, 10, loss=2.0), _train_reply(1, 0, A, 30, loss=1.0)]

    arrays, metrics = strategy.aggregate_train(1, replies)

    result = {k: v.numpy() for k, v in arrays.items()}
    assert set(result) == set(A)
    for key in ("conv.weight", "conv.bias", f"{BN}.running_mean", f"{BN}.running_var"):
        assert result[key].dtype == np.float32
        assert np.array_equal(result[key], _hand_average(key)), key
    counter = result[f"{BN}.num_batches_tracked"]
    assert counter.dtype == np.int64 and counter.shape == () and int(counter) == round(0.75 * 3 + 0.25 * 6)
    assert metrics["num-examples"] == 40
    assert metrics["loss"] == pytest.approx(0.75 * 1.0 + 0.25 * 2.0)
    assert set(strategy.recorder.train[1]) == {0, 1}


def test_fedadam_averages_batchnorm_statistics_plainly(tmp_path):
    strategy = _strategy("fedadam", tmp_path)
    replies = [_train_reply(1, 0, A, 30, loss=1.0), _train_reply(2, 1, B, 10, loss=2.0)]

    arrays, _ = strategy.aggregate_train(1, replies)

    result = {k: v.numpy() for k, v in arrays.items()}
    for key in (f"{BN}.running_mean", f"{BN}.running_var"):
        assert result[key].dtype == np.float32
        assert np.array_equal(result[key], _hand_average(key)), key
    assert result[f"{BN}.num_batches_tracked"].dtype == np.int64
    assert int(result[f"{BN}.num_batches_tracked"]) == 4
    # the weights themselves took a server-side Adam step, not the average
    assert result["conv.weight"].dtype == np.float32
    assert not np.allclose(result["conv.weight"], _hand_average("conv.weight"))
    assert set(strategy.state()) == {"m_t", "v_t"}


def test_a_failed_site_is_left_out_and_logged(tmp_path):
    lines: list[str] = []
    strategy = _strategy("fedavg", tmp_path, min_sites=1, log=lines.append)

    arrays, metrics = strategy.aggregate_train(1, [_error_reply(2), _train_reply(1, 0, A, 30, loss=1.0)])

    result = {k: v.numpy() for k, v in arrays.items()}
    for key, value in A.items():
        assert np.array_equal(result[key], value) and result[key].dtype == value.dtype, key
    assert metrics["num-examples"] == 30
    assert len(strategy.recorder.failures[1]) == 1
    assert any("left out" in line and "RuntimeError: disk full at the site" in line for line in lines)


def test_too_few_sites_keep_the_global_model(tmp_path):
    lines: list[str] = []
    strategy = _strategy("fedavg", tmp_path, min_sites=2, log=lines.append)

    result = strategy.aggregate_train(1, [_train_reply(1, 0, A, 30, loss=1.0), _error_reply(2)])

    assert result == (None, None)
    assert any("fewer than --min-sites 2" in line for line in lines)


# --- 3. fedgin federate --------------------------------------------------------------------------

def _federate(sites: dict[str, Path], out: Path, *extra: str) -> subprocess.Popen:
    """``fedgin federate`` of the tiny config in a child process (each run starts its own Ray)."""
    args = [sys.executable, "-m", "fedgin.cli", "federate", "--out", str(out),
            *(f"--site={n}={p}" for n, p in sites.items()),
            "--local-epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", *extra]
    log = open(out.parent / f"{out.name}.log", "a")
    with log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0"))


def _finished(proc: subprocess.Popen, out: Path) -> None:
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        _stop([proc])
        code = None
    assert code == 0, (out.parent / f"{out.name}.log").read_text()[-4000:]


@pytest.mark.slow
def test_federate_writes_each_round_and_resumes_exactly(sites, tmp_path):
    """2 rounds straight == the same run stopped in round 2 (the state a server killed after the
    sites trained round 2, before its checkpoint, leaves: last.pt of round 1, the sites' round-2
    optimiser states, round 2's metrics lines) and ``fedgin federate --out RUN --resume`` alone,
    which takes every setting from config.json: the default poly schedule, planned for 2 rounds."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _finished(_federate(sites, whole, "--rounds", "2"), whole)
    shutil.copytree(whole, resumed)
    checkpoints = resumed / "checkpoints"
    shutil.copyfile(checkpoints / "round_001.pt", checkpoints / "last.pt")
    (checkpoints / "round_002.pt").unlink()
    recorded = (resumed / "config.json").read_bytes()
    with open(tmp_path / "resumed.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedgin.cli", "federate", "--out", str(resumed), "--resume"],
                                stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0"))
    _finished(proc, resumed)
    assert "resuming after round 1" in (tmp_path / "resumed.log").read_text()
    assert (resumed / "config.json").read_bytes() == recorded

    checkpoints = whole / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"round_001.pt", "round_002.pt", "last.pt"}
    assert load_raw(checkpoints / "last.pt")["meta"]["round"] == 2
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["site"], r["modality"]) for r in lines] == \
        [(1, "ct", "CT"), (1, "mri", "MRI"), (2, "ct", "CT"), (2, "mri", "MRI")]
    for row in lines:
        assert np.isfinite(row["loss"]) and row["seconds"] > 0
        assert set(row["dice"]) == set(ORGANS) and all(0 <= v <= 1 for v in row["dice"].values())
    assert lines[0]["lr"] > lines[2]["lr"] > 0  # poly: the rate falls over the planned rounds

    # an interrupted-and-resumed run ends with the same weights as an uninterrupted one
    for name in ("round_002.pt", "last.pt"):
        expected = load_raw(checkpoints / name)["state_dict"]
        got = load_raw(resumed / "checkpoints" / name)["state_dict"]
        assert list(got) == list(expected)
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), (name, key)
    resumed_lines = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["site"], r["loss"], r["lr"], r["dice"]) for r in resumed_lines] == \
        [(r["round"], r["site"], r["loss"], r["lr"], r["dice"]) for r in lines]


@pytest.mark.slow
def test_fedbn_records_the_validation_dice_of_the_checkpoint_it_saves(sites, tmp_path):
    """FedBN: each site trains with its own normalisation layers, but the round's validation Dice
    (and the post-processing plan decided from it) is of the model the checkpoint holds, the sites'
    averaged layers: ``evaluate`` of that checkpoint on a site's validation case reproduces it. The
    global weights with the site's own layers are scored beside it, as ``dice_own_norm``."""
    from fedgin.engine.checkpoint import load_checkpoint, normalisation_note
    from fedgin.evaluation.scoring import evaluate_cases

    out = tmp_path / "fedbn"
    _finished(_federate(sites, out, "--rounds", "1", "--strategy", "fedbn", "--lr", "0.05"), out)
    ckpt = load_checkpoint(out)
    assert ckpt.meta["normalisation"] == "averaged" and "sites' average" in normalisation_note(ckpt)
    cfg = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    lines = {r["site"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for site in load_sites(cfg):
        refs = [c for c in site.dataset.cases if c.case_id in site.split.val]
        assert len(refs) == 1
        (scored,) = evaluate_cases(ckpt, refs, cache_dir=tmp_path / "cache", with_hd95=False, postprocess=False)
        recorded = lines[site.name]["dice"]
        assert any(v is not None for v in recorded.values())
        for organ, value in recorded.items():
            got = scored["metrics"].get(organ, {}).get("dice")
            assert (value is None and got is None) or value == pytest.approx(got, abs=1e-6), (site.name, organ)
        assert set(lines[site.name]["dice_own_norm"]) == set(recorded)
        # the site's own layers are not the checkpoint's: the two numbers describe two models
        own = np.load(out / "site-state" / site.name / cfg.run_id / "local_norm_layers.npz")
        assert any(not np.array_equal(own[k], ckpt.state_dict[k].numpy()) for k in own.files)


# --- 4. a real deployment: SuperLink with TLS and SuperNode auth, two SuperNodes -----------------

@pytest.mark.slow
@pytest.mark.long
def test_deployment_with_tls_and_supernode_authentication(sites, tmp_path):
    link = Loopback(tmp_path)
    try:
        link.start_superlink()
        for name in ("ct", "mri"):
            done = link.flwr("supernode", "register", str(link.keys[name][1]), "loopback")
            assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr

        # refused: a key the SuperLink does not know (turned away at once), and a plaintext
        # connection (never gets an answer; a SuperNode retries forever unless told otherwise)
        ca = str(link.certs["ca"])
        stranger = link.supernode("stranger", link.node_ports[2], "--root-certificates", ca,
                                  "--auth-supernode-private-key", str(link.keys["stranger"][0]))
        plaintext = link.supernode("plaintext", link.node_ports[3], "--insecure", "--max-retries", "2")
        for name, proc in (("stranger", stranger), ("plaintext", plaintext)):
            code = _wait(proc, 90)
            assert code not in (None, 0), f"{name} SuperNode was not refused:\n" + link.log(f"supernode-{name}")
            assert "SuperNode ID" not in link.log(f"supernode-{name}")
        assert "Failed to activate SuperNode" in link.log("supernode-stranger")
        assert "No SuperNode found with the given public key" in link.log("superlink")

        # two sites: each SuperNode names its data; the server's site list only names the sites
        cache = tmp_path / "cache"
        for i, (name, modality) in enumerate((("ct", "CT"), ("mri", "MRI"))):
            node_config = f"data-dir='{sites[name]}' modality='{modality}' site-name='{name}'"
            proc = link.supernode(name, link.node_ports[i], "--root-certificates", ca,
                                  "--auth-supernode-private-key", str(link.keys[name][0]),
                                  "--node-config", node_config)
            link.wait_connected(name, proc)
        listed = link.flwr("supernode", "ls", "loopback", "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert sorted(n["status"] for n in json.loads(listed.stdout)["nodes"]) == ["online", "online"]

        out = tmp_path / "run"
        config_file = tmp_path / "tiny.json"
        replace(tiny_config(out, {"ct": "-", "mri": "-"}), cache_dir=str(cache)).write(config_file)
        run = link.start("flwr-run", [str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream",
                                      "--run-config", f"config-file='{config_file}'"])
        code = _wait(run, 300)
        assert code is not None, "flwr run did not finish in 300 s:\n" + link.log("flwr-run")[-4000:]
        last = out / "checkpoints" / "last.pt"
        assert last.exists(), link.log("flwr-run")[-4000:]
        assert code == 0, link.log("flwr-run")[-4000:]
        assert load_raw(last)["meta"]["round"] == 2
        assert load_raw(last)["meta"]["sites_replied"] == 2
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(r["round"], r["site"], r["modality"]) for r in lines] == \
            [(1, "ct", "CT"), (1, "mri", "MRI"), (2, "ct", "CT"), (2, "mri", "MRI")]

        # the same SuperNodes, a run with secure aggregation (SecAgg+ in Flower's processes); one
        # round: the masked exchange is the same in every round, and the run above showed the rounds
        secure = tmp_path / "secagg-run"
        replace(tiny_config(secure, {"ct": "-", "mri": "-"}, rounds=1), cache_dir=str(cache),
                secagg=True).write(config_file)
        run = link.start("flwr-run-secagg", [str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream",
                                             "--run-config", f"config-file='{config_file}'"])
        code = _wait(run, 300)
        assert code == 0, link.log("flwr-run-secagg")[-4000:]
        assert load_raw(secure / "checkpoints" / "last.pt")["meta"]["round"] == 1
        assert load_raw(secure / "checkpoints" / "last.pt")["meta"]["sites_replied"] == 2
        lines = [json.loads(line) for line in (secure / "metrics.jsonl").read_text().splitlines()]
        assert [(r["round"], r["site"], r["trained"]) for r in lines] == [(1, "ct", True), (1, "mri", True)]
    finally:
        stopped = _stop(link.procs)
    assert len(stopped) >= 3 and not any(_alive(pid) for pid in stopped)
