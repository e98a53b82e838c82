"""Differential privacy for a federated run, from Flower's parts: its fixed-clipping strategy
wrappers (each site's update clipped to an L2 norm on the server, or on the site with Flower's
``fixedclipping_mod``), Gaussian noise on the aggregate, and Flower's RDP accountant for the spent
(epsilon, delta).

What fedgin adds around them: the noise is seeded per round, so a run with DP repeats exactly as
one without; every site counts the same in the mean, which is the sensitivity the noise is
calibrated to; a round that lacks a site's update keeps the global model instead of releasing an
under-noised one; the account travels in each checkpoint, so a resumed run continues it; and each
round's spend is written to ``metrics.jsonl``.

The guarantee is client-level (one site's whole update), at the accountant's delta, against
whoever sees the global models (the sites, anyone given a checkpoint). It does not hide a site's
update from the server, which receives it before clipping and noise (see docs/threat_model.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from ..config import RunConfig
from .strategy import FedginMixin
from .task import restore_dtypes, round_seed

#: a constant in the noise's seed, so that it never equals a site's training seed of the round
NOISE_STREAM = 104_729
ACCOUNTANT_KEY = "privacy-accountant"


def privacy_accountant(delta: float, num_sites: int) -> RdpAccountant:
    """Flower's RDP accountant for one Gaussian release per round over all ``num_sites`` sites
    (no sampling amplification: every site takes part in every round)."""
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=num_sites,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def epsilon_after(rounds: int, noise_multiplier: float, num_sites: int, delta: float) -> float:
    """The epsilon Flower's accountant reports after ``rounds`` releases (inf without noise)."""
    if noise_multiplier <= 0:
        return float("inf")
    accountant = privacy_accountant(delta, num_sites)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, num_sites, num_sites), count=rounds)
    return accountant.get_privacy_spent().epsilon


@contextmanager
def _seeded_numpy(seed: int):
    """Flower draws its noise from numpy's global generator: seed it for one call, then put it back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class PrivateRounds:
    """What fedgin adds to Flower's fixed-clipping wrappers (set up by :func:`make_private`)."""

    strategy: FedginMixin
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def _set_up(self, cfg: RunConfig) -> None:
        self.seed = cfg.seed
        self.mode = cfg.dp_mode
        self.delta = cfg.dp_delta
        self.releases = 0
        self.account = privacy_accountant(cfg.dp_delta, self.num_sampled_clients) \
            if self.noise_multiplier > 0 else None

    def __getattr__(self, name: str):
        # the wrapped strategy's recorder, round_offset, reference, ...
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        inner = self.strategy
        valid = inner.checked_replies(server_round, replies)
        if valid is None:
            return None, None
        absolute = server_round + inner.round_offset
        if len(valid) < self.num_sampled_clients:
            inner.recorder.log(f"round {absolute}: differential privacy needs every site's update "
                               f"({len(valid)} of {self.num_sampled_clients} replied); the global model "
                               "is kept unchanged")
            return None, None
        with _seeded_numpy(round_seed(self.seed, absolute, NOISE_STREAM)):
            arrays, metrics = super().aggregate_train(server_round, valid)
        if arrays is None:
            return arrays, metrics
        # Flower adds float64-drawn noise cast to each array's dtype; integer buffers (BatchNorm
        # counters) are rounded back to the global model's
        fixed = restore_dtypes({k: v.numpy() for k, v in arrays.items()}, inner.reference)
        inner.recorder.record_privacy(absolute, self.spend())
        return ArrayRecord({k: Array(v) for k, v in fixed.items()}), metrics

    def spend(self) -> dict:
        """Account one release; the run's privacy record so far."""
        self.releases += 1
        record = {"mode": self.mode, "clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier,
                  "noise_sd": compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients),
                  "delta": self.delta, "releases": self.releases, "epsilon": None}
        if self.account is not None:
            self.account.compose(GaussianPrivacyEvent(self.noise_multiplier, self.num_sampled_clients,
                                                          self.num_sampled_clients))
            record["epsilon"] = float(self.account.get_privacy_spent().epsilon)
        return record

    # --- resume: the account is part of the strategy's state in each checkpoint ------------------
    def state(self) -> dict:
        out = dict(self.strategy.state())
        out[ACCOUNTANT_KEY] = json.dumps({"releases": self.releases,
                                          "rdp": self.account.state_dict() if self.account else None})
        return out

    def load_state(self, state: dict) -> None:
        state = dict(state)
        saved = state.pop(ACCOUNTANT_KEY, None)
        if saved is not None:
            saved = json.loads(saved)
            self.releases = int(saved["releases"])
            if self.account is not None and saved["rdp"] is not None:
                self.account.load_state_dict(saved["rdp"])
        self.strategy.load_state(state)


class ServerSideDP(PrivateRounds, DifferentialPrivacyServerSideFixedClipping):
    """The server clips each site's update to ``clipping_norm``, averages, adds the noise."""


class ClientSideDP(PrivateRounds, DifferentialPrivacyClientSideFixedClipping):
    """Each site clips its own update (``clip_when_asked`` in the ClientApp); the server averages
    and adds the noise."""


def make_private(strategy: FedginMixin, cfg: RunConfig, num_sites: int) -> PrivateRounds:
    """``strategy`` (made with ``uniform_weights=True``) inside Flower's DP wrapper of ``cfg.dp_mode``."""
    kind = ServerSideDP if cfg.dp_mode == "server" else ClientSideDP
    wrapped = kind(strategy, cfg.dp_noise, cfg.dp_clip, num_sites)
    wrapped._set_up(cfg)
    return wrapped


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: Flower's ``fixedclipping_mod`` on a train message whose config carries a
    clipping norm (client-side DP); every other message passes through unchanged."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
