"""``fedgin federate`` on one machine: Flower's simulation engine runs the ServerApp and one
virtual SuperNode per site (each site's ClientApp in its own Ray worker process)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..config import RunConfig
from ..console import debugging
from ..engine.runs import check_resumable, load_sites, prepare_run_dir, resume_run_config, with_site_facts
from ..errors import FedginError

# Telemetry off and no runtime dependency installation, before Flower is imported.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
#: Flower's console log level, read at import in every process (the Ray workers too)
FLOWER_LOG_LEVEL_ENV = "FLWR_LOG_LEVEL"


def federate(cfg: RunConfig, *, resume: bool = False, log=print) -> Path:
    """Run (or resume) a federated run; returns the run dir."""
    if not 1 <= len(cfg.sites) <= 16:
        raise FedginError(f"federate needs 1 to 16 sites, got {len(cfg.sites)}")
    names = [s.name for s in cfg.sites]
    if len(set(names)) != len(names):
        raise FedginError(f"site names must be unique: {names}")
    from .strategy import check_options  # imports Flower: after the environment above

    check_options(cfg)
    cpus = os.cpu_count() or 1
    threads = cfg.train.num_threads or max(1, cpus // len(cfg.sites))
    cfg = replace(cfg, train=replace(cfg.train, num_threads=threads))
    # validate and preprocess every site's data up front: errors surface here as one line,
    # and the Ray workers then read the preprocessing cache
    sites = load_sites(cfg, cfg.train_cases)
    cfg = with_site_facts(cfg, sites)
    if resume:
        check_resumable(Path(cfg.out))
        # the recorded configuration, unchanged but for where and how fast this invocation runs
        cfg = resume_run_config(cfg)
    out = prepare_run_dir(cfg, resume=resume)
    if not resume:
        (out / "metrics.jsonl").write_text("")
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import make_server_app

    # fedgin reports rounds, failures and results itself; Flower's own INFO/WARNING lines
    # (including run_simulation's deprecation notice) would bury them
    if not debugging():
        logging.getLogger("flwr").setLevel(logging.ERROR)
    log(f"federating {len(cfg.sites)} sites ({', '.join(f'{s.name}:{s.modality}' for s in cfg.sites)}) "
        f"for {cfg.rounds} rounds, strategy {cfg.strategy}, GIN {'on' if cfg.train.gin else 'off'}"
        f"{', secure aggregation (SecAgg+, experimental)' if cfg.secagg else ''}"
        f"{f', differential privacy (clip {cfg.dp_clip:g}, noise {cfg.dp_noise:g})' if cfg.dp_clip else ''} -> {out}")
    with worker_environment():
        run_simulation(
            server_app=make_server_app(str((out / "config.json").resolve()), execution=cfg),
            client_app=client_app,
            num_supernodes=len(cfg.sites),
            backend_name="ray",
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": max(cpus, len(cfg.sites)), "include_dashboard": False,
                              "log_to_driver": True},
            },
            verbose_logging=False,
        )
    last = out / "checkpoints" / "last.pt"
    if not last.exists():
        raise FedginError(f"{out}: the federated run ended without a checkpoint (see the log above)")
    return out


@contextmanager
def worker_environment() -> Iterator[dict[str, str]]:
    """The environment the Ray workers start with (they inherit this process's), put back after.

    Unless :func:`~fedgin.console.debugging`, ``FLWR_LOG_LEVEL=ERROR`` (where not set already):
    Flower reads it when a worker imports it, which keeps each worker's WARNING lines, such as
    "Manually terminating ClientAppActor" at shutdown, out of the console."""
    added = {} if debugging() or FLOWER_LOG_LEVEL_ENV in os.environ else {FLOWER_LOG_LEVEL_ENV: "ERROR"}
    os.environ.update(added)
    try:
        yield added
    finally:
        for name in added:
            os.environ.pop(name, None)
