"""Time to accuracy: validation Dice per modality against optimisation steps and training time, to
the plateau, for the long runs of an experiment dir (``fedgin experiment ... --rounds 80``).

Every ``--every``-th round (federated) or epoch-equivalent (local: ``local_epochs`` epochs per
round) checkpoint is scored post hoc on the shipped split's validation cases of both sites, the
way a user's prediction is scored (image preprocessed alone, the prediction on the input grid, no
post-processing; ``fedgin.engine.postprocess.validation_scores``), mean Dice over liver, kidneys
and spleen. A local CT-only model is scored on the MRI validation case too (zero-shot).

The plateau of a curve is the best 3-point moving average; the budget that reaches it is the first
step whose moving average is within 0.01 of it (a conservative budget: a shorter run with its own
poly schedule decays its learning rate earlier and is at least as good at its end, as a rule).

    python benchmarks/time_to_accuracy.py --grid DIR --site CT_DATASET --site MRI_DATASET [--every 4] [--out docs/results/time_to_accuracy]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, provenance  # noqa: E402

from fedgin.data.datasets import open_dataset  # noqa: E402
from fedgin.data.labels import get_scheme  # noqa: E402
from fedgin.data.sites import load_validation_case  # noqa: E402
from fedgin.data.splits import split_for  # noqa: E402
from fedgin.engine.checkpoint import load_checkpoint  # noqa: E402
from fedgin.engine.postprocess import validation_scores  # noqa: E402

ORGANS = ("liver", "kidneys", "spleen")


def runs_of(grid: Path) -> list[Path]:
    """Run dirs (with checkpoints) of an experiment dir: federated ones and local sites' ones."""
    found = []
    for config in sorted(grid.glob("runs/*/*/seed*/config.json")) + sorted(grid.glob("runs/*/*/seed*/*/config.json")):
        if (config.parent / "checkpoints").is_dir() and (config.parent / "metrics.jsonl").exists():
            found.append(config.parent)
    return found


def training_seconds(run: Path) -> dict[int, float]:
    """Cumulative training seconds at the end of each round / epoch (federated: the slower site of
    each round, the sites train at once)."""
    per: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = row.get("round", row.get("epoch"))
        if key is not None and row.get("seconds") is not None:
            per[int(key)] = max(per.get(int(key), 0.0), float(row["seconds"]))
    out, total = {}, 0.0
    for key in sorted(per):
        total += per[key]
        out[key] = total
    return out


def plateau(steps: list[int], values: list[float]) -> dict:
    v = np.array(values, float)
    smooth = np.convolve(v, np.ones(3) / 3, mode="valid") if len(v) >= 3 else v
    centre = steps[1:-1] if len(v) >= 3 else steps
    best = float(smooth.max())
    reach = int(np.flatnonzero(smooth >= best - 0.01)[0])
    return {"plateau": round(best, 4), "steps_within_0.01": int(centre[reach]), "final": round(float(v[-1]), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, type=Path)
    parser.add_argument("--site", action="append", required=True, metavar="DATASET",
                        help="a site's dataset folder (repeat: CT and MRI); its shipped split's validation cases")
    parser.add_argument("--every", type=int, default=4, help="score every N-th round's checkpoint")
    parser.add_argument("--out", type=Path, default=RESULTS / "time_to_accuracy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scheme = get_scheme("abdomen5")
    device = torch.device("cpu")
    result = {**provenance(threads=1), "grid": str(args.grid), "runs": {}}
    val_cache: dict[str, list] = {}
    for run in runs_of(args.grid):
        cfg = json.loads((run / "config.json").read_text())
        name = str(run.relative_to(args.grid / "runs"))
        local = cfg["mode"] == "local"
        per_round = cfg["local_epochs"] if local else 1  # local: epochs of one round's budget
        steps_per_unit = cfg["train"]["steps_per_epoch"] * (1 if local else cfg["local_epochs"])
        seconds = training_seconds(run)
        prefix = "epoch" if local else "round"
        units = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob(f"{prefix}_*.pt"))
        picked = [u for u in units if (u // per_round) % args.every == 0 and u % per_round == 0] + units[-1:]
        curve = []
        for unit in sorted(set(picked)):
            ckpt = load_checkpoint(run / "checkpoints" / f"{prefix}_{unit:03d}.pt")
            model = ckpt.build(device)
            point = {"steps": unit * steps_per_unit, "train_seconds": round(seconds.get(unit, float("nan")), 1)}
            for path in args.site:
                cases = val_cache.get(path)
                if cases is None:
                    opened = open_dataset(path, scheme)
                    split = split_for(opened.name, [c.case_id for c in opened.cases], 0)
                    cases = val_cache[path] = [load_validation_case(opened.case(i), scheme, ckpt.preprocess,
                                                                    None) for i in split.val]
                plain, _ = validation_scores(model, cases, scheme, device)
                point[cases[0].modality] = round(float(np.mean([plain[o] for o in ORGANS if plain[o] is not None])), 4)
            curve.append(point)
            print(name, point, flush=True)
        summary = {m: plateau([p["steps"] for p in curve], [p[m] for p in curve]) for m in ("CT", "MRI")}
        for m in summary:
            summary[m]["train_seconds_to_reach"] = seconds.get(summary[m]["steps_within_0.01"] // steps_per_unit)
        result["runs"][name] = {"mode": cfg["mode"], "gin": cfg["train"]["gin"], "curve": curve, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, run in result["runs"].items():
        for ax, modality in zip(axes, ("CT", "MRI")):
            ax.plot([p["steps"] for p in run["curve"]], [p[modality] for p in run["curve"]], marker=".", label=name)
    for ax, modality in zip(axes, ("CT", "MRI")):
        ax.set_title(f"{modality} validation (mean Dice liver, kidneys, spleen)")
        ax.set_xlabel("optimisation steps per site")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
