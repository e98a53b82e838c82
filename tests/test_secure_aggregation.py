"""Secure aggregation (`fedgin federate --secagg`, Flower's SecAgg+): what the server receives from a
site is masked, not the site's weights, while the round's global model equals plain FedAvg's
within SecAgg+'s quantisation; bad combinations are refused.

Each run is `fedgin federate` in a child process whose ServerApp's Grid records every reply the
server receives (the script below), once with SecAgg+ and once without; the run without it shows
what the CT site's weights were.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters

from fedgin.config import SiteSpec, resolve
from fedgin.engine.checkpoint import load_raw
from fedgin.errors import FedginError
from fedgin.federated.recorder import RoundRecorder
from fedgin.federated.secagg import CLIP_RANGE, MaskedMean
from fedgin.federated.strategy import MEAN_STRATEGIES, check_options, make_strategy
from fedgin.federated.task import run_config_to_json
from server_side import FakeGrid

RECORDING_RUN = '''
import pickle, sys
import fedgin.federated.server_app as server_app
from fedgin.cli import main

received = []

class RecordingGrid:
    """The ServerApp's Grid, keeping a copy of every reply the server receives."""
    def __init__(self, grid):
        self._grid = grid
    def __getattr__(self, name):
        return getattr(self._grid, name)
    def send_and_receive(self, messages, *args, **kwargs):
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for r in replies:
            if r.has_error():
                continue
            arrays = {k: {n: a.numpy() for n, a in rec.items()} for k, rec in r.content.array_records.items()}
            configs = {k: dict(rec) for k, rec in r.content.config_records.items()}
            metrics = {k: dict(rec) for k, rec in r.content.metric_records.items()}
            received.append({"node": r.metadata.src_node_id, "type": r.metadata.message_type,
                             "arrays": arrays, "configs": configs, "metrics": metrics})
        return replies

run_server = server_app.run_server
server_app.run_server = lambda grid, cfg, **kw: run_server(RecordingGrid(grid), cfg, **kw)
sys.argv = ["fedgin", "federate", *sys.argv[2:]]
code = main()
with open(OUT, "wb") as fh:
    pickle.dump(received, fh)
sys.exit(code)
'''


def _run(tmp_path: Path, sites: dict[str, Path], name: str, *extra: str) -> subprocess.Popen:
    out = tmp_path / name
    script = tmp_path / f"{name}.py"
    script.write_text(f"OUT = {str(tmp_path / (name + '.pkl'))!r}\n" + RECORDING_RUN)
    args = [sys.executable, str(script), "federate", "--out", str(out),
            *(f"--site={n}={p}" for n, p in sites.items()), "--rounds", "1", "--local-epochs", "1",
            "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_the_server_sees_only_masked_updates_and_their_mean_is_fedavgs(phantom_datasets, tmp_path):
    ct, mri = phantom_datasets(4, 4)
    sites = {"ct": ct, "mri": mri}
    procs = {name: _run(tmp_path, sites, name, *extra) for name, extra in (("plain", ()), ("secagg", ("--secagg",)))}
    outputs = {name: p.communicate(timeout=400)[0] for name, p in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, outputs[name][-3000:])
    plain = pickle.loads((tmp_path / "plain.pkl").read_bytes())
    secagg = pickle.loads((tmp_path / "secagg.pkl").read_bytes())

    # without SecAgg+ the server holds the CT site's weights in the clear
    (ct_reply,) = [r for r in plain if r["type"] == "train" and r["metrics"]["metrics"]["site-index"] == 0]
    ct_weights = np.concatenate([v.ravel() for v in ct_reply["arrays"]["arrays"].values()]).astype(np.float64)

    # with it: no weights in any reply; the masked vectors are unrelated to them
    trains = [r for r in secagg if r["type"] == "train"]
    assert trains and all(not any(rec for rec in r["arrays"].values()) for r in trains)
    masked = [r["configs"]["secaggplus_configs"]["masked_params"] for r in trains
              if "masked_params" in r["configs"].get("secaggplus_configs", {})]
    assert len(masked) == 2
    for vector in masked:
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in vector]).astype(np.float64)
        # the first entry is the site's weight factor, the rest one integer per model weight
        values = values[-ct_weights.size:]
        quantised = (ct_weights + CLIP_RANGE) / (2 * CLIP_RANGE)
        assert abs(np.corrcoef(values, quantised)[0, 1]) < 0.05
        assert values.max() > 2 ** 31  # masks spread over the whole 32-bit ring
    # the scalar metrics still travel in the clear (documented)
    assert {int(r["configs"]["fitres.metrics"]["site-index"]) for r in trains if "fitres.metrics" in r["configs"]} \
        == {0, 1}

    # the unmasked mean is FedAvg's, to SecAgg+'s quantisation
    got = load_raw(tmp_path / "secagg" / "checkpoints" / "round_001.pt")["state_dict"]
    expected = load_raw(tmp_path / "plain" / "checkpoints" / "round_001.pt")["state_dict"]
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype
        assert np.allclose(got[key].numpy(), expected[key].numpy(), atol=1e-4), key
    assert "secure aggregation" in outputs["secagg"]


@pytest.mark.parametrize("options, message", [
    ({"strategy": "fedadam"}, "not fedadam"),
    ({"dp_clip": 1.0}, "not supported"),
])
def test_secagg_refuses_what_it_cannot_aggregate(tmp_path, options, message):
    sites = (SiteSpec("ct", "-"), SiteSpec("mri", "-"))
    cfg = resolve("quick", command="test", out=str(tmp_path), sites=sites, secagg=True, **options)
    with pytest.raises(FedginError, match=message):
        check_options(cfg)


class _Proxy:
    def __init__(self, node_id):
        self.node_id = node_id


class _Manager:
    """The part of a legacy client manager ``MaskedMean.configure_fit`` uses."""

    def all(self):
        return {str(n): _Proxy(n) for n in (2, 1)}


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize("strategy", MEAN_STRATEGIES)
def test_secagg_sends_the_strategys_own_train_config(tmp_path, strategy):
    """The SecAgg+ path builds its train instruction itself (legacy FitIns): it must carry what the
    strategy's own ``configure_train`` sends, FedProx's ``proximal-mu`` included; FedBN's local
    layers follow from the run config's strategy, which the site reads."""
    sites = (SiteSpec("ct", "-"), SiteSpec("mri", "-"))
    cfg = resolve("quick", command="test", out=str(tmp_path), sites=sites, secagg=True, strategy=strategy,
                  proximal_mu=0.25)
    check_options(cfg)
    reference = {"w": np.zeros(3, np.float32)}
    made = make_strategy(strategy, num_sites=2, min_sites=2, reference=reference, proximal_mu=cfg.proximal_mu,
                         recorder=RoundRecorder(cfg, tmp_path, log=lambda _: None),
                         run_config_json=run_config_to_json(cfg), round_offset=4)
    plain = [dict(m.content["config"]) for m in made.configure_train(
        1, ArrayRecord({"w": Array(reference["w"])}), ConfigRecord(), FakeGrid([1, 2]))]
    fit = MaskedMean(made).configure_fit(5, ndarrays_to_parameters([reference["w"]]), _Manager())
    assert [proxy.node_id for proxy, _ in fit] == [1, 2]
    for (_, ins), expected in zip(fit, plain):
        assert ins.config == expected
        assert ins.config["server-round"] == 5
        assert json.loads(ins.config["run-config"])["strategy"] == strategy
        assert ins.config.get("proximal-mu") == (0.25 if strategy == "fedprox" else None)
