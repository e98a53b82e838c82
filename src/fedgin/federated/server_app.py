"""Flower ServerApp: resolve the run, start the strategy, checkpoint each round.

Run config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``): ``config-file`` (a
``config.json`` written by fedgin; wins over the rest) or ``sites`` (``"ct=DATASET mri=DATASET"``;
in a deployment ``"ct=- mri=-"``, names and order only, each SuperNode's ``data-dir`` holds its
data), ``out`` (an absolute path), ``rounds``, ``local-epochs``, ``strategy``, ``gin``, ``preset``,
``seed``, ``min-sites`` (0: every site); GIN-recipe keys (``""``: the preset's)
``gin-views``, ``clean-view``, ``consistency``, ``ipa``, ``gin-p``, ``lr-schedule``, ``curve-p``, ``fov-p``,
``fov-min-mm``; privacy and
robustness keys (``""``: off or the default) ``dp-clip``, ``dp-noise``, ``dp-mode``, ``dp-delta``,
``dp-drop-unclipped``, ``dp-insecure-seeded-noise`` (debugging only: no privacy), ``trim-beta``, ``secagg``. See docs/deployment.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..config import RunConfig, SiteSpec, new_run_id, resolve, with_execution
from ..engine.runs import resume_run_config
from ..engine.model import build_model
from ..errors import FedginError
from .recorder import RoundRecorder
from .privacy import ACCOUNTANT_KEY, make_private
from .secagg import run_secagg
from .strategy import check_options, make_strategy
from .task import norm_layer_keys, run_config_to_json, state_to_numpy

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


#: optional run-config keys -> the TrainConfig field and type they set
RECIPE_KEYS = {"gin-views": ("gin_views", int), "clean-view": ("clean_view", bool),
               "consistency": ("consistency", float), "ipa": ("ipa", bool), "gin-p": ("gin_p", float),
               "lr-schedule": ("lr_schedule", str), "curve-p": ("curve_p", float), "fov-p": ("fov_p", float),
               "fov-min-mm": ("fov_min_mm", float), "compile": ("compile", bool)}
#: optional run-config keys -> the RunConfig field and type they set
FEDERATION_KEYS = {"dp-clip": ("dp_clip", float), "dp-noise": ("dp_noise", float), "dp-mode": ("dp_mode", str),
                   "dp-delta": ("dp_delta", float), "trim-beta": ("trim_beta", float), "secagg": ("secagg", bool),
                   "dp-insecure-seeded-noise": ("dp_insecure_seeded_noise", bool),
                   "dp-drop-unclipped": ("dp_drop_unclipped", bool)}


def config_from_run_config(run_config: dict) -> RunConfig:
    """A RunConfig from Flower's run config (see the module docstring)."""
    path = str(run_config.get("config-file", "") or "")
    if path:
        return RunConfig.from_dict(json.loads(Path(path).read_text()))
    return _recorded_or_new(_config_from_keys(run_config))


def _config_from_keys(run_config: dict) -> RunConfig:
    sites = []
    for item in str(run_config.get("sites", "") or "").split():
        name, sep, dataset = item.partition("=")
        if not (name and sep and dataset):
            raise FedginError(f"run config sites: expected NAME=DATASET items (DATASET '-' in a deployment), got {item!r}")
        sites.append(SiteSpec(name, dataset))
    out = str(run_config.get("out", "") or "")
    if not sites or not out:
        raise FedginError("the run config needs config-file, or sites and out "
                          "(flwr run ... --run-config \"sites='ct=DATASET mri=DATASET' out='/abs/run'\")")
    if not Path(out).is_absolute():
        # the ServerApp runs in a process Flower starts, whose working folder is not the caller's
        raise FedginError(f"run config out must be an absolute path, got {out!r}")
    min_sites = int(run_config.get("min-sites", 0) or 0)
    cfg = resolve(str(run_config.get("preset", "quick")), command="flwr run", out=out,
                  sites=tuple(sites), train_overrides={"gin": bool(run_config.get("gin", True)), **{
                      field: kind(run_config[key]) for key, (field, kind) in RECIPE_KEYS.items()
                      if run_config.get(key, "") != ""}},
                  rounds=int(run_config.get("rounds", 3)), local_epochs=int(run_config.get("local-epochs", 1)),
                  strategy=str(run_config.get("strategy", "fedavg")), seed=int(run_config.get("seed", 0)),
                  min_sites=min_sites or None, round_timeout=float(run_config.get("round-timeout", 1800)),
                  **{field: kind(run_config[key]) for key, (field, kind) in FEDERATION_KEYS.items()
                     if run_config.get(key, "") != ""})
    check_options(cfg)
    return cfg


#: the run-config key that sets a RunConfig field (a refused resume of ``flwr run`` names it)
RUN_CONFIG_KEYS = {"rounds": "rounds", "local_epochs": "local-epochs", "strategy": "strategy", "seed": "seed",
                   "preset": "preset", "min_sites": "min-sites", "sites": "sites", "train.gin": "gin",
                   **{field: key for key, (field, _) in FEDERATION_KEYS.items()},
                   **{f"train.{field}": key for key, (field, _) in RECIPE_KEYS.items()}}


def _recorded_or_new(cfg: RunConfig) -> RunConfig:
    """``flwr run`` again on the same ``out`` resumes that run: under its recorded ``config.json``
    (never rewritten; a run config that changes it is refused in one line naming the keys), with its
    identity, by which the sites key their state. A new ``out`` records the run and draws its id."""
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "config.json").exists():
        return resume_run_config(cfg, names=RUN_CONFIG_KEYS,
                                 drop="drop those keys (a resumed run takes every setting from config.json)")
    cfg = replace(cfg, run_id=new_run_id())
    cfg.write(out_dir / "config.json")
    return cfg


def run_server(grid: Grid, cfg: RunConfig, log=print, context: Context | None = None) -> None:
    """The whole federated run for the ServerApp (resumes after the last completed round)."""
    Path(cfg.out, "checkpoints").mkdir(parents=True, exist_ok=True)
    recorder = RoundRecorder(cfg, Path(cfg.out), log=log)
    # the initial global weights depend on the run seed only (a resumed or repeated run starts
    # from the same model); fork so the caller's RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
    reference_state = model.state_dict()
    reference = state_to_numpy(reference_state)
    done, arrays, strategy_state = recorder.resume_point()
    if done >= cfg.rounds:
        log(f"{cfg.out}: all {cfg.rounds} rounds already done")
        return
    if done:
        log(f"resuming after round {done}")
    num_sites = len(cfg.sites)
    check_options(cfg)
    private = cfg.dp_clip is not None
    strategy = make_strategy(
        cfg.strategy, num_sites=num_sites, min_sites=cfg.min_sites or num_sites, recorder=recorder,
        reference=reference, run_config_json=run_config_to_json(cfg),
        local_keys=frozenset(norm_layer_keys(model)) if cfg.strategy == "fedbn" else frozenset(),
        proximal_mu=cfg.proximal_mu, server_lr=cfg.server_lr, round_offset=done,
        trim_beta=cfg.trim_beta, uniform_weights=private, connect_timeout=cfg.round_timeout,
    )
    if private:
        strategy = make_private(strategy, cfg, num_sites)
        if done and ACCOUNTANT_KEY not in strategy_state:
            # the rounds already released would be missing from the account: it would start at zero
            raise FedginError(f"{cfg.out}: the checkpoint of round {done} holds no privacy account, but this run "
                              "is differentially private: it cannot continue the account; start a new run")
    if strategy_state:
        strategy.load_state(strategy_state)
    initial = arrays if arrays is not None else reference

    def on_round_end(server_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        current = {k: v.numpy() for k, v in round_arrays.items()}
        recorder.finish_round(server_round + done, current, reference_state, strategy.state())
        return None

    if cfg.secagg:
        run_secagg(grid, context, cfg, strategy, initial, done, on_round_end)
        return
    strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in initial.items()}),
                   num_rounds=cfg.rounds - done, timeout=cfg.round_timeout,
                   evaluate_fn=on_round_end)


def make_server_app(config_file: str | None = None, execution: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to a ``config.json`` (``fedgin federate``) or reading Flower's run config;
    ``execution``: a config whose execution fields (device, cache, threads, compile, round
    timeout) this invocation runs with, where a resumed run's ``config.json`` recorded others."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        if config_file:
            run_config["config-file"] = config_file
        cfg = config_from_run_config(run_config)
        run_server(grid, with_execution(cfg, execution) if execution is not None else cfg, context=context)

    return server


app = make_server_app()
