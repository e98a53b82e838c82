"""Run directories and the non-federated modes (local, centralized) on top of the one trainer.

A run dir holds ``config.json``, ``metrics.jsonl`` (one line per epoch or round per site),
``checkpoints/`` (one global checkpoint per epoch/round and ``last.pt``), ``postprocess.json``
(the post-processing plan decided on the validation cases, see :mod:`fedgin.engine.postprocess`) and plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import (FIELD_OPTIONS, RunConfig, config_differences, new_run_id, read_run_config,
                      with_execution)
from ..data.datasets import check_label_map_names
from ..data.labels import get_scheme
from ..data.sites import SiteData, load_site
from ..errors import FedginError
from .checkpoint import load_raw, resolve_checkpoint_path, save_checkpoint
from .model import build_model
from .postprocess import PostprocessPlan, decide_plan, decision_record, validation_scores, write_decision
from .trainer import EpochResult, Trainer, resolve_device, seed_everything


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed at once."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **fields) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(fields) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, key: str, value: int) -> None:
        """Drop lines whose ``key`` exceeds ``value`` (work of an interrupted epoch/round)."""
        rows = [r for r in self.read() if r.get(key, 0) <= value]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare_run_dir(cfg: RunConfig, *, resume: bool) -> Path:
    """Create the run dir and record ``config.json``; a resumed run's recorded one is never
    rewritten (see :func:`resume_run_config`)."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not resume:
        if (out / "config.json").exists():
            raise FedginError(f"{out}: run dir exists; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    if resume and (out / "config.json").exists():
        return out  # the record of the run, kept as it is (its run id included)
    # a run without a record (new, or resumed before config.json was written) draws its identity
    cfg = replace(cfg, run_id=new_run_id())
    cfg.write(out / "config.json")
    return out


def describe_differences(differ: list[tuple[str, object, object]], names: dict[str, str] = FIELD_OPTIONS) -> str:
    """``--lr (recorded 0.001, now 0.002), ...`` for :func:`config_differences`' output."""
    def shown(value) -> str:
        return "none" if value is None else value if isinstance(value, str) else json.dumps(value)

    def name(field: str) -> str:
        if field.startswith("sites.") and field.count(".") == 2:
            site, fact = field.split(".")[1:]
            return f"site {site}'s data ({fact})"
        return names.get(field, field)

    return ", ".join(f"{name(f)} (recorded {shown(a)}, now {shown(b)})" for f, a, b in differ)


def resume_run_config(cfg: RunConfig, *, names: dict[str, str] = FIELD_OPTIONS,
                      drop: str = "drop those options (--resume takes every setting from config.json)") -> RunConfig:
    """The configuration a resumed run continues under: its recorded ``config.json``, with only
    ``cfg``'s execution fields (device, cache, threads, compile, round timeout) taken anew. A
    ``cfg`` that would train, schedule, aggregate or account privacy otherwise than the record (or
    whose sites' data changed) is refused in one line naming each difference: continuing under new
    settings would mix two runs (a poly schedule planned for other rounds, a privacy account that
    misses the rounds released before). A run dir without ``config.json`` resumes as ``cfg``."""
    recorded = read_run_config(Path(cfg.out))
    if recorded is None:
        return cfg
    differ = config_differences(recorded, cfg)
    if differ:
        raise FedginError(f"{cfg.out}: a resumed run continues under its recorded configuration (config.json), "
                          f"which this one changes: {describe_differences(differ, names)}; {drop} "
                          "or start a new run with another --out")
    return with_execution(recorded, cfg)


def check_resumable(out: Path) -> None:
    """Refuse a damaged ``last.pt`` anywhere under a run dir before anything is rewritten."""
    for last in sorted(out.glob("**/checkpoints/last.pt")):
        load_raw(last)


def load_sites(cfg: RunConfig, train_ids: dict[str, list[str]] | None = None) -> list[SiteData]:
    """Every site's data; a ``cfg.label_map`` name that no site's dataset labels is refused (a typo)."""
    scheme = get_scheme(cfg.scheme)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    sites = [
        load_site(s.name, s.dataset, scheme, cfg.preprocess, seed=cfg.seed, split_file=cfg.split,
                  cache_dir=cache, modality=s.modality,
                  train_ids=(train_ids or {}).get(s.name), label_map=cfg.label_map)
        for s in cfg.sites
    ]
    check_label_map_names(cfg.label_map, [s.dataset for s in sites])
    return sites


def with_site_facts(cfg: RunConfig, sites: list[SiteData]) -> RunConfig:
    """``cfg`` with each site's modality and the source of its split as read from its data, for
    ``config.json``."""
    return replace(cfg, sites=tuple(replace(spec, modality=site.modality, split=site.split.source,
                                            train_slices=site.num_train_slices)
                                    for spec, site in zip(cfg.sites, sites)))


def site_records(sites: list[SiteData]) -> list[dict]:
    return [{"name": s.name, "modality": s.modality, "dataset": s.dataset.name} for s in sites]


def _epoch_line(result: EpochResult, site: SiteData, mode: str, dice: dict | None = None) -> dict:
    return {
        "mode": mode,
        "epoch": result.epoch,
        "site": site.name,
        "modality": site.modality,
        "loss": result.loss,
        "dice": dice if dice is not None else result.dice,
        "seconds": result.seconds,
        "slices": result.num_slices,
        "lr": result.extra.get("lr"),
    }


def decide_postprocessing(cfg: RunConfig, model: torch.nn.Module, sites: list[SiteData],
                          device: torch.device) -> tuple[PostprocessPlan, dict]:
    """The final model's post-processing plan and its record (``postprocess.json``), decided on
    the validation cases of ``sites`` pooled (centralized: every site's)."""
    scheme = get_scheme(cfg.scheme)
    names = [s.name for s in sites]
    if not cfg.postprocess:
        return PostprocessPlan(), decision_record(scheme, PostprocessPlan(), None, None, sites=names,
                                                  validation_cases=0, note="post-processing off (--no-postprocess)")
    cases = [c for s in sites for c in s.val]
    if not cases:
        return PostprocessPlan(), decision_record(scheme, PostprocessPlan(), None, None, sites=names,
                                                  validation_cases=0,
                                                  note="no validation cases: no post-processing")
    plain, pp = validation_scores(model, cases, scheme, device)
    plan = decide_plan(plain, pp, scheme)
    return plan, decision_record(scheme, plan, plain, pp, sites=names, validation_cases=len(cases))


def train_non_federated(cfg: RunConfig, *, resume: bool = False, train_ids=None, log=print) -> Path:
    """``fedgin train``: ``local`` trains one model per site (``RUN/<site>/``), ``centralized``
    pools every site's training cases into one model (``RUN/``)."""
    if cfg.mode not in ("local", "centralized"):
        raise FedginError(f"unknown mode {cfg.mode!r}; expected local or centralized")
    # read and check every site's data (and, on resume, the checkpoints) before the run dir is
    # touched: bad input writes nothing
    sites = load_sites(cfg, train_ids if train_ids is not None else cfg.train_cases)
    cfg = with_site_facts(cfg, sites)
    if resume:
        check_resumable(Path(cfg.out))
        cfg = resume_run_config(cfg)
    out = prepare_run_dir(cfg, resume=resume)
    if cfg.mode == "centralized":
        _train_one(cfg, out, sites, resume=resume, log=log)
    else:
        for site in sites:
            site_cfg = replace(cfg, out=str(out / site.name), sites=tuple(s for s in cfg.sites if s.name == site.name))
            if resume:
                site_cfg = resume_run_config(site_cfg)
            site_out = prepare_run_dir(site_cfg, resume=resume)
            _train_one(site_cfg, site_out, [site], resume=resume, log=log)
    return out


def _train_one(cfg: RunConfig, out: Path, sites: list[SiteData], *, resume: bool, log) -> None:
    scheme = get_scheme(cfg.scheme)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    trainer = Trainer(model, cfg.train, scheme, device, seed=cfg.seed, spacing_mm=cfg.preprocess.spacing_mm)
    metrics = MetricsLog(out / "metrics.jsonl")
    start_epoch = 0
    last = out / "checkpoints" / "last.pt"
    if resume and last.exists():
        payload = load_raw(resolve_checkpoint_path(last))
        model.load_state_dict(payload["state_dict"])
        trainer.optimizer.load_state_dict(payload["extra"]["optimizer"])
        start_epoch = int(payload["meta"]["epoch"])
        torch.set_rng_state(payload["extra"]["torch_rng"])
        log(f"resuming {out} after epoch {start_epoch}")
    if resume:
        metrics.truncate_after("epoch", start_epoch)  # lines of an epoch that has no checkpoint
    else:
        metrics.path.write_text("")
    cases = [c for s in sites for c in s.train]
    records = site_records(sites)
    desc = sites[0].name if len(sites) == 1 else "centralized"

    def on_epoch(result: EpochResult) -> None:
        shown = {}
        for site in sites:
            if len(sites) == 1:
                dice = result.dice
            else:  # centralized: each site's own validation cases, so curves compare with FL
                dice = trainer.validate(site.val) if (site.val and cfg.train.validate) else {}
            metrics.write(**_epoch_line(result, site, cfg.mode, dice))
            shown.update({f"{site.name}:{k}" if len(sites) > 1 else k: round(v, 3)
                          for k, v in dice.items() if v is not None})
        meta = {"mode": cfg.mode, "epoch": result.epoch, "seed": cfg.seed, "split": cfg.split,
                "label_map": cfg.label_map, "time": time.time()}
        extra = {"optimizer": trainer.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        plan = None
        if result.epoch == cfg.train.epochs:
            plan, meta["postprocess"] = decide_postprocessing(cfg, model, sites, device)
            # written before the checkpoints: a run whose last checkpoint exists has its decision
            write_decision(out / "postprocess.json", meta["postprocess"])
            log(f"[{desc}] post-processing decided on validation cases: {plan.describe()}")
        path = save_checkpoint(out / "checkpoints" / f"epoch_{result.epoch:03d}.pt", model.state_dict(),
                               model_config=cfg.model, scheme=scheme, preprocess=cfg.preprocess,
                               sites=records, meta=meta, extra=extra, postprocess=plan)
        save_checkpoint(last, model.state_dict(), model_config=cfg.model, scheme=scheme,
                        preprocess=cfg.preprocess, sites=records, meta=meta, extra=extra, postprocess=plan)
        log(f"[{desc}] epoch {result.epoch}/{cfg.train.epochs} loss {result.loss:.4f} "
            f"val dice {shown or '-'} ({result.seconds:.1f}s) -> {path.name}")

    remaining = cfg.train.epochs - start_epoch
    if remaining <= 0:
        log(f"{out}: all {cfg.train.epochs} epochs already done")
        return
    val = sites[0].val if len(sites) == 1 else None  # centralized validates per site in on_epoch
    trainer.fit(cases, remaining, start_epoch=start_epoch, val_cases=val, desc=desc, on_epoch=on_epoch)
