"""``fedgin experiment``: the paper's comparison grid (scenarios x methods x seeds) and its report.

Every method trains with the same trainer and the same local budget per site (``rounds x
local_epochs`` epochs of ``steps_per_epoch`` steps; centralized gets the sum over sites), and every
final model is evaluated on the same fixed test sets, reported separately for CT and MRI. Finished
runs are reused: a rerun only does what is missing, and a local model of a site the scenario does
not limit (the CT site in ``limited-1toK``) is trained once and copied into the other scenarios.

A method name is a base (``local-ct``, ``local-mri``, ``centralized``, ``fedavg``, ``fedgin``) with
an optional suffix: ``+gin`` (fedgin's GIN recipe, the preset's: views, consistency, IPA as the
preset sets them), ``+ipa`` (the recipe with IPA's pseudo-correlation blending forced on) or
``+gin1`` (the FedGIN paper's GIN: one GIN view per slice, no IPA, no consistency term),
``+ouyang`` (Ouyang et al.'s three GIN + IPA views with the consistency term) or ``+clean`` (one
GIN + IPA view and the clean slice with the consistency term), each optionally with ``-pNN`` (NN% of the training slices go through GIN, ``+ipa-p50``); ``fedgin`` is
``fedavg+gin`` (``fedgin+ipa``, ``fedgin+gin1``: fedgin with that recipe). Every method gets the
same optimiser, schedule, standard intensity augmentation and number of steps; a step always takes
the preset's batch of images.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import DEFAULT_PRESET, RunConfig, SiteSpec, resolve
from ..data.datasets import check_label_map_names, open_dataset
from ..data.labels import get_scheme
from ..data.splits import split_for
from ..engine.metrics import outcome_counts
from ..errors import FedginError
from .layout import run_dir

SCENARIOS = ("complete", "limited-1to1", "limited-1to2", "limited-1to5")
BASE_METHODS = ("local-ct", "local-mri", "centralized", "fedavg", "fedgin")
DEFAULT_METHODS = ("local-ct", "local-ct+gin", "local-mri", "centralized", "fedavg", "fedgin")


# suffix -> the GIN recipe it trains with, as TrainConfig fields over the preset's
RECIPES: dict[str, dict] = {
    "": {"gin": False},
    "gin": {"gin": True},
    "ipa": {"gin": True, "ipa": True},
    "gin1": {"gin": True, "gin_p": 1.0, "ipa": False, "gin_views": 1, "clean_view": False, "consistency": 0.0},
    # Ouyang et al.'s training: three GIN + IPA views of each slice and their KL consistency term
    "ouyang": {"gin": True, "gin_p": 1.0, "ipa": True, "gin_views": 3, "clean_view": False, "consistency": 2.0},
    # AugMix-style: one GIN + IPA view and the clean slice, both supervised, and their consistency
    "clean": {"gin": True, "gin_p": 1.0, "ipa": True, "gin_views": 1, "clean_view": True, "consistency": 2.0},
    # random Bezier intensity curves on half of the slices (fedgin.augment.RandomCurve), alone or
    # before GIN + IPA
    "curve": {"gin": False, "curve_p": 0.5},
    "ipa-curve": {"gin": True, "ipa": True, "curve_p": 0.5},
    # random field-of-view windows on half of the slices (fedgin.augment.RandomField), without GIN
    # or with the preset's GIN recipe (``fedgin+fov`` is ``fedavg+gin-fov``)
    "fov": {"gin": False, "fov_p": 0.5},
    "gin-fov": {"gin": True, "fov_p": 0.5},
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # local | centralized | federated
    site_modality: str | None  # for local: CT or MRI
    recipe: str  # a key of RECIPES
    gin_p: float | None = None  # a ``-pNN`` tail: the share of slices that go through GIN

    @property
    def gin(self) -> bool:
        return RECIPES[self.recipe]["gin"]

    @property
    def train_overrides(self) -> dict:
        overrides = dict(RECIPES[self.recipe])
        if self.gin_p is not None:
            overrides["gin_p"] = self.gin_p
        return overrides


def parse_method(text: str) -> Method:
    """``base[+recipe[-pNN]]``: ``-pNN`` puts NN% of the training slices through GIN (``+ipa-p50``)."""
    name = text.strip()
    base, _, suffix = name.partition("+")
    suffix, gin_p = _split_probability(suffix)
    if base == "fedgin" and suffix in RECIPES and not RECIPES[suffix]["gin"] and f"gin-{suffix}" in RECIPES:
        suffix = f"gin-{suffix}"  # fedgin+fov: FedGIN with the windows
    if base not in BASE_METHODS or suffix not in RECIPES or (base == "fedgin" and suffix == "gin") \
            or (gin_p is not None and not RECIPES[suffix]["gin"]):
        raise FedginError(f"unknown method {name!r}; known: {', '.join(BASE_METHODS)} "
                          f"(optionally {', '.join('+' + r for r in RECIPES if r)}, the GIN ones optionally with "
                          "-pNN, NN% of slices through GIN; fedgin is fedavg+gin, fedgin+fov is fedavg+gin-fov)")
    recipe = suffix or ("gin" if base == "fedgin" else "")
    if base in ("fedgin", "fedavg"):
        return Method(name, "federated", None, recipe, gin_p)
    if base == "centralized":
        return Method(name, "centralized", None, recipe, gin_p)
    return Method(name, "local", "CT" if base == "local-ct" else "MRI", recipe, gin_p)


def _split_probability(suffix: str) -> tuple[str, float | None]:
    match = re.fullmatch(r"(.+)-p(\d{1,3})", suffix)
    if not match or not 1 <= int(match.group(2)) <= 100:
        return suffix, None
    return match.group(1), int(match.group(2)) / 100


def scenario_train_cases(scenario: str, sites: list[SiteSpec], modalities: dict[str, str], seed: int,
                         split_file: str | None, scheme_name: str,
                         label_map: dict[str, str] | None = None) -> dict[str, list[str]] | None:
    """``limited-1toK``: the MRI site keeps 1 training case per K CT training cases (at least 1),
    drawn by seed; ``complete``: None (all training cases)."""
    if scenario == "complete":
        return None
    match = re.fullmatch(r"limited-1to(\d+)", scenario)
    if not match:
        raise FedginError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    k = int(match.group(1))
    scheme = get_scheme(scheme_name)
    train_ids = {}
    for site in sites:
        dataset = open_dataset(site.dataset, scheme, label_map=label_map)
        split = split_for(dataset.name, [c.case_id for c in dataset.cases], seed, split_file)
        train_ids[site.name] = list(split.train)
    n_ct = sum(len(train_ids[s.name]) for s in sites if modalities[s.name] == "CT")
    keep = max(1, n_ct // k)
    out = {}
    for site in sites:
        if modalities[site.name] == "MRI":
            ids = sorted(train_ids[site.name])
            order = np.random.default_rng([seed, k]).permutation(len(ids))
            out[site.name] = sorted(ids[i] for i in order[:keep])
    return out


def run_experiment(sites: list[SiteSpec], scenarios: list[str], methods: list[str], seeds: int, out: Path, *,
                   preset: str = DEFAULT_PRESET, rounds: int | None = None, local_epochs: int | None = None,
                   steps_per_epoch: int | None = None, split_file: str | None = None, cache_dir: str | None = None,
                   overlays: bool = True, label_map: dict[str, str] | None = None, context: int | None = None,
                   fov_p: float | None = None, log=print) -> Path:
    """Train and evaluate every (scenario, method, seed); write results and the report into ``out``.

    ``fov_p`` (``--fov-p``): the share of training slices cut to random field-of-view windows for
    every method whose recipe does not set its own (None: the preset's).

    ``overlays`` also draws prediction overlays of seed 0 on a few test slices (patient images);
    ``label_map`` (``--label-map``) goes into every run's config and so into its evaluation.
    """
    from ..engine.runs import train_non_federated
    from ..evaluation.scoring import evaluate
    from ..federated.launcher import federate

    parsed = [parse_method(m) for m in methods]
    scheme = get_scheme("abdomen5")
    opened = {s.name: open_dataset(s.dataset, scheme, label_map=label_map) for s in sites}
    check_label_map_names(label_map, opened.values())
    modalities = {name: dataset.modality for name, dataset in opened.items()}
    if sorted(modalities.values()).count("CT") < 1 or "MRI" not in modalities.values():
        raise FedginError("an experiment needs at least one CT site and one MRI site")
    out.mkdir(parents=True, exist_ok=True)
    datasets = [s.dataset for s in sites]
    for scenario in scenarios:
        for seed in range(seeds):
            limits = scenario_train_cases(scenario, sites, modalities, seed, split_file, scheme.name, label_map)
            for method in parsed:
                run = run_dir(out, scenario, method.name, seed)
                eval_dir = run / "eval"
                base = resolve(preset, command="experiment", out=str(run), sites=tuple(sites),
                               train_overrides={**({} if fov_p is None else {"fov_p": fov_p}),
                                                **method.train_overrides, "steps_per_epoch": steps_per_epoch},
                               seed=seed, split=split_file, cache_dir=cache_dir, rounds=rounds,
                               local_epochs=local_epochs, label_map=label_map, context=context)
                if (eval_dir / "summary.json").exists():
                    _check_same_recipe(run, base)
                    log(f"[{scenario} {method.name} seed {seed}] done before, reused")
                    continue
                twin = _same_training(out, scenario, method, seed, limits, modalities, sites)
                if twin is not None:
                    shutil.copytree(twin, run, dirs_exist_ok=True)
                    log(f"[{scenario} {method.name} seed {seed}] same training as {twin.parent.parent.name}, copied")
                    continue
                start = time.perf_counter()
                log(f"[{scenario} {method.name} seed {seed}] training ...")
                model_dir = _train_method(base, method, limits, modalities, train_non_federated, federate, log)
                evaluate(str(model_dir), datasets, str(eval_dir), seed=seed, split_file=split_file,
                         cache_dir=cache_dir)
                (run / "timing.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
                log(f"[{scenario} {method.name} seed {seed}] finished in {(time.perf_counter() - start) / 60:.1f} min")
    names = [m.name for m in parsed]
    if overlays:
        from .overlays import draw_overlays

        draw_overlays(out, scenarios, names, cache_dir=cache_dir, log=log)
    return write_results(out, scenarios, names, seeds, overlays=overlays)


# what a finished run must share with what this call would train to be reused (the budget fields
# are set per method kind, so they are left out)
_RECIPE_FIELDS = ("lr", "weight_decay", "batch_size", "gin", "lr_schedule", "poly_exponent", "intensity_augment",
                  "spatial_augment", "curve_p", "fov_p", "fov_min_mm")
# fields added after runs were recorded, and the value every run recorded without them trained with
_ADDED_FIELDS = {"curve_p": 0.0, "fov_p": 0.0, "fov_min_mm": 150.0}
_GIN_FIELDS = ("gin_p", "ipa", "gin_views", "clean_view", "consistency")  # matter only with GIN on


def _check_same_recipe(run: Path, base: RunConfig) -> None:
    """Refuse to reuse a finished run trained with another recipe, model or preprocessing (a run
    folder from an older fedgin, or from another preset): its name would claim what it is not."""
    expected = json.loads(json.dumps(base.to_dict()))
    # a local run also keeps one in its site's folder
    for path in [run / "config.json", *sorted(run.glob("*/config.json"))]:
        if path.exists():
            _compare_recipe(path, json.loads(path.read_text()), expected)


def _compare_recipe(run: Path, stored: dict, expected: dict) -> None:
    fields = _RECIPE_FIELDS + (_GIN_FIELDS if expected["train"]["gin"] else ())
    def value(train: dict, k: str):
        return train.get(k, _ADDED_FIELDS.get(k))
    differ = [f"train.{k}" for k in fields if value(stored.get("train", {}), k) != value(expected["train"], k)]
    differ += [part for part in ("model", "preprocess") if stored.get(part) != expected[part]]
    if stored.get("rounds") != expected["rounds"] or stored.get("local_epochs") != expected["local_epochs"]:
        differ.append("rounds/local_epochs")
    if stored.get("label_map") != expected.get("label_map"):
        differ.append("label_map")
    if differ:
        raise FedginError(f"{run}: a finished run with other settings than this experiment's ({', '.join(differ)}); "
                          "use another --out, or delete that run to retrain it")


def _same_training(out: Path, scenario: str, method: Method, seed: int, limits, modalities,
                   sites: list[SiteSpec]) -> Path | None:
    """A finished run of another scenario that trained exactly what this one would: a local model of
    a site no scenario limits (scenarios only limit MRI sites), same method and seed."""
    if method.kind != "local" or method.site_modality == "MRI":
        return None
    site = next(s for s in sites if modalities[s.name] == method.site_modality)
    if limits and site.name in limits:
        return None
    runs = out / "runs"
    for other in sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []:
        candidate = run_dir(out, other, method.name, seed)
        if other != scenario and (candidate / "eval" / "summary.json").exists():
            return candidate
    return None


def _train_method(base: RunConfig, method: Method, limits, modalities, train_non_federated, federate, log) -> Path:
    epochs = base.rounds * base.local_epochs
    if method.kind == "federated":
        cfg = replace(base, mode="federated", train_cases=limits)
        federate(cfg, resume=(Path(cfg.out) / "config.json").exists(), log=log)
        return Path(cfg.out)
    if method.kind == "centralized":
        # the pooled model gets the sum of the sites' steps, as the sites together would
        steps = (base.train.steps_per_epoch or 0) * len(base.sites) or None
        cfg = replace(base, mode="centralized", train_cases=limits,
                      train=replace(base.train, epochs=epochs, steps_per_epoch=steps))
        train_non_federated(cfg, resume=(Path(cfg.out) / "config.json").exists(), train_ids=limits, log=log)
        return Path(cfg.out)
    site = next(s for s in base.sites if modalities[s.name] == method.site_modality)
    cfg = replace(base, mode="local", sites=(site,), train_cases=limits,
                  train=replace(base.train, epochs=epochs))
    train_non_federated(cfg, resume=(Path(cfg.out) / "config.json").exists(), train_ids=limits, log=log)
    return Path(cfg.out) / site.name


def collect_rows(out: Path, scenarios: list[str], methods: list[str], seeds: int) -> list[dict]:
    rows = []
    for scenario in scenarios:
        for method in methods:
            for seed in range(seeds):
                path = run_dir(out, scenario, method, seed) / "eval" / "summary.json"
                if not path.exists():
                    continue
                summary = json.loads(path.read_text())
                for case in summary["metric_per_case"]:
                    for organ, m in case["metrics"].items():
                        rows.append({"scenario": scenario, "method": method, "seed": seed,
                                     "modality": case["modality"], "case": case["case"], "organ": organ,
                                     "dice": m["dice"], "hd95": m["hd95"], "missed": m.get("missed"),
                                     "false_positive": m.get("false_positive")})
    return rows


def _over_seeds(seed_means: list[float]) -> dict:
    return {
        "mean": float(np.mean(seed_means)) if seed_means else None,
        "sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else (0.0 if seed_means else None),
        "seeds": len(seed_means),
    }


def aggregate(rows: list[dict]) -> dict:
    """Mean +- sd over seeds of the per-seed mean over cases, per scenario/method/modality/organ,
    with the misses, false positives and failures (:func:`fedgin.engine.metrics.outcome_counts`)
    counted over all seeds' cases (``outcomes``);
    ``mean``: mean +- sd over seeds of each seed's mean Dice over the scored organs."""
    table: dict = {}
    groups: dict[tuple, dict[int, list[float]]] = {}
    per_case: dict[tuple, list[dict]] = {}
    for r in rows:
        per_case.setdefault((r["scenario"], r["method"], r["modality"], r["organ"]), []).append(r)
        for metric in ("dice", "hd95"):
            if r[metric] is not None:
                key = (r["scenario"], r["method"], r["modality"], r["organ"], metric)
                groups.setdefault(key, {}).setdefault(r["seed"], []).append(r[metric])
    for scenario, method, modality, organ in sorted({(r["scenario"], r["method"], r["modality"], r["organ"])
                                                      for r in rows}):
        per_metric = {metric: _over_seeds([float(np.mean(v)) for v in
                                           groups.get((scenario, method, modality, organ, metric), {}).values()])
                      for metric in ("dice", "hd95")}
        per_metric["outcomes"] = outcome_counts(per_case.get((scenario, method, modality, organ), []))
        table.setdefault(scenario, {}).setdefault(method, {}).setdefault(modality, {})[organ] = per_metric
    for scenario, methods in table.items():
        for method, modalities in methods.items():
            for modality, organs in modalities.items():
                by_seed: dict[int, list[float]] = {}
                for organ in organs:
                    for seed, values in groups.get((scenario, method, modality, organ, "dice"), {}).items():
                        by_seed.setdefault(seed, []).append(float(np.mean(values)))
                organs["mean"] = {"dice": _over_seeds([float(np.mean(v)) for v in by_seed.values()])}
    return table


RESULT_FIELDS = ("scenario", "method", "seed", "modality", "case", "organ", "dice", "hd95", "missed", "false_positive")


def csv_row(r: dict) -> dict:
    """A row of :func:`collect_rows` as ``results.csv`` writes it (nulls as empty cells)."""
    return {**{k: r[k] for k in RESULT_FIELDS[:6]}, "dice": "" if r["dice"] is None else f"{r['dice']:.6f}",
            "hd95": "" if r["hd95"] is None else f"{r['hd95']:.4f}",
            "missed": "" if r.get("missed") is None else r["missed"],
            "false_positive": "" if r.get("false_positive") is None else r["false_positive"]}


def write_results(out: Path, scenarios: list[str], methods: list[str], seeds: int, *, overlays: bool = True) -> Path:
    """``results.csv``, ``results.json`` and ``report.md`` (+ plots) from the finished runs;
    ``overlays``: the report shows the overlay PNGs drawn (:func:`fedgin.experiments.overlays.draw_overlays`)."""
    from .grid_report import write_experiment_report

    rows = collect_rows(out, scenarios, methods, seeds)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(RESULT_FIELDS))
    writer.writeheader()
    for r in rows:
        writer.writerow(csv_row(r))
    (out / "results.csv").write_text(buf.getvalue())
    table = aggregate(rows)
    (out / "results.json").write_text(json.dumps({"scenarios": scenarios, "methods": methods, "seeds": seeds,
                                                  "table": table}, indent=2))
    return write_experiment_report(out, scenarios, methods, seeds, table, overlays=overlays)
