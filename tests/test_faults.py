"""Faults during a federated run, on Flower's own processes (TLS SuperLink with SuperNode
authentication, two SuperNodes, ``flwr run``; see ``loopback.py``), and damaged checkpoints.

1. A site whose training starts failing mid-run is left out of its rounds; the run goes on with
   the other site and the server learns only the kind of error, never a path or a case id.
2. A SuperNode that dies mid-run (SIGKILL of its whole process tree) is waited for at most the
   round timeout; the run completes its rounds with the other site.
3. A coordinator that dies mid-run (SIGKILL of the SuperLink, its SuperExec and the ServerApp)
   loses at most the round in progress: a restarted SuperLink and the same ``flwr run`` resume
   after the last checkpoint, earlier checkpoints stay as they were and ``metrics.jsonl`` ends with
   exactly one line per site per round.
4. Checkpoints are written atomically, and a damaged ``last.pt`` is refused in one line.

Every process a test starts is stopped by PID (with its descendants) in ``finally``; each slow
test runs against its own deadline.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from conftest import copy_sites
from fedgin.cli import main
from fedgin.config import SiteSpec, resolve
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme
from fedgin.data.sites import load_site
from fedgin.data.splits import split_for
from fedgin.engine.checkpoint import load_raw, save_checkpoint
from fedgin.engine.model import build_model
from fedgin.federated.recorder import RoundRecorder
from fedgin.federated.strategy import make_strategy
from fedgin.federated.task import run_config_to_json
from loopback import Loopback, alive, crash, metrics_lines, stop, tiny_config, wait
from server_side import FakeGrid

SCHEME = get_scheme("abdomen5")
MODALITIES = {"ct": "CT", "mri": "MRI"}


@pytest.fixture
def sites(tmp_path, phantom_datasets) -> dict[str, Path]:
    """A CT and an MRI phantom site of 3 cases each (2 training, 1 test), this test's own copy."""
    ct, mri = copy_sites(phantom_datasets(3, 3), tmp_path / "data")
    return {"ct": ct, "mri": mri}


class Deadline:
    """One time budget for a whole test: every wait in it takes what is left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def wait_until(check, deadline: Deadline, what: str, link: Loopback, run: subprocess.Popen | None = None,
               log: str = "flwr-run"):
    """Poll ``check()`` until it returns something true; fail if ``run`` ends first or the test's
    time is up. Notes the process trees on the way (for the final clean-up)."""
    while True:
        link.note_tree()
        value = check()
        if value:
            return value
        if run is not None and run.poll() is not None:
            pytest.fail(f"flwr run ended (code {run.returncode}) before {what}:\n{link.log(log)[-4000:]}")
        if not deadline.left():
            pytest.fail(f"timed out waiting for {what}:\n{link.log(log)[-4000:]}")
        time.sleep(0.2)


def finish(link: Loopback, run: subprocess.Popen, deadline: Deadline, log: str = "flwr-run") -> None:
    """Wait for ``flwr run`` to end with code 0 within the test's time."""
    code = None
    while code is None and deadline.left():
        link.note_tree()
        code = wait(run, min(2.0, deadline.left()))
    assert code is not None, f"flwr run did not finish in time:\n{link.log(log)[-4000:]}"
    assert code == 0, link.log(log)[-4000:]


@contextlib.contextmanager
def deployment(tmp_path: Path, sites: dict[str, Path], *superlink_args: str) -> Iterator[tuple[Loopback, dict]]:
    """SuperLink (TLS, SuperNode auth), the two site keys registered, one SuperNode per site; on
    exit every process started (and any stray of theirs) is stopped, checked gone."""
    link = Loopback(tmp_path)
    try:
        link.start_superlink(*superlink_args)
        link.register("ct", "mri")
        yield link, {name: link.site(i, name, sites[name], MODALITIES[name]) for i, name in enumerate(("ct", "mri"))}
    finally:
        stopped = link.stop_all()
        assert not any(alive(pid) for pid in stopped)


def write_config(tmp_path: Path, out: Path, **overrides) -> Path:
    """The tiny config (3 rounds unless told) for a deployment (the server names the sites; the SuperNodes hold
    the data); the preprocessing cache is the sites' own."""
    path = tmp_path / "tiny.json"
    cfg = tiny_config(out, {"ct": "-", "mri": "-"}, cache_dir=str(tmp_path / "cache"), **{"rounds": 3, **overrides})
    cfg.write(path)
    return path


def warm_cache(tmp_path: Path, sites: dict[str, Path]) -> None:
    """Preprocess both sites into the run's cache before the run starts, so that round 1 times
    training and not the first preprocessing (on a loaded CI machine that alone can pass a short
    round timeout and leave a live site out of round 1)."""
    cfg = tiny_config(tmp_path / "unused", {"ct": "-", "mri": "-"}, cache_dir=str(tmp_path / "cache"))
    for name, path in sites.items():
        load_site(name, str(path), SCHEME, cfg.preprocess, seed=cfg.seed, cache_dir=tmp_path / "cache",
                  modality=MODALITIES[name])


def rounds_of(out: Path) -> list[tuple[int, str, bool]]:
    return [(r["round"], r["site"], r["trained"]) for r in metrics_lines(out)]


def round_recorded(out: Path, server_round: int) -> bool:
    """Both sites' lines of ``server_round`` are in metrics.jsonl."""
    return sum(1 for r in metrics_lines(out) if r["round"] == server_round) >= 2


def checkpoint_round(path: Path) -> int | None:
    try:
        return int(load_raw(path)["meta"]["round"]) if path.exists() else None
    except Exception:  # being replaced right now
        return None


def server_output(link: Loopback, *names: str) -> str:
    """What the coordinator's side printed: the streamed ServerApp log and the SuperLink's own."""
    return "\n".join(link.log(n) for n in names if (link.logs / f"{n}.log").exists())


def train_case(dataset: Path) -> tuple[str, Path]:
    """A training case of ``dataset`` (its split's first) and its image file."""
    data = open_dataset(dataset, SCHEME)
    case_id = split_for(data.name, [c.case_id for c in data.cases], 0).train[0]
    return case_id, Path(data.case(case_id).image)

# --- 0. what the server logs about a site it lost (the strategy alone) -----------------------------

def _sent(strategy, server_round: int, reference: dict, node_ids: list[int]) -> list[Message]:
    """The round's train instructions in ``node_ids`` order, given message ids as the Grid does
    when it sends them."""
    messages = strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in reference.items()}),
                                        ConfigRecord(), FakeGrid(node_ids))
    for message in messages:
        message.metadata.__dict__["_message_id"] = f"round{server_round}-node{message.metadata.dst_node_id}"
    by_node = {m.metadata.dst_node_id: m for m in messages}
    assert sorted(by_node) == sorted(node_ids)
    return [by_node[n] for n in node_ids]


def _reply(instruction: Message, site_index: int, reference: dict) -> Message:
    metrics = {"num-examples": 10, "loss": 1.0, "seconds": 1.0, "modality": site_index, "site-index": site_index,
               **{f"dice-{o}": 0.5 for o in SCHEME.organs}}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v + 1) for k, v in reference.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=instruction)


def test_the_server_log_names_each_site_it_lost_and_why(tmp_path, server_task_identity):
    """A site's failure reply, the SuperLink's "node unavailable" for a dead SuperNode (sent from
    node 0), no reply by the round timeout, and a site not connected: each is a line naming the
    site that was left out of the round."""
    cfg = resolve("quick", command="test", out=str(tmp_path), sites=(SiteSpec("ct", "-"), SiteSpec("mri", "-")))
    lines: list[str] = []
    reference = {"w": np.zeros(3, np.float32)}
    strategy = make_strategy("fedavg", num_sites=2, min_sites=1, reference=reference,
                             recorder=RoundRecorder(cfg, tmp_path, log=lines.append),
                             run_config_json=run_config_to_json(cfg))

    ct, mri = _sent(strategy, 1, reference, [11, 12])
    strategy.aggregate_train(1, [_reply(ct, 0, reference), _reply(mri, 1, reference)])
    assert lines == []

    ct, mri = _sent(strategy, 2, reference, [11, 12])
    unavailable = create_message_error_unavailable_res_message(mri.metadata, "node_unavail")
    assert unavailable.metadata.src_node_id == SUPERLINK_NODE_ID
    arrays, _ = strategy.aggregate_train(2, [_reply(ct, 0, reference), unavailable])
    assert arrays is not None
    assert lines == ["round 2: a site failed and was left out of this round: node 12 (site mri): "
                     f"{unavailable.error.reason}"]

    lines.clear()
    ct, mri = _sent(strategy, 3, reference, [11, 12])
    arrays, _ = strategy.aggregate_train(3, [_reply(mri, 1, reference)])
    assert arrays is not None
    assert lines == ["round 3: a site failed and was left out of this round: node 11 (site ct): "
                     "no reply within the round timeout"]

    lines.clear()
    (ct,) = _sent(strategy, 4, reference, [11])
    assert strategy.aggregate_train(4, []) == (None, None)
    assert lines[:2] == ["round 4: 1 of 2 sites connected; the others are left out of this round",
                         "round 4: a site failed and was left out of this round: node 11 (site ct): "
                         "no reply within the round timeout"]
    assert "fewer than --min-sites 1" in lines[2]


# --- 1. a site that starts failing ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.long
def test_a_site_that_fails_mid_run_is_left_out_and_the_run_goes_on(sites, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, out, min_sites=1, round_timeout=120.0)
    warm_cache(tmp_path, sites)
    deadline = Deadline(600)
    with deployment(tmp_path, sites) as (link, nodes):
        run = link.run(config)
        wait_until(lambda: round_recorded(out, 1), deadline, "round 1", link, run)
        # from round 2 on, the MRI site cannot read one of its training images: each message runs
        # in a fresh ClientApp process, which reads the site's data again and fails
        case_id, image = train_case(sites["mri"])
        image.write_bytes(b"this is not a NIfTI file\n" * 40)
        finish(link, run, deadline)

        assert checkpoint_round(out / "checkpoints" / "last.pt") == 3
        assert [load_raw(out / "checkpoints" / f"round_{r:03d}.pt")["meta"]["sites_replied"] for r in (1, 2, 3)] \
            == [2, 1, 1]
        lines = rounds_of(out)
        assert [line for line in lines if line[0] == 1] == [(1, "ct", True), (1, "mri", True)]
        for server_round in (2, 3):
            assert [line for line in lines if line[0] == server_round and line[1] == "ct"] == \
                [(server_round, "ct", True)], lines
            assert all(not trained for r, site, trained in lines if r == server_round and site == "mri"), lines

        server = server_output(link, "flwr-run", "superlink")
        left_out = [line for line in server.splitlines() if "left out of this round" in line]
        for server_round in (2, 3):
            assert any(re.match(rf"round {server_round}: a site failed and was left out of this round: "
                                r"node \d+ \(site mri\): ", line) for line in left_out), server[-4000:]
        # the server learns the kind of error and nothing else: no path, file or case id
        for line in left_out:
            assert "SiteFailure" in line and "DataError" in line, line
            for secret in (str(sites["mri"]), sites["mri"].name, image.name, case_id, "imagesTr", ".nii"):
                assert secret not in line, (secret, line)
        for secret in (str(sites["mri"]), image.name, case_id):
            assert secret not in server, secret
        # the details stayed in the site's own log
        assert case_id in link.log("supernode-mri")


# --- 2. a SuperNode that dies --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.long
def test_a_killed_supernode_costs_at_most_the_round_timeout(sites, tmp_path):
    out = tmp_path / "run"
    timeout = 60.0
    config = write_config(tmp_path, out, min_sites=1, round_timeout=timeout)
    warm_cache(tmp_path, sites)
    deadline = Deadline(600)
    with deployment(tmp_path, sites) as (link, nodes):
        run = link.run(config)
        wait_until(lambda: round_recorded(out, 1), deadline, "round 1", link, run)
        killed = crash(nodes["mri"])
        assert len(killed) >= 2 and not any(alive(pid) for pid in killed)  # SuperNode + its SuperExec
        crashed_at = time.monotonic()
        wait_until(lambda: checkpoint_round(out / "checkpoints" / "last.pt") == 2, deadline, "round 2", link, run)
        round_2_seconds = time.monotonic() - crashed_at
        finish(link, run, deadline)

        assert checkpoint_round(out / "checkpoints" / "last.pt") == 3
        assert [load_raw(out / "checkpoints" / f"round_{r:03d}.pt")["meta"]["sites_replied"] for r in (1, 2, 3)] \
            == [2, 1, 1]
        # the gap: the dead site has no line after round 1, the other one trained every round
        assert rounds_of(out) == [(1, "ct", True), (1, "mri", True), (2, "ct", True), (3, "ct", True)]
        # round 2 waited for the dead node at most the round timeout, once for train and once for
        # evaluate (plus the live site's own work)
        assert round_2_seconds < 2 * timeout + 60, round_2_seconds
        # the server says which site it lost, each round: in round 2 the SuperLink still counts the
        # dead node as connected (until 2 missed heartbeats, up to 60 s) and its reply never comes;
        # by round 3 the node is offline and is not even asked
        server = server_output(link, "flwr-run", "superlink")
        assert re.search(r"^round 2: a site failed and was left out of this round: node \d+ \(site mri\): "
                         r"(no reply within the round timeout|Error: Node Unavailable)", server, re.M), server[-4000:]
        assert re.search(r"^round 3: (1 of 2 sites connected|a site failed and was left out of this round: "
                         r"node \d+ \(site mri\))", server, re.M), server[-4000:]


# --- 3. the coordinator dies ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.long
def test_a_killed_server_resumes_losing_at_most_the_round_in_progress(sites, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, out, rounds=2)
    warm_cache(tmp_path, sites)
    deadline = Deadline(600)
    database = tmp_path / "superlink.db"  # as in docs/deployment.md: registrations survive a restart
    with deployment(tmp_path, sites, "--database", str(database)) as (link, nodes):
        superlink = link.procs[0]
        run = link.run(config)
        wait_until(lambda: checkpoint_round(out / "checkpoints" / "last.pt") == 1, deadline, "round 1", link, run)
        round_1 = (out / "checkpoints" / "round_001.pt").read_bytes()
        # round 2 in progress: both sites have its instructions and are training
        wait_until(lambda: all(link.log(f"supernode-{name}").count("Receiving: train message") == 2
                               for name in ("ct", "mri")), deadline, "round 2 to start", link, run)

        killed = crash(superlink)  # the SuperLink, its SuperExec and the ServerApp, at once
        assert len(killed) >= 3 and not any(alive(pid) for pid in killed)
        if wait(run, 30) is None:  # the researcher's `flwr run --stream` may keep retrying: stop it
            stop([run])
        assert checkpoint_round(out / "checkpoints" / "last.pt") == 1
        assert not (out / "checkpoints" / "round_002.pt").exists()

        # a new SuperLink on the same address and database: the sites' keys are still registered
        # and the SuperNodes, which kept retrying, reconnect by themselves (nothing restarts them)
        link.start_superlink("--database", str(database), name="superlink-2")
        assert all(node.poll() is None for node in nodes.values())
        resumed = link.run(config, name="flwr-run-2")
        finish(link, resumed, deadline, log="flwr-run-2")

        assert "resuming after round 1" in server_output(link, "flwr-run-2", "superlink-2")
        assert checkpoint_round(out / "checkpoints" / "last.pt") == 2
        assert load_raw(out / "checkpoints" / "round_002.pt")["meta"]["sites_replied"] == 2
        assert (out / "checkpoints" / "round_001.pt").read_bytes() == round_1
        assert {p.name for p in (out / "checkpoints").iterdir()} == {"round_001.pt", "round_002.pt", "last.pt"}
        assert rounds_of(out) == [(r, s, True) for r in (1, 2) for s in ("ct", "mri")]


# --- 4. checkpoints: atomic, and a damaged one refused -------------------------------------------

def _save(path: Path, seed: int, server_round: int) -> Path:
    cfg = tiny_config(path.parent, {"ct": "-"})
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(cfg.model).state_dict(), model_config=cfg.model, scheme=SCHEME,
                           preprocess=cfg.preprocess, sites=[{"name": "ct", "modality": "CT"}],
                           meta={"mode": "federated", "round": server_round, "seed": seed}, extra={})


def _finished_run(run: Path) -> Path:
    """A run dir as a finished 2-round federated run leaves it (checkpoints only)."""
    checkpoints = run / "checkpoints"
    _save(checkpoints / "round_001.pt", 1, 1)
    _save(checkpoints / "round_002.pt", 2, 2)
    return _save(checkpoints / "last.pt", 2, 2)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(capsys, argv: list) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in out + err, err
    return lines[0]


def test_a_damaged_last_checkpoint_is_refused_in_one_line(sites, tmp_path, capsys):
    run = tmp_path / "run"
    last = _finished_run(run)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, as by a full disk
    before = _snapshot(run)

    line = _one_error_line(capsys, ["federate", "--site", f"ct={sites['ct']}", "--site", f"mri={sites['mri']}",
                                    "--out", run, "--rounds", "3", "--resume"])
    assert line.startswith(f"fedgin: error: {last}: damaged or not a fedgin checkpoint"), line

    line = _one_error_line(capsys, ["evaluate", "--model", run, "--data", sites["ct"], "--out", tmp_path / "eval"])
    assert line.startswith(f"fedgin: error: {last}: damaged or not a fedgin checkpoint"), line

    assert _snapshot(run) == before  # nothing rewritten, nothing added
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("interruption", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch, interruption):
    last = _save(tmp_path / "checkpoints" / "last.pt", 1, 1)
    previous = last.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, fh, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        fh.flush()
        raise interruption

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(type(interruption)):
        _save(last, 2, 2)

    assert last.read_bytes() == previous
    assert load_raw(last)["meta"]["round"] == 1
    assert [p.name for p in last.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


_WRITER = """
import io, sys, time
from pathlib import Path
import torch
import test_faults

real_save = torch.save
def save_half_and_hang(obj, fh, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    fh.flush()
    print("half written", flush=True)
    time.sleep(600)
torch.save = save_half_and_hang
test_faults._save(Path(sys.argv[1]), 2, 2)
"""


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    """SIGKILL while ``last.pt`` is being replaced: readers see the old file all along, and
    after the kill too (only an unnamed temporary file is left, never a partial ``last.pt``)."""
    last = _save(tmp_path / "checkpoints" / "last.pt", 1, 1)
    previous = last.read_bytes()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(last)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline().strip() == "half written"
        assert last.read_bytes() == previous  # mid-write
        temporary = [p for p in last.parent.iterdir() if p.name != "last.pt"]
        assert len(temporary) == 1 and temporary[0].name.startswith(".tmp-")
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        writer.stdout.close()
    assert last.read_bytes() == previous
    assert load_raw(last)["meta"]["round"] == 1
