"""The phantom domain gap: a model trained on phantom CT only, tested on unseen phantom CT and MRI,
without and with GIN.

Setting: ``fedgin.config.resolve('quick', ...)`` (U-Net 16-32-64-128, 2.5 mm, 128 x 128 slices),
local mode on one CT site of ``--train-cases`` phantom CT cases (every case used for training, no
validation), ``--epochs`` x ``--steps`` optimisation steps of batch 8 at lr 1e-3, seed 0, 2 torch
threads; the same run once with ``gin=False`` and once with ``gin=True`` (everything else equal).
Test: fresh phantom datasets written with another seed (other patients), ``--test-cases`` CT and
``--test-cases`` MRI cases with all organs annotated, scored by ``fedgin.evaluate.evaluate(...,
cases="all")`` (per-case 3D Dice and HD95 on each case's own grid).

Library calls only: ``fedgin.runs.train_non_federated`` (mode ``local``) then
``fedgin.evaluate.evaluate``. Writes ``docs/results/domain_gap.json`` and ``docs/results/domain_gap.md``
and prints the table.

Usage: ``python benchmarks/domain_gap.py [--epochs 12] [--steps 50] [--train-cases 8] [--test-cases 8]``
(``--redraw`` rewrites the .md from the JSON without training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedgin.config import SiteSpec, resolve
from fedgin.data.phantoms import CT_DATASET, write_phantom_datasets
from fedgin.evaluate import evaluate
from fedgin.runs import train_non_federated

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, provenance, write_result, write_text  # noqa: E402

THREADS = 2
LR = 1e-3
TRAIN_SEED, TEST_SEED = 0, 1
ORGANS = ("liver", "kidneys", "spleen", "pancreas", "gallbladder")
VARIANTS = {"CT only, no GIN": False, "CT only + GIN": True}


def train(variant_dir: Path, ct: Path, case_ids: list[str], args, gin: bool, cache: Path) -> tuple[Path, dict]:
    split = variant_dir / "split.json"
    variant_dir.mkdir(parents=True, exist_ok=True)
    split.write_text(json.dumps({"datasets": {CT_DATASET: {"train": case_ids, "val": [], "test": []}}}))
    cfg = resolve(
        "quick", command="benchmark domain_gap", out=str(variant_dir / "run"),
        sites=(SiteSpec("ct", str(ct)),), mode="local", seed=0, split=str(split), cache_dir=str(cache),
        device="cpu",
        train_overrides={"epochs": args.epochs, "steps_per_epoch": args.steps, "lr": LR, "gin": gin,
                         "validate": False, "num_threads": THREADS},
    )
    start = time.perf_counter()
    run = train_non_federated(cfg, log=lambda line: print(line, flush=True)) / "ct"
    seconds = time.perf_counter() - start
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return run, {"train_seconds": round(seconds, 1), "final_loss": round(lines[-1]["loss"], 4),
                 "loss_per_epoch": [round(x["loss"], 4) for x in lines], "config": cfg.train.__dict__}


def table(results: dict) -> list[str]:
    head = "| model | test set | " + " | ".join(ORGANS) + " | mean |"
    rows = [head, "|" + "---|" * (len(ORGANS) + 3)]
    for variant, res in results.items():
        for modality in ("CT", "MRI"):
            stats = res["by_modality"][modality]
            cells = [f"{stats[o]['mean']:.3f}" if stats[o]["mean"] is not None else "-" for o in ORGANS]
            rows.append(f"| {variant} | phantom {modality} ({stats['cases']}) | " + " | ".join(cells)
                        + f" | **{stats['mean_dice']:.3f}** |")
    return rows


def markdown(result: dict, json_path: Path) -> str:
    """``domain_gap.md``: the table, the numbers that answer the question, command, date, machine."""
    results, machine, setting = result["results"], result["machine"], result["setting"]
    no_gin, gin = (results[v]["by_modality"] for v in VARIANTS)
    load = machine.get("load_average_1min")
    lines = [
        "# Phantom domain gap: trained on CT, tested on CT and MRI",
        "",
        "Mean per-case 3D Dice per organ on unseen phantoms. Train: " + setting["train"] + ". Test: "
        + setting["test"] + ".",
        "",
        *table(results),
        "",
        f"- Without GIN the CT-trained model scores {no_gin['CT']['mean_dice']:.3f} on CT and "
        f"{no_gin['MRI']['mean_dice']:.3f} on MRI (gap {no_gin['CT']['mean_dice'] - no_gin['MRI']['mean_dice']:+.3f}).",
        f"- With GIN: {gin['CT']['mean_dice']:.3f} on CT and {gin['MRI']['mean_dice']:.3f} on MRI "
        f"(gap {gin['CT']['mean_dice'] - gin['MRI']['mean_dice']:+.3f}); MRI "
        f"{'improves' if gin['MRI']['mean_dice'] > no_gin['MRI']['mean_dice'] else 'does not improve'} "
        f"({gin['MRI']['mean_dice'] - no_gin['MRI']['mean_dice']:+.3f}) and CT changes by "
        f"{gin['CT']['mean_dice'] - no_gin['CT']['mean_dice']:+.3f} at this training budget.",
        "- Final training loss (Dice + CE, last epoch): " + "; ".join(
            f"{v}: {r['final_loss']:.3f}" for v, r in results.items()) + ".",
        "",
        f"- Command: `{result['command']}`",
        f"- Date: {result['date']}",
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['threads']} threads" + (f", load average {load:.1f}" if load is not None else ""),
        f"- Total time: {result['total_seconds'] / 60:.1f} min (training "
        + ", ".join(f"{v}: {r['train_seconds']:.0f} s" for v, r in results.items()) + ")",
        f"- Full numbers (sd, n, HD95, loss per epoch): `{os.path.relpath(json_path, ROOT)}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50, help="optimisation steps per epoch")
    parser.add_argument("--train-cases", type=int, default=8)
    parser.add_argument("--test-cases", type=int, default=8, help="per modality")
    parser.add_argument("--work", type=Path, help="keep data, runs and evaluations here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "domain_gap.json")
    parser.add_argument("--redraw", action="store_true", help="only rewrite the .md from an existing --out JSON")
    args = parser.parse_args(argv)
    if args.redraw:
        result = json.loads(args.out.read_text())
        write_text(args.out.with_suffix(".md"), markdown(result, args.out))
        return result

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedgin-domain-gap-")
        args.work = Path(tmp.name)
    work = args.work
    cache = work / "cache"
    # the MRI dataset of the training seed is written (the writer makes both) but never used
    train_ct, _ = write_phantom_datasets(work / "train", args.train_cases, 1, seed=TRAIN_SEED)
    test_ct, test_mri = write_phantom_datasets(work / "test", args.test_cases, args.test_cases, seed=TEST_SEED)
    case_ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (train_ct / "imagesTr").glob("*_0000.nii.gz"))

    results = {}
    for variant, gin in VARIANTS.items():
        key = "gin" if gin else "no_gin"
        run, info = train(work / key, train_ct, case_ids, args, gin, cache)
        summary = evaluate(str(run), [str(test_ct), str(test_mri)], str(work / key / "eval"), cases="all",
                           device="cpu", cache_dir=str(cache))
        by_modality = {}
        for modality in ("CT", "MRI"):
            stats = summary["by_modality"][modality]
            by_modality[modality] = {
                **{o: stats[o]["dice"] for o in ORGANS},
                "hd95_mm": {o: stats[o]["hd95"] for o in ORGANS},
                "mean_dice": stats["mean_dice"],
                "cases": stats["cases"],
            }
        results[variant] = {"gin": gin, **info, "by_modality": by_modality,
                            "gap_ct_minus_mri": by_modality["CT"]["mean_dice"] - by_modality["MRI"]["mean_dice"]}

    total = time.perf_counter() - started
    result = {
        **provenance(threads=THREADS),
        "setting": {
            "preset": "quick",
            "train": f"{args.train_cases} phantom CT cases (write_phantom_datasets seed {TRAIN_SEED}), all for "
                     f"training, no validation; {args.epochs} epochs x {args.steps} steps = "
                     f"{args.epochs * args.steps} steps of batch 8, lr {LR}, training seed 0",
            "test": f"{args.test_cases} phantom CT + {args.test_cases} phantom MRI cases "
                    f"(write_phantom_datasets seed {TEST_SEED}: other patients), all organs annotated, "
                    "evaluate(cases='all')",
            "metric": "per-case 3D Dice on the case's own grid; mean (sd, n) over cases per organ; "
                      "mean = mean over organs of the per-organ means",
        },
        "total_seconds": round(total, 1),
        "results": results,
    }
    write_result(args.out, result)
    write_text(args.out.with_suffix(".md"), markdown(result, args.out))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
