"""What a site and the server do in a federated round, in plain Python (no Flower here).

``client_app.py`` and ``server_app.py`` only decode Flower messages and call these functions, so
all of this is testable without Flower, and a Flower upgrade touches only the two adapters.

Only model arrays and scalar metrics leave a site: :func:`train_round` returns a state dict of the
model's own parameters and buffers and a flat dict of numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, SiteSpec
from ..data.labels import get_scheme
from ..data.sites import SiteData, load_site
from ..engine.model import build_model
from ..engine.postprocess import validation_scores
from ..engine.trainer import Trainer, resolve_device, seed_everything

MODALITY_CODES = {"CT": 0, "MRI": 1}


def round_seed(seed: int, server_round: int, site_index: int) -> int:
    """A distinct, reproducible seed per (run seed, round, site)."""
    return int(np.random.default_rng([seed, server_round, site_index]).integers(2**31))


def norm_layer_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of normalisation layers (kept local by FedBN)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase | torch.nn.GroupNorm | torch.nn.LayerNorm):
            for key in module.state_dict():
                keys.add(f"{name}.{key}" if name else key)
    return keys


def state_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Model state as numpy arrays, dtypes kept (int64 BatchNorm counters stay integers)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def numpy_to_state(arrays: dict[str, np.ndarray], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Arrays back into a state dict with the reference model's keys, shapes and dtypes."""
    missing = set(reference) - set(arrays)
    extra = set(arrays) - set(reference)
    if missing or extra:
        raise ValueError(f"arrays do not match the model: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    out = {}
    for key, ref in reference.items():
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{key}: shape {value.shape} != {tuple(ref.shape)}")
        if not ref.dtype.is_floating_point:
            value = np.rint(value)
        out[key] = torch.as_tensor(value).to(ref.dtype)
    return out


def restore_dtypes(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give aggregated arrays the dtype of the global model: Flower's weighted average turns integer
    buffers (BatchNorm ``num_batches_tracked``) into floats; they are rounded back to integers."""
    out = {}
    for key, value in arrays.items():
        dtype = reference[key].dtype
        value = np.asarray(value)
        out[key] = np.asarray((np.rint(value) if np.issubdtype(dtype, np.integer) else value).astype(dtype))
    return out


def run_config_to_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict())


def run_config_from_json(text: str) -> RunConfig:
    return RunConfig.from_dict(json.loads(text))


@lru_cache(maxsize=8)
def _cached_site(name: str, dataset: str, modality: str | None, cfg_json: str,
                 train_ids: tuple[str, ...] | None) -> SiteData:
    cfg = run_config_from_json(cfg_json)
    return load_site(name, dataset, get_scheme(cfg.scheme), cfg.preprocess, seed=cfg.seed,
                     split_file=cfg.split, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
                     modality=modality, train_ids=list(train_ids) if train_ids is not None else None,
                     label_map=cfg.label_map)


def site_data(cfg: RunConfig, site: SiteSpec, train_ids: list[str] | None = None) -> SiteData:
    """A site's preprocessed data, kept in memory across rounds of the same run (per process)."""
    # the key leaves out what varies between calls of one run and does not touch the data
    key = run_config_to_json(replace(cfg, out="", rounds=0, local_epochs=0, train=replace(cfg.train, proximal_mu=0.0)))
    return _cached_site(site.name, site.dataset, site.modality, key,
                        tuple(train_ids) if train_ids is not None else None)


def train_round(
    cfg: RunConfig,
    site: SiteSpec,
    site_index: int,
    global_arrays: dict[str, np.ndarray],
    server_round: int,
    *,
    proximal_mu: float = 0.0,
    local_arrays: dict[str, np.ndarray] | None = None,
    train_ids: list[str] | None = None,
    optimizer_state: dict | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict]:
    """One site's part of a round: load the global weights (plus this site's own normalisation
    layers under FedBN), train ``cfg.local_epochs`` epochs, return new weights, scalar metrics and
    the site's optimiser state.

    ``optimizer_state`` is what this site's previous round returned (None in round 1): the site's
    AdamW moments carry across rounds, as a local run's do; it never leaves the site. The learning
    rate follows the run's one schedule over ``rounds x local_epochs`` epochs, from the epoch the
    server round starts at.

    Metrics: ``num-examples`` (the site's training slices, FedAvg's weight), ``loss``,
    ``dice-<organ>`` on the site's validation cases after local training (NaN when not
    annotated), ``seconds``, ``modality`` (0 CT, 1 MRI), ``site-index``.
    """
    scheme = get_scheme(cfg.scheme)
    data = site_data(cfg, site, train_ids)
    seed = round_seed(cfg.seed, server_round, site_index)
    seed_everything(seed)
    device = resolve_device(cfg.device)
    model = build_model(cfg.model)
    reference = model.state_dict()
    arrays = dict(global_arrays)
    if local_arrays:
        arrays.update(local_arrays)
    model.load_state_dict(numpy_to_state(arrays, reference))
    train_cfg = replace(cfg.train, proximal_mu=proximal_mu)
    trainer = Trainer(model, train_cfg, scheme, device, seed=seed, total_epochs=cfg.rounds * cfg.local_epochs,
                      spacing_mm=cfg.preprocess.spacing_mm)
    if optimizer_state is not None:
        trainer.load_optimizer_state(optimizer_state)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    results = trainer.fit(data.train, cfg.local_epochs, start_epoch=(server_round - 1) * cfg.local_epochs,
                          val_cases=data.val, validate_each_epoch=False,
                          global_params=global_params, desc=f"{site.name} round {server_round}")
    last = results[-1]
    metrics: dict[str, float] = {
        "num-examples": int(data.num_train_slices),
        "loss": float(np.mean([r.loss for r in results])),
        "seconds": float(sum(r.seconds for r in results)),
        "modality": MODALITY_CODES[data.modality],
        "site-index": int(site_index),
        "lr": float(trainer.last_lr),
    }
    for organ in scheme.organs:
        value = last.dice.get(organ)
        metrics[f"dice-{organ}"] = float("nan") if value is None else float(value)
    return state_to_numpy(model.state_dict()), metrics, trainer.optimizer_state()


def evaluate_round(cfg: RunConfig, site: SiteSpec, site_index: int, global_arrays: dict[str, np.ndarray],
                   *, local_arrays: dict[str, np.ndarray] | None = None,
                   train_ids: list[str] | None = None) -> dict[str, float]:
    """Per-organ Dice of the global model on this site's validation cases (scalars only).

    The global model is exactly what the server saves as the round's checkpoint (under FedBN too:
    its normalisation layers are the sites' average), so the round's Dice and the post-processing
    plan decided from it describe the model a user gets. Under FedBN (``local_arrays``: this site's
    own normalisation layers) the site also scores the model it keeps for itself, the global
    weights with its own layers, as ``dice-own-norm-<organ>``: a number about a model that is not
    in any checkpoint, reported beside the other, never in its place.

    Metrics: ``num-examples`` (validation cases, at least 1), ``modality``, ``site-index``,
    ``dice-<organ>`` and ``dice-pp-<organ>`` (the same with the organ's candidate post-processing,
    from which the server decides the run's plan), FedBN's ``dice-own-norm-<organ>``; NaN where no
    validation case annotates the organ.
    """
    scheme = get_scheme(cfg.scheme)
    data = site_data(cfg, site, train_ids)
    device = resolve_device(cfg.device)

    def scores(arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        model = build_model(cfg.model)
        model.load_state_dict(numpy_to_state(arrays, model.state_dict()))
        trainer = Trainer(model, replace(cfg.train, gin=False), scheme, device)
        return validation_scores(trainer.model, data.val, scheme, device) if data.val else ({}, {})

    dice, dice_pp = scores(global_arrays)
    metrics: dict[str, float] = {"num-examples": max(1, len(data.val)), "modality": MODALITY_CODES[data.modality],
                                 "site-index": int(site_index)}
    kinds = [("dice", dice), ("dice-pp", dice_pp)]
    if local_arrays:
        kinds.append(("dice-own-norm", scores({**global_arrays, **local_arrays})[0]))
    for prefix, values in kinds:
        for organ in scheme.organs:
            value = values.get(organ)
            metrics[f"{prefix}-{organ}"] = float("nan") if value is None else float(value)
    return metrics


def nan_weighted_mean(values: list[float], weights: list[float]) -> float:
    """Weighted mean over the non-NaN values (NaN if none)."""
    pairs = [(v, w) for v, w in zip(values, weights) if not math.isnan(v)]
    if not pairs:
        return float("nan")
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")
