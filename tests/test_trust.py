"""Options that do what they say (issue 23): a round waits for its sites with a timeout and stops
in one line, two nodes cannot share a site index, a site keeps its two newest optimiser states
past round 999, ``--min-sites`` above the sites and ``--consistency`` that would do nothing are
refused in one line."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedgin.config import SiteSpec, resolve
from fedgin.errors import FedginError
from fedgin.federated import client_app
from fedgin.federated.recorder import RoundRecorder
from fedgin.federated.strategy import check_options, make_strategy
from fedgin.federated.task import run_config_to_json
from server_side import FakeGrid

pytestmark = pytest.mark.usefixtures("server_task_identity")

METRICS = {"loss": 1.0, "seconds": 1.0, "modality": 0, "lr": 1e-3, "num-examples": 5}


def _config(tmp_path, num_sites=2, **options):
    sites = tuple(SiteSpec(f"site{i}", "-") for i in range(num_sites))
    return resolve("quick", command="test", out=str(tmp_path), sites=sites, **options)


def _strategy(cfg, tmp_path, lines, **options):
    n = len(cfg.sites)
    return make_strategy("fedavg", num_sites=n, min_sites=options.pop("min_sites", n),
                         reference={"w": np.zeros(3, np.float32)}, run_config_json=run_config_to_json(cfg),
                         recorder=RoundRecorder(cfg, tmp_path, log=lines.append), **options)


def test_a_round_waits_for_its_sites_with_a_timeout_and_stops_in_one_line(tmp_path):
    strategy = _strategy(_config(tmp_path), tmp_path, [], connect_timeout=0.3)
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    for configure in (strategy.configure_train, strategy.configure_evaluate):
        start = time.monotonic()
        with pytest.raises(FedginError, match=r"^round 1: 1 of the 2 site\(s\) a round needs \(--min-sites\) "
                                              r"connected within 0.3 s \(--round-timeout\); the run stops$"):
            configure(1, arrays, ConfigRecord(), FakeGrid([7]))
        assert 0.25 < time.monotonic() - start < 5
    assert len(list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([7, 8])))) == 2


def test_min_sites_above_the_sites_is_refused(tmp_path):
    with pytest.raises(FedginError, match=r"--min-sites 3 is more than the run's 2 site\(s\)"):
        check_options(_config(tmp_path, min_sites=3))
    check_options(_config(tmp_path, min_sites=2))


def test_two_nodes_reporting_one_site_index_stop_the_run(tmp_path):
    lines = []
    strategy = _strategy(_config(tmp_path), tmp_path, lines)
    instructions = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
                                                 ConfigRecord(), FakeGrid([11, 12])))
    # two unnamed SuperNodes whose data folders are both called "data": the same derived index
    index = client_app.resolve_site(Context(1, 11, {"data-dir": "/a/data"}, RecordDict(), {}),
                                    _config(tmp_path))[1]
    assert index == client_app.resolve_site(Context(1, 12, {"data-dir": "/b/data"}, RecordDict(), {}),
                                            _config(tmp_path))[1]
    assert index == zlib.crc32(b"data") + 2  # the full 32-bit hash, past the named sites' indices
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
                                   "metrics": MetricRecord({**METRICS, "site-index": index})}), reply_to=m)
               for m in instructions]
    with pytest.raises(FedginError, match=rf"round 1: nodes 11 and 12 both report site-index {index} "
                                          r"\(site\d+\): give each SuperNode its own site-name"):
        strategy.aggregate_train(1, replies)


def test_a_site_keeps_its_two_newest_optimiser_states_past_round_999(tmp_path):
    cfg = _config(tmp_path, 1)
    site = cfg.sites[0]
    context = Context(1, 1, {"partition-id": 0, "state-dir": str(tmp_path / "state")}, RecordDict(), {})
    for server_round in (998, 999, 1000, 1001):
        client_app.save_optimizer_state(context, cfg, site, server_round, {"step": server_round})
    folder = client_app._optimizer_path(context, cfg, site, 1).parent
    assert sorted(p.name for p in folder.glob("optimizer_round_*.pt")) == \
        ["optimizer_round_1000.pt", "optimizer_round_1001.pt"]
    fresh = Context(1, 1, dict(context.node_config), RecordDict(), {})  # a resumed run: empty context.state
    assert client_app.load_optimizer_state(fresh, cfg, site, 1002) == {"step": 1001}


@pytest.mark.parametrize("overrides, why", [
    ({"consistency": 2.0}, "each slice has one view"),
    ({"consistency": 2.0, "gin_views": 3, "gin": False}, r"GIN is off \(--no-gin\)"),
])
def test_a_consistency_weight_that_would_do_nothing_is_refused(tmp_path, overrides, why):
    with pytest.raises(FedginError, match=rf"--consistency 2 would do nothing: {why}"):
        resolve("quick", command="test", out=str(tmp_path), sites=(SiteSpec("ct", "-"),), train_overrides=overrides)
    for fine in ({"consistency": 2.0, "gin_views": 2}, {"consistency": 2.0, "clean_view": True}, {"consistency": 0.0}):
        resolve("quick", command="test", out=str(tmp_path), sites=(SiteSpec("ct", "-"),), train_overrides=fine)
