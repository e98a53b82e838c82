"""The domain gap: a model trained on CT only, tested on unseen CT and MRI, without and with GIN
(several GIN variants and training budgets): does GIN help a CT-only model on MRI, and what does it
cost on CT?

Setting: ``fedgin.config.resolve('quick', ...)`` (U-Net 16-32-64-128, 2.5 mm, 128 x 128 slices),
local mode on one CT site, no validation, batch 8 at lr 1e-3, seed 0, 2 torch threads, on the CPU.
Every (variant, budget) is one run, everything else equal:

- variants (``--variants``, ``VARIANTS`` below says what each sets): ``no-gin``, ``gin`` (the
  paper's setting, p = 1), ``gin-p0.5``, ``gin+ipa``, multi-view GIN with the consistency term
  (``*-2v-c2``, ``*-clean-c2``, ``ipa-3v-c2``), the old [0, 1] intensities (``*-unit``), a
  constant rate (``gin-constlr``), no standard intensity augmentation (``gin-noaug``) and a deeper
  U-Net (``*-res2``: compare it with the preset's model at 1.25x the budget, equal wall time) and
  2.5D context (``*-ctx3``: 3 neighbouring slices as input channels, compare with the 2D variant);
- budgets (``--budgets``): total optimisation steps, each ``budget / --steps`` epochs of ``--steps``
  steps (``--epochs`` instead gives one budget of ``--epochs`` x ``--steps``).

Data (``--data``):

- ``phantom`` (default): train on ``--train-cases`` phantom CT cases (every case used for training);
  test on fresh phantom datasets written with another seed (other patients), ``--test-cases`` CT
  and ``--test-cases`` MRI cases with all organs annotated, ``evaluate(..., cases="all")``.
  Defaults: variants ``no-gin,gin``, 12 epochs x 50 steps = 600 steps.
- ``real``: the shared bundle ``../shared/data/abdomen-ct-mr`` next to the repository
  (``Dataset801_AbdomenCT``, ``Dataset802_AbdomenMR``) with fedgin's shipped split
  (``fedgin/splits/abdomen-ct-mr.json``): train on the CT training split, score
  the selection cases by default (``--score-on selection``: the CT validation case and the MRI cases
  outside the test split), the test split (2 CT, 4 MRI cases) with ``--score-on test``. Defaults:
  ``DEFAULTS['real']`` (6 variants, 1000 steps of 50 per epoch). A missing bundle exits with status
  2 and writes nothing.

Scores: per-case 3D Dice (and HD95) on each case's own grid, organs not annotated in a case ignored.

Library calls only: ``fedgin.engine.runs.train_non_federated`` (mode ``local``) then
``fedgin.evaluation.scoring.evaluate``. Writes ``docs/results/domain_gap.json`` + ``.md`` (phantom) or
``docs/results/domain_gap_real.json`` + ``.md`` (real), or ``--out`` and the ``.md`` next to it, and
prints them. With ``--work``, every run keeps its folder there (``runs/<variant>_<budget>steps/``:
the training run, ``eval/summary.json``, ``run.json``) next to a shared preprocessing cache; a run
whose evaluation is already there is reused, an interrupted training is resumed, so a rerun
continues an interrupted benchmark and a new budget or variant trains only what is new.

Usage:
``python benchmarks/domain_gap.py [--epochs 12] [--steps 50] [--train-cases 8] [--test-cases 8]``
(phantom), ``python benchmarks/domain_gap.py --data real [--budgets 1000] [--steps 50]
[--variants no-gin,gin,gin+ipa] [--work DIR]`` (real);
``--redraw`` rewrites the .md from the ``--out`` JSON without training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NoReturn

import torch

from fedgin.config import SiteSpec, resolve
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme
from fedgin.data.splits import builtin_split_files, split_for
from fedgin.engine.runs import train_non_federated
from fedgin.evaluation.scoring import evaluate
from fedgin.synthetic import CT_DATASET, write_phantom_datasets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, provenance, write_result, write_text  # noqa: E402

THREADS = 2
LR = 1e-3
SEED = 0
TRAIN_SEED, TEST_SEED = 0, 1  # phantom writer seeds: training and test patients differ
ORGANS = ("liver", "kidneys", "spleen", "pancreas", "gallbladder")
MODALITIES = ("CT", "MRI")
BUNDLE = ROOT.parent / "shared" / "data" / "abdomen-ct-mr"
REAL_CT, REAL_MR = "Dataset801_AbdomenCT", "Dataset802_AbdomenMR"

# variant -> TrainConfig fields it sets, and what it means (for the .md)
_ONE_VIEW = {"gin_views": 1, "clean_view": False, "consistency": 0.0}
_GIN = {"gin": True, "gin_p": 1.0, "ipa": False}
_IPA = {"gin": True, "gin_p": 1.0, "ipa": True}
VARIANTS = {
    "no-gin": ({"gin": False, "gin_p": 1.0, "ipa": False, **_ONE_VIEW}, "GIN off"),
    "gin": ({**_GIN, **_ONE_VIEW}, "GIN on every training slice (p = 1, the paper's setting)"),
    "gin-p0.5": ({**_GIN, "gin_p": 0.5, **_ONE_VIEW}, "GIN on half of the training slices (p = 0.5)"),
    "gin+ipa": ({**_IPA, **_ONE_VIEW}, "GIN + IPA (p = 1)"),
    "ipa-p0.5": ({**_IPA, "gin_p": 0.5, **_ONE_VIEW}, "GIN + IPA on half of the training slices (p = 0.5)"),
    "gin-2v-c2": ({**_GIN, "gin_views": 2, "clean_view": False, "consistency": 2.0},
                  "2 GIN views of 4 slices per step, consistency 2 (per-voxel KL)"),
    "gin-clean-c2": ({**_GIN, "gin_views": 1, "clean_view": True, "consistency": 2.0},
                     "1 GIN view + 1 clean view of 4 slices per step, consistency 2"),
    "ipa-2v-c2": ({**_IPA, "gin_views": 2, "clean_view": False, "consistency": 2.0},
                  "2 GIN+IPA views of 4 slices per step, consistency 2"),
    "ipa-clean-c2": ({**_IPA, "gin_views": 1, "clean_view": True, "consistency": 2.0},
                     "1 GIN+IPA view + 1 clean view of 4 slices per step, consistency 2"),
    "ipa-3v-c2": ({**_IPA, "gin_views": 3, "clean_view": False, "consistency": 2.0},
                  "3 GIN+IPA views of 3 slices per step (9 images), consistency 2 (Ouyang's 3 views)"),
    "gin-unit": ({**_GIN, **_ONE_VIEW}, "GIN on the old [0, 1] intensities (preprocessing intensity='unit')"),
    "no-gin-unit": ({"gin": False, "gin_p": 1.0, "ipa": False, **_ONE_VIEW}, "GIN off, old [0, 1] intensities"),
    "gin-constlr": ({**_GIN, **_ONE_VIEW, "lr_schedule": "constant"}, "GIN, constant learning rate (no poly schedule)"),
    "gin-noaug": ({**_GIN, **_ONE_VIEW, "intensity_augment": False},
                  "GIN without the standard intensity augmentation"),
    "no-gin-res2": ({"gin": False, "gin_p": 1.0, "ipa": False, **_ONE_VIEW},
                    "GIN off, U-Net with 2 residual units per level (1.27x the time per step)"),
    "ipa-res2": ({**_IPA, **_ONE_VIEW}, "GIN + IPA, U-Net with 2 residual units per level"),
    "ipa-p0.5-ctx3": ({**_IPA, "gin_p": 0.5, **_ONE_VIEW},
                      "the preset's recipe (GIN + IPA on half of the slices), 2.5D: 3 slices as input channels"),
    "no-gin-ctx3": ({"gin": False, "gin_p": 1.0, "ipa": False, **_ONE_VIEW}, "GIN off, 2.5D: 3 slices as input channels"),
    "ipa-ctx3": ({**_IPA, **_ONE_VIEW}, "GIN + IPA on every training slice (p = 1), 2.5D: 3 slices as input channels"),
    "ipa-curve-ctx3": ({**_IPA, **_ONE_VIEW, "curve_p": 0.5},
                       "random Bezier intensity curves on half of the slices, then GIN + IPA on every slice (p = 1), "
                       "2.5D: 3 slices as input channels"),
}
# variants trained on another preprocessing than the preset's
PREPROCESS = {"gin-unit": {"intensity": "unit"}, "no-gin-unit": {"intensity": "unit"}}
# variants trained with another model than the preset's (compare at equal wall time: give the
# preset's model 1.25x the budget)
MODEL = {"no-gin-res2": {"num_res_units": 2}, "ipa-res2": {"num_res_units": 2},
         # 2.5D (--context 3): only the first convolution grows, so the time per step is about 2D's
         "ipa-p0.5-ctx3": {"in_channels": 3}, "no-gin-ctx3": {"in_channels": 3}, "ipa-ctx3": {"in_channels": 3},
         "ipa-curve-ctx3": {"in_channels": 3}}
DEFAULTS = {
    "phantom": {"variants": ("no-gin", "gin"), "steps": 50, "epochs": 12, "budgets": None,
                "train_cases": 8, "test_cases": 8, "out": RESULTS / "domain_gap.json"},
    "real": {"variants": ("no-gin", "gin", "gin+ipa", "gin-2v-c2", "gin-clean-c2", "ipa-2v-c2"), "steps": 50,
             "epochs": None, "budgets": (1000,), "out": RESULTS / "domain_gap_real.json"},
}
# the labels the first version of this script gave its two runs (read by --redraw)
LEGACY_VARIANTS = {"CT only, no GIN": "no-gin", "CT only + GIN": "gin"}


@dataclass
class Data:
    """Where a run trains and what it is tested on."""

    train_ct: Path
    test: list[Path]  # the CT and the MRI test dataset
    split: str | None  # None: the split shipped with fedgin
    cases: str  # evaluate's ``cases``


def fail(message: str) -> NoReturn:
    print(f"domain_gap: {message}", file=sys.stderr)
    sys.exit(2)


def comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=tuple(DEFAULTS), default="phantom")
    parser.add_argument("--variants", type=comma_list,
                        help=f"comma list of {', '.join(VARIANTS)} (default: phantom "
                             f"{','.join(DEFAULTS['phantom']['variants'])}; real "
                             f"{','.join(DEFAULTS['real']['variants'])})")
    parser.add_argument("--budgets", type=comma_list,
                        help="comma list of total optimisation steps, each a multiple of --steps "
                             f"(default: phantom --epochs x --steps; real {','.join(map(str, DEFAULTS['real']['budgets']))})")
    parser.add_argument("--epochs", type=int, help="one budget of --epochs x --steps (phantom default 12)")
    parser.add_argument("--steps", type=int, help=f"optimisation steps per epoch (default: phantom {DEFAULTS['phantom']['steps']}, "
                                                     f"real {DEFAULTS['real']['steps']})")
    parser.add_argument("--train-cases", type=int, help="phantom CT training cases (default 8)")
    parser.add_argument("--test-cases", type=int, help="phantom test cases per modality (default 8)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="the real data bundle (default: %(default)s)")
    parser.add_argument("--score-on", choices=("selection", "test"), default="selection",
                        help="real data: 'selection' (default) scores the CT validation case and every MRI "
                             "case outside the test split (a CT-only model never sees MRI), so a recipe is "
                             "chosen without the test split; 'test' scores the test split")
    parser.add_argument("--work", type=Path,
                        help="keep data, runs and evaluations here and reuse finished runs "
                             "(default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="result JSON (default: docs/results/domain_gap.json for "
                                                 "phantom, domain_gap_real.json for real)")
    parser.add_argument("--redraw", action="store_true", help="only rewrite the .md from an existing --out JSON")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.data]
    if args.out is None:
        args.out = defaults["out"]
    if args.redraw:
        return args

    if args.data == "real" and (args.train_cases is not None or args.test_cases is not None):
        parser.error("--train-cases and --test-cases are for --data phantom (real uses the shipped split)")
    if args.data == "phantom":
        args.train_cases = defaults["train_cases"] if args.train_cases is None else args.train_cases
        args.test_cases = defaults["test_cases"] if args.test_cases is None else args.test_cases
    args.variants = args.variants or list(defaults["variants"])
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants: unknown or repeated {unknown or args.variants}; known: {', '.join(VARIANTS)}")
    args.steps = defaults["steps"] if args.steps is None else args.steps
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.budgets is not None and args.epochs is not None:
        parser.error("give --budgets (total steps) or --epochs (one budget of --epochs x --steps), not both")
    if args.budgets is not None:
        try:
            budgets = [int(b) for b in args.budgets]
        except ValueError:
            parser.error(f"--budgets must be whole numbers of steps, got {','.join(args.budgets)}")
    elif args.epochs is not None or defaults["budgets"] is None:
        budgets = [(args.epochs if args.epochs is not None else defaults["epochs"]) * args.steps]
    else:
        budgets = list(defaults["budgets"])
    bad = [b for b in budgets if b < 1 or b % args.steps]
    if bad or not budgets or len(set(budgets)) != len(budgets):
        parser.error(f"budgets {bad or budgets}: each a distinct positive multiple of --steps {args.steps}")
    args.budgets = sorted(budgets)
    return args


def describe(args) -> dict:
    """The ``setting`` of the result (also the identity of a run for reuse); reads the real split."""
    common = {
        "data": args.data,
        "preset": "quick",
        "steps_per_epoch": args.steps,
        "budgets": args.budgets,
        "variants": {v: VARIANTS[v][0] for v in args.variants},
        "optimiser": f"batch 8, lr {LR}, training seed {SEED}, {THREADS} threads, CPU",
        "metric": "per-case 3D Dice on the case's own grid, organs not annotated in a case ignored; mean "
                  "(sd, n) over cases per organ; mean = mean over organs of the per-organ means",
    }
    if args.data == "phantom":
        return {
            **common,
            "train": f"{args.train_cases} phantom CT cases (write_phantom_datasets seed {TRAIN_SEED}), all for "
                     "training, no validation",
            "test": f"{args.test_cases} phantom CT + {args.test_cases} phantom MRI cases "
                    f"(write_phantom_datasets seed {TEST_SEED}: other patients), all organs annotated, "
                    "evaluate(cases='all')",
            "train_cases": args.train_cases,
            "test_cases": args.test_cases,
        }
    scheme = get_scheme("abdomen5")
    splits = {}
    for name in (REAL_CT, REAL_MR):
        dataset = open_dataset(args.bundle / name, scheme)
        splits[name] = split_for(dataset.name, [c.case_id for c in dataset.cases], SEED)
    shipped = [p.name for p in builtin_split_files()]
    ct, mr = splits[REAL_CT], splits[REAL_MR]
    return {
        **common,
        "bundle": str(args.bundle),
        "split": f"fedgin/splits ({', '.join(shipped)})",
        "train": f"the {len(ct.train)} CT training cases of the shipped split of {REAL_CT} "
                 f"({', '.join(ct.train)}), no validation",
        "test": (f"the test split: {len(ct.test)} CT ({', '.join(ct.test)}) + {len(mr.test)} MRI "
                 f"({', '.join(mr.test)}) cases, evaluate(cases='test')" if args.score_on == "test" else
                 f"the selection cases (no test case): the CT validation case ({', '.join(ct.val)}) + the "
                 f"{len(mr.train) + len(mr.val)} MRI cases outside the test split, which a CT-only model never sees"),
        "score_on": args.score_on,
        "train_ids": list(ct.train),
        "test_ids": ({"CT": list(ct.test), "MRI": list(mr.test)} if args.score_on == "test" else
                     {"CT": list(ct.val), "MRI": sorted(mr.train + mr.val)}),
    }


def prepare(args, work: Path) -> Data:
    """Write the phantoms (deterministic, so rewriting them reproduces the same cases) or point at
    the real bundle."""
    if args.data == "real":
        tests = [args.bundle / REAL_CT, args.bundle / REAL_MR]
        if args.score_on == "test":
            return Data(args.bundle / REAL_CT, tests, None, "test")
        scheme = get_scheme("abdomen5")
        ct, mr = (split_for(n, [c.case_id for c in open_dataset(args.bundle / n, scheme).cases], SEED)
                  for n in (REAL_CT, REAL_MR))
        split = work / "selection_split.json"
        work.mkdir(parents=True, exist_ok=True)
        split.write_text(json.dumps({"datasets": {
            REAL_CT: {"train": list(ct.train), "val": [], "test": list(ct.val)},
            REAL_MR: {"train": [], "val": [], "test": sorted(mr.train + mr.val)}}}, indent=2))
        return Data(args.bundle / REAL_CT, tests, str(split), "test")
    # the MRI dataset of the training seed is written (the writer makes both) but never used
    train_ct, _ = write_phantom_datasets(work / "train", args.train_cases, 1, seed=TRAIN_SEED)
    test_ct, test_mri = write_phantom_datasets(work / "test", args.test_cases, args.test_cases, seed=TEST_SEED)
    case_ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (train_ct / "imagesTr").glob("*_0000.nii.gz"))
    split = work / "phantom_split.json"
    split.write_text(json.dumps({"datasets": {CT_DATASET: {"train": case_ids, "val": [], "test": []}}}))
    return Data(train_ct, [test_ct, test_mri], str(split), "all")


def train_overrides(args, variant: str, budget: int) -> dict:
    return {"epochs": budget // args.steps, "steps_per_epoch": args.steps, "lr": LR, **VARIANTS[variant][0],
            "validate": False, "num_threads": THREADS}


def run_config(args, data: Data | None, run_dir: Path, variant: str, budget: int, cache: Path):
    cfg = resolve(
        "quick", command="benchmark domain_gap", out=str(run_dir / "run"),
        sites=(SiteSpec("ct", str(data.train_ct)),) if data else (),
        mode="local", seed=SEED, split=data.split if data else None, cache_dir=str(cache), device="cpu",
        train_overrides=train_overrides(args, variant, budget),
    )
    return replace(cfg, preprocess=replace(cfg.preprocess, **PREPROCESS.get(variant, {})),
                   model=replace(cfg.model, **MODEL.get(variant, {})))


def run_key(setting: dict, variant: str, budget: int, train_config: dict) -> dict:
    """What must match for a run folder under ``--work`` to be reused or resumed."""
    keep = ("data", "train", "test", "bundle", "train_ids", "test_ids", "score_on")
    key = {"setting": {k: setting[k] for k in keep if k in setting}, "variant": variant, "budget": budget,
           "train_config": train_config}
    return json.loads(json.dumps(key))  # as it reads back from run.json


def train(cfg, run_dir: Path, key: dict) -> dict:
    """Train (resuming an interrupted run in ``run_dir``) and return what the result keeps."""
    resume = (run_dir / "run").is_dir() and any((run_dir / "run").iterdir())
    start = time.perf_counter()
    run = train_non_federated(cfg, resume=resume, log=lambda line: print(line, flush=True)) / "ct"
    seconds = time.perf_counter() - start
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"train_seconds": round(seconds, 1), "resumed": resume, "final_loss": round(lines[-1]["loss"], 4),
            "loss_per_epoch": [round(x["loss"], 4) for x in lines], "config": key["train_config"]}


def scores(summary: dict) -> dict:
    """Per modality: organ Dice stats, HD95 stats, mean Dice, case count, and per-case Dice."""
    by_modality = {}
    for modality in MODALITIES:
        stats = summary["by_modality"][modality]
        by_modality[modality] = {
            **{o: stats[o]["dice"] for o in ORGANS},
            "hd95_mm": {o: stats[o]["hd95"] for o in ORGANS},
            "mean_dice": stats["mean_dice"],
            "cases": stats["cases"],
            "per_case_dice": {r["case"]: {o: r["metrics"][o]["dice"] for o in ORGANS}
                              for r in summary["metric_per_case"] if r["modality"] == modality},
        }
    return by_modality


def run_all(args, setting: dict, work: Path) -> dict:
    """Every (budget, variant): reuse its evaluation from ``work`` or train and evaluate it."""
    cache = work / "cache"
    plan = []
    for budget in args.budgets:
        for variant in args.variants:
            run_dir = work / "runs" / f"{variant}_{budget}steps"
            cfg = run_config(args, None, run_dir, variant, budget, cache)
            key = run_key(setting, variant, budget, {**asdict(cfg.train), "preprocess": cfg.preprocess.to_dict(),
                                                         **({"model": asdict(cfg.model)} if variant in MODEL else {})})
            record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else None
            if record is not None and record["key"] != key:
                fail(f"{run_dir} holds a run with other settings; use another --work or remove that folder")
            plan.append((budget, variant, run_dir, key, record))

    data = None
    results: dict[str, dict] = {}
    for budget, variant, run_dir, key, record in plan:
        summary_path = run_dir / "eval" / "summary.json"
        reused = bool(record and record.get("train") and summary_path.exists())
        if reused:
            print(f"[{variant}, {budget} steps] reusing {summary_path}", flush=True)
            info = record["train"]
        else:
            data = data or prepare(args, work)
            run_dir.mkdir(parents=True, exist_ok=True)
            if record is None or not record.get("train"):
                (run_dir / "run.json").write_text(json.dumps({"key": key, "train": None}, indent=2))
                info = train(run_config(args, data, run_dir, variant, budget, cache), run_dir, key)
                (run_dir / "run.json").write_text(json.dumps({"key": key, "train": info}, indent=2))
            else:  # trained, but its evaluation did not finish
                info = record["train"]
            evaluate(str(run_dir / "run" / "ct"), [str(p) for p in data.test], str(run_dir / "eval"),
                     cases=data.cases, device="cpu", cache_dir=str(cache))
        by_modality = scores(json.loads(summary_path.read_text()))
        results.setdefault(str(budget), {})[variant] = {
            "variant": variant, "budget": budget, "epochs": budget // args.steps, "steps_per_epoch": args.steps,
            **VARIANTS[variant][0], **info, "reused": reused, "by_modality": by_modality,
            "gap_ct_minus_mri": by_modality["CT"]["mean_dice"] - by_modality["MRI"]["mean_dice"],
        }
    return results


def upgrade(result: dict) -> dict:
    """A result of the first version of this script (phantom, runs keyed by label) in today's shape."""
    if "data" in result["setting"]:
        return result
    runs = {}
    for label, res in result["results"].items():
        cfg = res["config"]
        variant = LEGACY_VARIANTS.get(label, "gin" if res["gin"] else "no-gin")
        budget = cfg["epochs"] * cfg["steps_per_epoch"]
        runs.setdefault(str(budget), {})[variant] = {
            "variant": variant, "budget": budget, "epochs": cfg["epochs"], "steps_per_epoch": cfg["steps_per_epoch"],
            **{k: cfg[k] for k in ("gin", "gin_p", "ipa")}, "reused": False, **res}
    budgets = sorted(int(b) for b in runs)
    per_epoch = next(iter(runs[str(budgets[0])].values()))["steps_per_epoch"]
    return {**result, "results": runs,
            "setting": {**result["setting"], "data": "phantom", "budgets": budgets, "steps_per_epoch": per_epoch}}


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def signed(x: float) -> str:
    return f"{x:+.3f}"


def change(x: float) -> str:
    """A difference of mean Dice, in words, at the 3 decimals the tables show."""
    x = round(x, 3)
    return "better" if x > 0 else "worse" if x < 0 else "unchanged"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def steps(budget: int | str) -> str:
    return plural(int(budget), "step")


def budget_title(budget: str, runs: dict) -> str:
    any_run = next(iter(runs.values()))
    return f"{steps(budget)} ({plural(any_run['epochs'], 'epoch')} x {steps(any_run['steps_per_epoch'])})"


#: the organs every case of the real bundle annotates, which the grid's goals average over
MAIN_ORGANS = ("liver", "kidneys", "spleen")


def main_mean(stats: dict) -> float | None:
    values = [stats[o]["mean"] for o in MAIN_ORGANS if stats.get(o, {}).get("mean") is not None]
    return sum(values) / len(values) if values else None


def table(runs: dict, test_name: str) -> list[str]:
    rows = ["| variant | test set | " + " | ".join(ORGANS) + " | mean | liver, kidneys, spleen |",
            "|" + "---|" * (len(ORGANS) + 4)]
    for variant, res in runs.items():
        for modality in MODALITIES:
            stats = res["by_modality"][modality]
            cells = [fmt(stats[o]["mean"]) for o in ORGANS]
            rows.append(f"| {variant} | {test_name}{modality} ({stats['cases']}) | " + " | ".join(cells)
                        + f" | **{fmt(stats['mean_dice'])}** | {fmt(main_mean(stats))} |")
    return rows


def summary_table(results: dict, budgets: list[str], variants: list[str]) -> list[str]:
    """MRI mean Dice (CT mean Dice), variant x budget; the best MRI score of each budget in bold."""
    rows = ["| variant | " + " | ".join(steps(b) for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    best = {b: max(round(r["by_modality"]["MRI"]["mean_dice"] or 0, 3) for r in results[b].values()) for b in budgets}
    for variant in variants:
        cells = []
        for b in budgets:
            res = results[b].get(variant)
            if res is None:
                cells.append("-")
                continue
            mri, ct = res["by_modality"]["MRI"]["mean_dice"], res["by_modality"]["CT"]["mean_dice"]
            cell = fmt(mri)
            top = mri is not None and round(mri, 3) == best[b] and len(results[b]) > 1
            cells.append((f"**{cell}**" if top else cell) + f" ({fmt(ct)})")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return rows


def findings(results: dict, budgets: list[str]) -> list[str]:
    """One sentence per budget: the no-GIN gap, then each GIN variant's change on MRI and on CT."""
    lines = []
    for b in budgets:
        runs = results[b]
        base = runs.get("no-gin")
        if base is None:
            lines.append(f"- {steps(b)}: no `no-gin` run to compare the GIN variants with.")
            continue
        ct0, mri0 = base["by_modality"]["CT"]["mean_dice"], base["by_modality"]["MRI"]["mean_dice"]
        parts = [f"- {steps(b)}: without GIN the CT-trained model scores {ct0:.3f} on CT and {mri0:.3f} "
                 f"on MRI (gap {signed(ct0 - mri0)})."]
        for variant, res in runs.items():
            if variant == "no-gin":
                continue
            ct, mri = res["by_modality"]["CT"]["mean_dice"], res["by_modality"]["MRI"]["mean_dice"]
            parts.append(f"`{variant}`: MRI {mri:.3f} ({signed(mri - mri0)}, {change(mri - mri0)}), "
                         f"CT {ct:.3f} ({signed(ct - ct0)}, {change(ct - ct0)}).")
        lines.append(" ".join(parts))
    mri = {(v, b): round(r["by_modality"]["MRI"]["mean_dice"] or 0, 3) for b in budgets for v, r in results[b].items()}
    if len(mri) > 1:
        top = max(mri.values())
        best = [f"`{v}` at {steps(b)}" for (v, b), x in mri.items() if x == top]
        lines.append(f"- Best on MRI ({top:.3f}): " + ", ".join(best) + ".")
    losses = [f"{steps(b)}: " + ", ".join(f"{v} {r['final_loss']:.3f}" for v, r in results[b].items())
              for b in budgets]
    lines.append("- Final training loss (Dice + CE, last epoch): " + "; ".join(losses) + ".")
    return lines


def markdown(result: dict, json_path: Path) -> str:
    """The .md: one table per budget, the summary table, sentences computed from the numbers, then
    command, date, machine and times."""
    result = upgrade(result)
    results, machine, setting = result["results"], result["machine"], result["setting"]
    real = setting["data"] == "real"
    budgets = sorted(results, key=int)
    variants = [v for v in VARIANTS if any(v in results[b] for b in budgets)]
    load = machine.get("load_average_1min")
    runs = [r for b in budgets for r in results[b].values()]
    reused = sum(r.get("reused", False) for r in runs)
    lines = [
        "# Domain gap" + (" on the real bundle" if real else " on phantoms")
        + ": trained on CT only, tested on CT and MRI, without and with GIN",
        "",
        "Mean per-case 3D Dice per organ on " + ("the scored cases" if real else "unseen phantoms") + ". Train: "
        + setting["train"] + ". Test: " + setting["test"] + "."
        + (f" Quick preset, {setting['optimiser']}." if "optimiser" in setting else ""),
        "",
        "Variants: " + "; ".join(f"`{v}`: {VARIANTS[v][1]}" for v in variants) + ".",
    ]
    unscored = [o for o in ORGANS if all(r["by_modality"][m][o]["mean"] is None for r in runs for m in MODALITIES)]
    if unscored:
        lines += ["", f"'-': {', '.join(unscored)} not scored (no test case annotates "
                      f"{'it' if len(unscored) == 1 else 'them'}); the mean is over the organs that are scored."]
    for b in budgets:
        lines += ["", f"## {budget_title(b, results[b])}", "", *table(results[b], "" if real else "phantom ")]
    lines += ["", "## Summary: MRI mean Dice (CT mean Dice) by variant and budget", "",
              *summary_table(results, budgets, variants), "", *findings(results, budgets), ""]
    train_times = "; ".join(
        f"{steps(b)}: " + ", ".join(f"{v} {r['train_seconds']:.0f} s" + (" after resuming" if r.get("resumed") else "")
                                    for v, r in results[b].items())
        for b in budgets)
    lines += [
        f"- Command: `{result['command']}`",
        f"- Date: {result['date']}",
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['threads']} threads" + (f", load average {load:.1f}" if load is not None else ""),
        f"- Total time: {result['total_seconds'] / 60:.1f} min"
        + (f" ({reused} of {len(runs)} runs reused from `--work`, trained by an earlier invocation)" if reused else ""),
        f"- Training time per run: {train_times}",
        f"- Full numbers (sd, n, HD95, per-case Dice, loss per epoch): `{os.path.relpath(json_path, ROOT)}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.redraw:
        result = json.loads(args.out.read_text())
        write_text(args.out.with_suffix(".md"), markdown(result, args.out))
        return result
    if args.data == "real" and not all((args.bundle / n / "dataset.json").is_file() for n in (REAL_CT, REAL_MR)):
        fail(f"real data bundle not found: {args.bundle} needs {REAL_CT}/ and {REAL_MR}/")

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    setting = describe(args)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedgin-domain-gap-")
        work = Path(tmp.name)
    else:
        work = args.work
        setting["work"] = str(work)
    results = run_all(args, setting, work)
    result = {
        **provenance(threads=THREADS),
        "setting": setting,
        "total_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    write_result(args.out, result)
    write_text(args.out.with_suffix(".md"), markdown(result, args.out))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
