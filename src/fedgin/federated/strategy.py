"""Flower strategies for fedgin: Flower's FedAvg / FedProx / FedAdam / FedMedian / FedTrimmedAvg
plus what a multi-site segmentation run needs (integer buffers kept integer, FedBN, a minimum of
replying sites, resume round numbers, and per-site records for ``metrics.jsonl``). Differential
privacy wraps these in :mod:`fedgin.federated.privacy`."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from ..config import ROBUST_STRATEGIES, STRATEGIES
from ..errors import FedginError
from .recorder import RoundRecorder
from .task import nan_weighted_mean, restore_dtypes

#: the weight key of a mean in which every site counts the same (differential privacy's
#: sensitivity assumes it); set on the replies by the server, never sent by a site
UNIT_WEIGHT = "fedgin-unit-weight"


#: the strategies whose server step is a plain mean of the updates: what SecAgg+ unmasks
#: (fedgin.federated.secagg), and what DP's noise is calibrated to (with equal site weights, one
#: site moves it by at most clip / sites; FedAdam's server step and the robust aggregators differ)
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedbn")
#: where differential privacy clips the sites' updates
DP_MODES = ("server", "client")


def check_options(cfg) -> None:
    """Refuse, in one line each, a federated run's options that do not fit together."""
    n = len(cfg.sites)
    if cfg.strategy not in STRATEGIES:
        raise FedginError(f"unknown strategy {cfg.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if cfg.strategy in ROBUST_STRATEGIES and n < 3:
        raise FedginError(f"--strategy {cfg.strategy} needs at least 3 sites to outvote a faulty one; "
                          f"with {n} it is the plain mean")
    if cfg.trim_beta is not None and not 0.0 <= cfg.trim_beta < 0.5:
        raise FedginError(f"trim-beta must be in [0, 0.5), got {cfg.trim_beta}")
    if cfg.secagg:
        if cfg.strategy not in MEAN_STRATEGIES:
            raise FedginError(f"--secagg works with --strategy {', '.join(MEAN_STRATEGIES)} (SecAgg+ unmasks "
                              f"only a weighted mean), not {cfg.strategy}")
        if cfg.dp_clip is not None:
            raise FedginError("--secagg with --dp-clip is not supported: Flower 1.42's SecAgg+ runs on its legacy "
                              "API, its DP wrappers on the Message API")
        if n < 2:
            raise FedginError("--secagg needs at least 2 sites")
    if cfg.min_sites is not None and cfg.min_sites > n:
        raise FedginError(f"--min-sites {cfg.min_sites} is more than the run's {n} site(s): no round could start")
    if cfg.dp_clip is None:
        if cfg.dp_noise:
            raise FedginError("--dp-noise needs --dp-clip (the L2 bound the noise is scaled to)")
        for flag, on in (("--dp-insecure-seeded-noise", cfg.dp_insecure_seeded_noise),
                         ("--dp-drop-unclipped", cfg.dp_drop_unclipped)):
            if on:
                raise FedginError(f"{flag} needs --dp-clip (differential privacy)")
        return
    if cfg.dp_drop_unclipped and cfg.dp_mode != "client":
        raise FedginError("--dp-drop-unclipped goes with --dp-mode client (in server mode the server clips)")
    if not cfg.dp_clip > 0 or not cfg.dp_noise >= 0:
        raise FedginError(f"--dp-clip must be > 0 and --dp-noise >= 0, got {cfg.dp_clip} and {cfg.dp_noise}")
    if cfg.dp_mode not in DP_MODES:
        raise FedginError(f"--dp-mode must be one of {', '.join(DP_MODES)}, got {cfg.dp_mode!r}")
    if not 0.0 < cfg.dp_delta < 1.0:
        raise FedginError(f"--dp-delta must be in (0, 1), got {cfg.dp_delta}")
    if cfg.strategy not in MEAN_STRATEGIES:
        raise FedginError(f"differential privacy works with --strategy {', '.join(MEAN_STRATEGIES)} "
                          f"(its noise is calibrated to a plain mean), not {cfg.strategy}")
    if cfg.min_sites is not None and cfg.min_sites < n:
        raise FedginError(f"differential privacy needs every site in every round: --min-sites {cfg.min_sites} "
                          f"< {n} sites would release a mean of fewer updates with too little noise")


def nan_aware_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted mean of each metric over the replies that have a value (Dice is NaN where a site
    does not annotate an organ)."""
    metric_records = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighted_by_key]) for m in metric_records]
    out = {}
    for key in metric_records[0].keys():
        if key in (weighted_by_key, "site-index", "modality"):
            continue
        out[key] = nan_weighted_mean([float(m[key]) for m in metric_records], weights)
    out[weighted_by_key] = int(sum(weights))
    return MetricRecord(out)


class FedginMixin:
    """Hooks shared by every fedgin strategy; set up by :func:`make_strategy`."""

    recorder: RoundRecorder
    reference: dict[str, np.ndarray]
    run_config_json: str
    min_sites: int
    connect_timeout: float = 1800.0
    round_offset: int = 0
    local_keys: frozenset[str] = frozenset()
    num_sites: int = 0
    train_sent: list[Message]
    node_sites: dict[int, int]  # node id -> site index, learnt from the node's replies

    def _config(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        config = ConfigRecord(dict(config))
        config["run-config"] = self.run_config_json
        config["server-round"] = server_round + self.round_offset
        return config

    def train_config(self) -> dict:
        """What this strategy adds to each train instruction's config (FedProx: ``proximal-mu``);
        SecAgg+'s path, which does not go through ``configure_train``, sends it too."""
        return {}

    def wait_for_sites(self, grid, server_round: int) -> None:
        """Wait up to ``connect_timeout`` seconds for the sites a round needs (Flower itself would
        wait forever); then stop the run in one line."""
        needed = max(int(getattr(self, "min_available_nodes", self.min_sites)), self.min_sites)
        deadline = time.monotonic() + self.connect_timeout
        while (connected := len(list(grid.get_node_ids()))) < needed:
            if time.monotonic() >= deadline:
                raise FedginError(f"round {server_round + self.round_offset}: {connected} of the {needed} site(s) a "
                                  f"round needs (--min-sites) connected within {self.connect_timeout:g} s "
                                  "(--round-timeout); the run stops")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.wait_for_sites(grid, server_round)
        messages = list(super().configure_train(server_round + self.round_offset, arrays,
                                                self._config(config, server_round), grid))
        # kept to tell, after the round, which node each reply answers and which node never
        # replied (the Grid sets each message's id when it sends it)
        self.train_sent = messages
        if 0 < len(messages) < self.num_sites:
            self.recorder.log(f"round {server_round + self.round_offset}: {len(messages)} of {self.num_sites} "
                              "sites connected; the others are left out of this round")
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.wait_for_sites(grid, server_round)
        return super().configure_evaluate(server_round + self.round_offset, arrays,
                                          self._config(config, server_round), grid)

    def checked_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message] | None:
        """The round's valid train replies in site order, after recording them and logging every
        site that failed or never replied; None when fewer than ``min_sites`` replied (the global
        model is then kept). Calling it again on the valid replies records the same."""
        absolute = server_round + self.round_offset
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        # an error the SuperLink sends for a node (node unavailable) comes from node 0: name the
        # node the instruction went to
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self.train_sent if m.metadata.message_id}
        node_of = {id(r): sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
        reported: dict[int, int] = {}  # site index -> the node that reported it this round
        for r in valid:
            index, node = int(r.content["metrics"]["site-index"]), node_of[id(r)]
            if reported.setdefault(index, node) != node:
                first, second = sorted((reported[index], node))
                raise FedginError(f"round {absolute}: nodes {first} and {second} both report site-index "
                                  f"{index} ({self.recorder.site_name(index)}): give each SuperNode its own "
                                  "site-name (--node-config \"site-name=NAME ...\"); the run stops")
            self.node_sites[node] = index
        failures = [f"{self._node_name(node_of[id(r)])}: {_error_line(r)}" for r in replies if r.has_error()]
        # a node that died or hangs sends nothing: Flower stops waiting at the round timeout
        answered = set(node_of.values())
        failures += [f"{self._node_name(node)}: no reply within the round timeout"
                     for node in dict.fromkeys(sent.values()) if node not in answered]
        self.train_sent = []
        # a fixed order makes the floating-point sums, and so a resumed run, repeatable
        valid.sort(key=lambda r: int(r.content["metrics"]["site-index"]))
        self.recorder.record_train(absolute, [dict(r.content["metrics"]) for r in valid], failures)
        if len(valid) < self.min_sites:
            self.recorder.log(f"round {absolute}: only {len(valid)} site(s) replied, fewer than --min-sites "
                              f"{self.min_sites}; the global model is kept unchanged")
            return None
        return valid

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid = self.checked_replies(server_round, replies)
        if valid is None:
            return None, None
        absolute = server_round + self.round_offset
        self._mark_unit_weights(valid)
        arrays, metrics = super().aggregate_train(absolute, valid)
        if arrays is None:
            return arrays, metrics
        plain = {k: v.numpy() for k, v in arrays.items()}
        if isinstance(self, FedAdam):
            # Adam moments make no sense for BatchNorm running statistics: average those plainly
            averaged = _weighted_average(valid, self.weighted_by_key)
            for key, value in self.reference.items():
                if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    plain[key] = averaged[key]
        # FedBN: norm layers are still averaged here: the saved global model needs some, and it is
        # the model the sites validate each round; each site trains with its own
        fixed = restore_dtypes(plain, self.reference)
        return ArrayRecord({k: Array(v) for k, v in fixed.items()}), metrics

    def _node_name(self, node_id: int) -> str:
        index = self.node_sites.get(node_id)
        return f"node {node_id}" if index is None else f"node {node_id} (site {self.recorder.site_name(index)})"

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = [r for r in replies if not r.has_error()]
        replies.sort(key=lambda r: int(r.content["metrics"]["site-index"]))
        self.recorder.record_evaluate(server_round + self.round_offset,
                                      [dict(r.content["metrics"]) for r in replies])
        if not replies:
            return None
        self._mark_unit_weights(replies)
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    def _mark_unit_weights(self, replies: list[Message]) -> None:
        if self.weighted_by_key == UNIT_WEIGHT:
            for reply in replies:
                reply.content["metrics"][UNIT_WEIGHT] = 1

    # --- resume -------------------------------------------------------------------------
    def state(self) -> dict:
        """Server-optimiser state (FedAdam moments) to store in the checkpoint."""
        import torch

        out = {}
        for name in ("m_t", "v_t"):
            value = getattr(self, name, None)
            if value:
                out[name] = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in value.items()}
        return out

    def load_state(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, {k: v.numpy() for k, v in value.items()})


def _error_line(reply: Message) -> str:
    """The last line of an error reply's reason (a traceback's exception line), or its code."""
    lines = (reply.error.reason or "").strip().splitlines()
    return lines[-1][:200] if lines else f"error code {reply.error.code}"


def _weighted_average(replies: list[Message], key: str) -> dict[str, np.ndarray]:
    weights = np.array([float(r.content["metrics"][key]) for r in replies])
    weights = weights / weights.sum()
    out: dict[str, np.ndarray] = {}
    for w, r in zip(weights, replies):
        for name, arr in r.content["arrays"].items():
            out[name] = out.get(name, 0) + arr.numpy().astype(np.float64) * w
    return out


class FedginFedAvg(FedginMixin, FedAvg):
    """FedAvg weighted by training slices (the paper's)."""


class FedginFedProx(FedginMixin, FedProx):
    """FedProx: clients add ``mu / 2 * ||w - w_global||^2`` (``proximal-mu`` sent each round)."""

    def train_config(self) -> dict:
        return {"proximal-mu": float(self.proximal_mu)}


class FedginFedAdam(FedginMixin, FedAdam):
    """FedAdam: server-side Adam on the averaged update (BatchNorm statistics averaged plainly)."""


class FedginFedMedian(FedginMixin, FedMedian):
    """FedMedian: the coordinate-wise median of the sites' models (unweighted; robust to one
    faulty site among three or more)."""


class FedginFedTrimmedAvg(FedginMixin, FedTrimmedAvg):
    """FedTrimmedAvg: per coordinate, the mean after cutting the ``beta`` fraction of highest and
    lowest values (unweighted)."""


def trim_fraction(beta: float | None, num_sites: int) -> float:
    """FedTrimmedAvg's ``beta``: as given, else 0.2 or enough to cut one site from each end."""
    if beta is not None:
        return beta
    # scipy cuts int(beta * n) values from each end: 1 / n cuts one (the epsilon guards rounding)
    return min(max(0.2, 1.0 / max(num_sites, 1) + 1e-9), 0.49)


def make_strategy(name: str, *, num_sites: int, min_sites: int, recorder: RoundRecorder,
                  reference: dict[str, np.ndarray], run_config_json: str, local_keys: frozenset[str] = frozenset(),
                  proximal_mu: float = 0.01, server_lr: float = 0.01, round_offset: int = 0,
                  trim_beta: float | None = None, uniform_weights: bool = False, connect_timeout: float = 1800.0):
    """A configured strategy; every site trains and evaluates each round. ``uniform_weights``:
    every site counts the same in the mean (differential privacy), not by its training slices.
    ``connect_timeout``: how long a round waits for ``min_sites`` connected sites."""
    # rounds go to every connected site; with min_sites < num_sites a round also starts (and
    # completes) with only min_sites of them, so a lost site does not stop the federation
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                  train_metrics_aggr_fn=nan_aware_metrics, evaluate_metrics_aggr_fn=nan_aware_metrics)
    if uniform_weights:
        common["weighted_by_key"] = UNIT_WEIGHT
    if name in ("fedavg", "fedbn"):
        strategy = FedginFedAvg(**common)
    elif name == "fedprox":
        strategy = FedginFedProx(proximal_mu=proximal_mu, **common)
    elif name == "fedadam":
        strategy = FedginFedAdam(eta=server_lr, eta_l=server_lr, **common)
    elif name == "fedmedian":
        strategy = FedginFedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = FedginFedTrimmedAvg(beta=trim_fraction(trim_beta, num_sites), **common)
    else:
        raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
    strategy.recorder = recorder
    strategy.reference = reference
    strategy.run_config_json = run_config_json
    strategy.min_sites = min_sites
    strategy.num_sites = num_sites
    strategy.train_sent = []
    strategy.node_sites = {}
    strategy.round_offset = round_offset
    strategy.local_keys = local_keys
    strategy.connect_timeout = float(connect_timeout)
    return strategy
