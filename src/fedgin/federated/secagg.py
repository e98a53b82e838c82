"""Secure aggregation with Flower's SecAgg+ (``--secagg``; experimental): the server receives each
site's update only masked, and unmasks nothing but their weighted sum.

Flower 1.42 ships SecAgg+ for its legacy API only: ``SecAggPlusWorkflow`` drives a legacy
``flwr.server.strategy.Strategy`` through a ``LegacyContext``, and the site's ``secaggplus_mod``
masks a legacy ``FitRes``. fedgin's strategies are Message-API ones, so a run with ``--secagg``
takes this loop instead of ``Strategy.start``: each round, the workflow runs the four SecAgg+
stages (its training stage through :class:`MaskedMean`, a legacy face that hands out fedgin's train
config and takes back the unmasked mean); then fedgin's own strategy sends the evaluate round and
the recorder writes the round as in any run. The sites' scalar metrics still travel in the clear.

What it costs in accuracy: SecAgg+ clips every weight to +-``CLIP_RANGE`` and quantises it to
``2**22`` levels of that range (about 4e-6), and it quantises each site's share of the weight.
Only plain weighted means fit (fedavg, fedprox, fedbn); not differential privacy, FedAdam or the
robust strategies, which need each update.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from ..config import RunConfig
from ..errors import FedginError
from .strategy import FedginMixin
from .task import restore_dtypes

#: weights are clipped to +-CLIP_RANGE before quantisation (the U-Net's are far inside it)
CLIP_RANGE = 8.0
#: the largest site weight (training slices) before any site has reported its own (a deployment's
#: first round: quantisation then costs about 1e-4 per weight of a site with 1,000 slices)
FIRST_MAX_WEIGHT = 10_000


class MaskedMean(LegacyStrategy):
    """The legacy strategy SecAgg+'s workflow calls: it configures every connected site with
    fedgin's train config and keeps what the workflow unmasked (the weighted mean, identical in
    every result) with each site's scalar metrics."""

    def __init__(self, strategy: FedginMixin):
        super().__init__()
        self.strategy = strategy
        self.results: list = []
        self.failures: list = []
        self.mean: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        # the strategy's own train config (FedProx's proximal-mu) as configure_train would send it;
        # FedBN's local layers follow from the run config's strategy at the site
        config = self.strategy._config(ConfigRecord(self.strategy.train_config()),
                                       server_round - self.strategy.round_offset)
        proxies = sorted(client_manager.all().values(), key=lambda p: p.node_id)
        return [(proxy, FitIns(parameters, dict(config))) for proxy in proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def run_secagg(grid: Grid, context: Context, cfg: RunConfig, strategy: FedginMixin, initial: dict[str, np.ndarray],
               done: int, on_round_end) -> None:
    """Rounds ``done + 1 .. cfg.rounds`` with SecAgg+ for training and fedgin's strategy for
    evaluation; ``on_round_end(relative round, ArrayRecord)`` writes each round."""
    keys = list(strategy.reference)
    manager = SimpleClientManager()
    masked = MaskedMean(strategy)
    legacy = LegacyContext(context, strategy=masked, client_manager=manager)
    arrays = dict(initial)
    # SecAgg+ scales each update by its weight / max_weight before quantising: a bound far above
    # the true weights costs precision, one below them overflows. The sites' slices are known in
    # simulation (config.json); in a deployment, from the first round's replies on
    known = [s.train_slices for s in cfg.sites]
    max_weight = max(known) if all(known) else FIRST_MAX_WEIGHT
    # Flower's own bookkeeping of connected nodes for legacy strategies (joins and losses)
    updater, stop, ready = start_update_client_manager_thread(grid, manager)
    ready.wait()
    try:
        for relative in range(1, cfg.rounds - done + 1):
            absolute = relative + done
            if not manager.wait_for(strategy.min_sites, timeout=int(cfg.round_timeout)):
                raise FedginError(f"round {absolute}: fewer than the {strategy.min_sites} site(s) a round needs "
                                  f"(--min-sites) connected within {cfg.round_timeout:g} s (--round-timeout); "
                                  "the run stops")
            # every site holds a share of every other site's key; two thirds of the shares (at
            # least 2) unmask a site that dropped out mid-round
            workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.67, max_weight=max_weight,
                                          clipping_range=CLIP_RANGE, timeout=cfg.round_timeout)
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: absolute})
            legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                ndarrays_to_parameters([arrays[k] for k in keys]), keep_input=True)
            masked.results, masked.failures, masked.mean = [], [], None
            workflow(grid, legacy)
            replies = sorted((dict(fitres.metrics) for _, fitres in masked.results),
                             key=lambda m: int(m["site-index"]))
            failures = [f"{type(f).__name__}: {str(f)[:200]}" for f in masked.failures]
            strategy.recorder.record_train(absolute, replies, failures)
            if masked.mean is None or len(replies) < strategy.min_sites:
                strategy.recorder.log(f"round {absolute}: secure aggregation did not complete ({len(replies)} "
                                      "site(s) answered); the global model is kept unchanged")
            else:
                arrays = restore_dtypes(dict(zip(keys, masked.mean, strict=True)), strategy.reference)
                max_weight = max(float(m["num-examples"]) for m in replies)
            record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
            instructions = strategy.configure_evaluate(relative, record, ConfigRecord(), grid)
            strategy.aggregate_evaluate(relative, grid.send_and_receive(instructions, timeout=cfg.round_timeout))
            on_round_end(relative, record)
    finally:
        stop.set()
        updater.join()
