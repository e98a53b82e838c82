"""Flower ClientApp: decode the message, run the shared trainer on this site, encode the reply.

The site comes from ``node_config``: ``data-dir`` (+ optional ``modality``, ``site-name``,
``state-dir``) in a deployment, or ``partition-id`` into the run's site list in simulation.
Only the model's arrays and scalar metrics are put in the reply.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from ..atomic import write_bytes
from ..config import RunConfig, SiteSpec
from ..engine.model import build_model
from .privacy import clip_when_asked
from .task import evaluate_round, norm_layer_keys, run_config_from_json, train_round

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

logger = logging.getLogger("fedgin.client")


class SiteFailure(RuntimeError):
    """What the server is told when a site fails: the kind of error, never its text (which can name
    files and case ids); the full error stays in this SuperNode's log."""


def site_errors_stay_local(handler):
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            logger.exception("fedgin site failed in %s", handler.__name__)
            raise SiteFailure(f"{handler.__name__} failed on this site ({type(exc).__name__}); "
                              "see the SuperNode's log") from None
    return wrapped


def resolve_site(context: Context, cfg: RunConfig) -> tuple[SiteSpec, int]:
    node = context.node_config
    names = [s.name for s in cfg.sites]
    if "data-dir" in node:
        name = str(node.get("site-name") or Path(str(node["data-dir"])).name)
        # a site the run does not name gets an index from its name (the server refuses two nodes
        # that report the same index: two unnamed sites with equally named data folders)
        index = names.index(name) if name in names else zlib.crc32(name.encode()) + len(names)
        return SiteSpec(name, str(node["data-dir"]), node.get("modality") or None), index
    pid = int(node["partition-id"])
    return cfg.sites[pid], pid


def site_state_dir(context: Context, cfg: RunConfig, site: SiteSpec) -> Path:
    """Where this site keeps its state of this run: ``STATE/<site>/<run id>/`` (``STATE``: the
    SuperNode's ``state-dir``, or ``RUN/site-state`` in simulation). Keyed by the run, so a later
    run on the same SuperNode starts from nothing of an earlier one's, while a resumed run (same
    id) finds its own; a run without an id (older fedgin) keeps ``STATE/<site>/``."""
    root = Path(str(context.node_config.get("state-dir") or Path(cfg.out) / "site-state")) / site.name
    return root / cfg.run_id if cfg.run_id else root


def _local_state_path(context: Context, cfg: RunConfig, site: SiteSpec) -> Path:
    return site_state_dir(context, cfg, site) / "local_norm_layers.npz"


def _local_arrays(context, cfg, site) -> dict[str, np.ndarray] | None:
    path = _local_state_path(context, cfg, site)
    if cfg.strategy != "fedbn" or not path.exists():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


OPTIMIZER_KEY = "fedgin-optimizer"


def _optimizer_path(context: Context, cfg: RunConfig, site: SiteSpec, server_round: int) -> Path:
    return _local_state_path(context, cfg, site).parent / f"optimizer_round_{server_round:03d}.pt"


def load_optimizer_state(context: Context, cfg: RunConfig, site: SiteSpec, server_round: int) -> dict | None:
    """The optimiser state this site had after ``server_round - 1``: from ``context.state``
    (Flower keeps it at the node for the run), else from the site's state dir (a resumed run is a
    new Flower run with an empty ``context.state``); None in round 1."""
    if server_round <= 1:
        return None
    record = context.state.config_records.get(OPTIMIZER_KEY)
    if record is not None and int(record["round"]) == server_round - 1:
        blob = bytes(record["state"])
    else:
        path = _optimizer_path(context, cfg, site, server_round - 1)
        if not path.exists():
            logger.warning("fedgin site %s: no optimiser state of round %d; starting a fresh optimiser",
                           site.name, server_round - 1)
            return None
        blob = path.read_bytes()
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def save_optimizer_state(context: Context, cfg: RunConfig, site: SiteSpec, server_round: int, state: dict) -> None:
    """Keep the state in ``context.state`` and, for a resume, in the site's state dir (the last
    two rounds: a server killed mid-round resumes from the round before)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    context.state[OPTIMIZER_KEY] = ConfigRecord({"round": int(server_round), "state": blob})
    path = _optimizer_path(context, cfg, site, server_round)
    write_bytes(path, blob)
    # by round number, not name: past round 999 the names grow a digit ("1000" < "999" as text)
    for old in path.parent.glob("optimizer_round_*.pt"):
        number = old.stem.removeprefix("optimizer_round_")
        if number.isdigit() and int(number) < server_round - 1:
            old.unlink(missing_ok=True)


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: a train message of Flower's SecAgg+ protocol (its ``secaggplus_configs``
    record) goes through Flower's ``secaggplus_mod``, which trains through :func:`legacy_train`
    and sends the update masked; every other message passes through unchanged."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, legacy_train)
    return call_next(msg, context)


@site_errors_stay_local
def legacy_train(msg: Message, context: Context) -> Message:
    """Train from the legacy FitIns that SecAgg+ sends (unnamed arrays in the model's key order)
    and reply with the legacy FitRes ``secaggplus_mod`` masks."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = run_config_from_json(str(fitins.config["run-config"]))
    keys = list(build_model(cfg.model).state_dict())
    sent = parameters_to_ndarrays(fitins.parameters)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in zip(keys, sent, strict=True)}),
                          "config": ConfigRecord(dict(fitins.config))})
    reply = train_content(content, context)
    arrays = {k: v.numpy() for k, v in reply["arrays"].items()}
    metrics = dict(reply["metrics"])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([arrays[k] for k in keys]),
                    int(metrics["num-examples"]), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


# client-side DP: Flower's fixedclipping_mod clips the update of a train message that asks for it;
# secure aggregation: Flower's secaggplus_mod masks it
app = ClientApp(mods=[clip_when_asked, secagg_when_asked])


@app.train()
@site_errors_stay_local
def train(msg: Message, context: Context) -> Message:
    return Message(content=train_content(msg.content, context), reply_to=msg)


def train_content(content: RecordDict, context: Context) -> RecordDict:
    """A train instruction's content (``arrays``, ``config``) -> the reply's (``arrays``, ``metrics``)."""
    config = content["config"]
    cfg = run_config_from_json(str(config["run-config"]))
    site, index = resolve_site(context, cfg)
    server_round = int(config["server-round"])
    arrays, metrics, optimizer = train_round(
        cfg, site, index, {k: v.numpy() for k, v in content["arrays"].items()}, server_round,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        local_arrays=_local_arrays(context, cfg, site),
        train_ids=(cfg.train_cases or {}).get(site.name),
        optimizer_state=load_optimizer_state(context, cfg, site, server_round),
    )
    save_optimizer_state(context, cfg, site, server_round, optimizer)
    if cfg.strategy == "fedbn":
        keys = norm_layer_keys(build_model(cfg.model))
        path = _local_state_path(context, cfg, site)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{k: arrays[k] for k in keys})
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord(metrics)})


@app.evaluate()
@site_errors_stay_local
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = run_config_from_json(str(config["run-config"]))
    site, index = resolve_site(context, cfg)
    metrics = evaluate_round(cfg, site, index, _arrays(msg), local_arrays=_local_arrays(context, cfg, site),
                             train_ids=(cfg.train_cases or {}).get(site.name))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
