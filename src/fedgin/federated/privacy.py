"""Differential privacy for a federated run, from Flower's parts: its fixed-clipping strategy
wrappers (each site's update clipped to an L2 norm on the server, or on the site with Flower's
``fixedclipping_mod``), Gaussian noise on the aggregate, and Flower's RDP accountant for the spent
(epsilon, delta).

What fedgin adds around them:

- the noise comes from the operating system's CSPRNG (``os.urandom``), fresh for every release,
  so no one who knows the run's seed (every site does) can regenerate and subtract it; a
  repeatable noise stream exists only as a loudly logged debugging switch
  (``--dp-insecure-seeded-noise``) that the privacy record names;
- every site counts the same in the mean (the fixed, public denominator: the configured number of
  sites), and a round that lacks a site's update keeps the global model: nothing is released;
- the account is for the **replace-one-site** relation (one site's data changed, every site still
  taking part, as participation is public): one clipped update can move the sum by up to 2 C, so
  each release is a Gaussian mechanism of multiplier ``noise sd / (2 C / sites) = SIGMA / 2``;
- in client mode the server checks the norm of every update it receives against C;
- the account travels in each checkpoint, so a resumed run continues it; each round's record
  (released or not) is written to ``metrics.jsonl`` and the checkpoint's ``meta.privacy``.

The guarantee is client-level (one site's whole data), at the accountant's delta, against whoever
sees the global models (the sites, anyone given a checkpoint). It does not hide a site's update
from the server, which receives it before noise (see docs/threat_model.md).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
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
from ..errors import FedginError
from .strategy import FedginMixin
from .task import restore_dtypes

#: a constant in the insecure debugging noise's seed, so that it never equals a site's training seed
NOISE_STREAM = 104_729
ACCOUNTANT_KEY = "privacy-accountant"
#: the neighbouring relation the account is for (written in every privacy record)
NEIGHBOURING = "replace-one site"
#: what a replace-one change of one site can move the sum of the clipped updates by, in units of C
SENSITIVITY_IN_CLIPS = 2.0
SECURE_SOURCE = "os.urandom (fresh per release)"
INSECURE_SOURCE = "seeded by the run seed and round (--dp-insecure-seeded-noise: INSECURE, debugging only)"
INSECURE_WARNING = ("WARNING: --dp-insecure-seeded-noise: the DP noise is seeded by the run seed, which every site "
                    "knows; a site can regenerate and remove it, so this run has NO privacy guarantee (debugging only)")
#: a client-side update's norm may exceed C by float32 rounding: a relative slack on C, plus the
#: rounding of each weight of the new model (half an ulp, doubled for margin)
CLIP_SLACK = 1e-5
FLOAT32_ROUNDING = 2.0 ** -23


def accounted_multiplier(noise_multiplier: float) -> float:
    """The Gaussian mechanism's multiplier under replace-one: the noise's sd on the sum,
    ``noise_multiplier x C``, over the sum's sensitivity ``2 C``."""
    return noise_multiplier / SENSITIVITY_IN_CLIPS


def privacy_accountant(delta: float, num_sites: int) -> RdpAccountant:
    """Flower's RDP accountant for one Gaussian release per round over all ``num_sites`` sites
    (no sampling amplification: every site takes part in every round).

    Flower 1.42 accepts only add-or-remove without amplification; an unsampled Gaussian's RDP
    depends on nothing but noise / sensitivity, so replace-one is accounted as add-or-remove of the
    multiplier :func:`accounted_multiplier` (the noise over the replace-one sensitivity 2 C)."""
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=num_sites,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def _event(noise_multiplier: float, num_sites: int) -> GaussianPrivacyEvent:
    return GaussianPrivacyEvent(accounted_multiplier(noise_multiplier), num_sites, num_sites)


def epsilon_after(rounds: int, noise_multiplier: float, num_sites: int, delta: float) -> float:
    """The epsilon fedgin reports after ``rounds`` releases (inf without noise; 0 before any)."""
    if noise_multiplier <= 0:
        return float("inf")
    if rounds == 0:
        return 0.0
    accountant = privacy_accountant(delta, num_sites)
    accountant.compose(_event(noise_multiplier, num_sites), count=rounds)
    return accountant.get_privacy_spent().epsilon


def secure_standard_normal(shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal draws from the OS's CSPRNG: Box-Muller on 53-bit uniforms from
    ``os.urandom``. Each value is the sum of four draws halved (still N(0, 1)), which blurs the
    floating-point pattern of a single Box-Muller sample (the mitigation of Opacus's secure mode)."""
    count = int(np.prod(shape, dtype=np.int64))
    pairs = (4 * count + 1) // 2
    words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53   # (0, 1]
    u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53           # [0, 1)
    radius = np.sqrt(-2.0 * np.log(u1))
    draws = np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])
    return (draws[: 4 * count].reshape(4, count).sum(axis=0) / 2.0).reshape(shape)


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The L2 norm of ``arrays - reference`` over every array (as Flower's clipping measures it)."""
    return math.sqrt(sum(float(((np.asarray(arrays[k], np.float64) - np.asarray(v, np.float64)) ** 2).sum())
                         for k, v in reference.items()))


def clip_tolerance(clip: float, arrays: dict[str, np.ndarray]) -> float:
    """How far above ``clip`` a clipped update's norm may measure: float32 rounding of each weight."""
    size = math.sqrt(sum(float((np.asarray(v, np.float64) ** 2).sum()) for v in arrays.values()))
    return clip * CLIP_SLACK + FLOAT32_ROUNDING * size


class PrivateRounds:
    """What fedgin adds to Flower's fixed-clipping wrappers (set up by :func:`make_private`)."""

    strategy: FedginMixin
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def _set_up(self, cfg: RunConfig, log=print) -> None:
        self.seed = cfg.seed
        self.mode = cfg.dp_mode
        self.delta = cfg.dp_delta
        self.seeded_noise = bool(cfg.dp_insecure_seeded_noise)
        self.drop_unclipped = bool(cfg.dp_drop_unclipped)
        self.releases = 0
        self.noise_round = 0
        self.sent_arrays: dict[str, np.ndarray] = {}
        self.account = privacy_accountant(cfg.dp_delta, self.num_sampled_clients) \
            if self.noise_multiplier > 0 else None
        if self.seeded_noise:
            log(INSECURE_WARNING)

    def __getattr__(self, name: str):
        # the wrapped strategy's recorder, round_offset, reference, ...
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # the global model the updates are measured from (client mode checks their norms)
        self.sent_arrays = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        inner = self.strategy
        valid = inner.checked_replies(server_round, replies)
        absolute = server_round + inner.round_offset
        if valid is None:
            inner.recorder.record_privacy(absolute, self.record(released=False))
            return None, None
        if self.mode == "client":
            valid = self.unclipped_dropped(absolute, valid)
        if len(valid) < self.num_sampled_clients:
            inner.recorder.log(f"round {absolute}: differential privacy needs every site's update "
                               f"({len(valid)} of {self.num_sampled_clients} replied); the global model "
                               "is kept unchanged")
            inner.recorder.record_privacy(absolute, self.record(released=False))
            return None, None
        self.noise_round = absolute
        arrays, metrics = super().aggregate_train(server_round, valid)
        if arrays is None:
            inner.recorder.record_privacy(absolute, self.record(released=False))
            return arrays, metrics
        # integer buffers (BatchNorm counters) are rounded back to the global model's dtype
        fixed = restore_dtypes({k: v.numpy() for k, v in arrays.items()}, inner.reference)
        inner.recorder.record_privacy(absolute, self.spend())
        return ArrayRecord({k: Array(v) for k, v in fixed.items()}), metrics

    def unclipped_dropped(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Client mode: refuse (or, with ``--dp-drop-unclipped``, drop) a reply whose update is
        longer than the clip, which the noise would not cover."""
        kept = []
        for reply in replies:
            arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            norm = update_norm(arrays, self.sent_arrays)
            if norm <= self.clipping_norm + clip_tolerance(self.clipping_norm, arrays):
                kept.append(reply)
                continue
            site = self.strategy.recorder.site_name(int(reply.content["metrics"]["site-index"]))
            line = (f"round {server_round}: site {site} sent an update of L2 norm {norm:.6g} above the DP clip "
                    f"{self.clipping_norm:g}: it did not clip (--dp-mode client)")
            if not self.drop_unclipped:
                self.strategy.recorder.log(line + "; the run stops (--dp-drop-unclipped drops such an update)")
                raise FedginError(line + "; the run stops (--dp-drop-unclipped drops such an update instead)")
            self.strategy.recorder.log(line + "; its update is dropped (--dp-drop-unclipped)")
        return kept

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Flower's wrapper calls this on the mean: Gaussian noise of sd ``SIGMA x C / sites`` on
        every array, from the CSPRNG (or the insecure seeded stream), added in float64."""
        sd = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        seeded = np.random.default_rng([self.seed, self.noise_round, NOISE_STREAM]) if self.seeded_noise else None
        out = {}
        for key, value in aggregated_arrays.items():
            value = value.numpy().astype(np.float64)
            draws = seeded.standard_normal(value.shape) if seeded is not None else secure_standard_normal(value.shape)
            out[key] = Array(value + sd * draws)
        return ArrayRecord(out)

    def record(self, released: bool) -> dict:
        """The run's privacy record so far (after this round's release, if it ``released``)."""
        epsilon = None
        if self.account is not None:
            epsilon = float(self.account.get_privacy_spent().epsilon) if self.releases else 0.0
        return {"mode": self.mode, "clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier,
                "noise_sd": compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients),
                "delta": self.delta, "releases": self.releases, "epsilon": epsilon, "released": released,
                "neighbouring": NEIGHBOURING,
                "sensitivity": SENSITIVITY_IN_CLIPS * self.clipping_norm / self.num_sampled_clients,
                "noise_source": INSECURE_SOURCE if self.seeded_noise else SECURE_SOURCE}

    def spend(self) -> dict:
        """Account one release; the run's privacy record so far."""
        self.releases += 1
        if self.account is not None:
            self.account.compose(_event(self.noise_multiplier, self.num_sampled_clients))
        return self.record(released=True)

    # --- resume: the account is part of the strategy's state in each checkpoint ------------------
    def state(self) -> dict:
        out = dict(self.strategy.state())
        out[ACCOUNTANT_KEY] = json.dumps({"releases": self.releases, "neighbouring": NEIGHBOURING,
                                          "rdp": self.account.state_dict() if self.account else None})
        return out

    def load_state(self, state: dict) -> None:
        state = dict(state)
        saved = state.pop(ACCOUNTANT_KEY, None)
        if saved is not None:
            saved = json.loads(saved)
            if saved.get("neighbouring") != NEIGHBOURING:
                raise FedginError("this run's privacy account was kept under the add-or-remove relation of an "
                                  "older fedgin; it cannot be continued as replace-one: start a new run")
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
    """``strategy`` (made with ``uniform_weights=True``) inside Flower's DP wrapper of ``cfg.dp_mode``
    (the insecure-noise warning goes to the strategy's recorder's log)."""
    kind = ServerSideDP if cfg.dp_mode == "server" else ClientSideDP
    wrapped = kind(strategy, cfg.dp_noise, cfg.dp_clip, num_sites)
    wrapped._set_up(cfg, log=strategy.recorder.log)
    return wrapped


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: Flower's ``fixedclipping_mod`` on a train message whose config carries a
    clipping norm (client-side DP); every other message passes through unchanged."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
