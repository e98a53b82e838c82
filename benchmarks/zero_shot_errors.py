"""What kind of error a model makes on a modality: where each organ's voxels go, and where each
predicted organ's voxels come from.

For each ``--model`` (a run dir or checkpoint) and each case of ``--data`` in the model's own test
split (``--cases test``, the default; the split and seed recorded in the checkpoint), the model
predicts as ``fedgin predict`` writes it (the image alone, on the input grid, the checkpoint's
post-processing plan applied) and the prediction is compared with the reference voxel by voxel:

- *recall side*: of each annotated organ's reference voxels, the share predicted as background, as
  the organ itself, and as each other organ (a row sums to 1): a miss (called background) is told
  from a confusion (called another organ);
- *precision side*: of each predicted organ's voxels, the share that is the organ, another
  annotated organ, or background (voxels of organs the case does not annotate count as background
  there, so on a liver-only case this side is an upper bound of the error);
- the predicted / reference volume, the Dice, and the share of predicted voxels in components
  that do not touch the reference (mass placed far from the organ);
- of the organ's *missed* voxels (reference organ, predicted background): the network's mean
  softmax probability of the organ there and the share above 0.25 (an under-confident model that a
  lower threshold would reach, against one blind to them), and the share of the organ's axial
  slices (the voxel axis nearest the body's long axis) that the prediction leaves empty.

Shares are means over cases (each case weighs the same). Writes ``docs/results/zero_shot_errors.json``
and ``.md`` (or ``--out``) with the command. Used to explain issue 22's missed zero-shot goal (a
CT-only model scored on MRI); it scores test patients and chooses nothing.

Usage::

    python benchmarks/zero_shot_errors.py --model RUN_A --model RUN_B --data MRI_DATASET [--cache-dir C]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, provenance, write_result, write_text  # noqa: E402

from fedgin.data.body import body_side  # noqa: E402
from fedgin.data.cache import load_case  # noqa: E402
from fedgin.engine.checkpoint import load_checkpoint  # noqa: E402
from fedgin.engine.inference import predict_labels_and_probabilities  # noqa: E402
from fedgin.engine.trainer import resolve_device  # noqa: E402
from fedgin.evaluation.scoring import select_cases  # noqa: E402

BACKGROUND = "background"


#: a missed voxel whose organ probability is above this counts as "nearly found"
NEAR = 0.25


def case_errors(pred: np.ndarray, reference: np.ndarray, organs: dict[str, int],
                annotated: set[str] | frozenset, probs: np.ndarray | None = None, slice_axis: int = 2) -> dict:
    """The voxel-level error breakdown of one case (see the module's docstring); ``organs`` maps
    each organ name to its label value (background, 0, left out), ``annotated`` the organs the
    case's reference labels; ``probs`` (classes first, the grid of ``pred``) the network's softmax."""
    names = {0: BACKGROUND, **{i: o for o, i in organs.items()}}
    known = {i for o, i in organs.items() if o in annotated}
    truth = np.where(np.isin(reference, list(known)), reference, 0)  # unannotated organs: background
    out: dict = {"recall": {}, "precision": {}, "volume_ratio": {}, "dice": {}, "far_share": {},
                 "missed_probability": {}, "missed_near_share": {}, "empty_slice_share": {}}
    other_axes = tuple(a for a in range(reference.ndim) if a != slice_axis)
    for organ, i in organs.items():
        ref = truth == i
        mask = pred == i
        if organ in annotated and ref.any():
            called = pred[ref]
            out["recall"][organ] = {names[j]: float((called == j).mean()) for j in names}
            out["volume_ratio"][organ] = float(mask.sum() / ref.sum())
            out["dice"][organ] = float(2 * (mask & ref).sum() / (mask.sum() + ref.sum()))
            if mask.any():
                components, n = ndimage.label(mask)
                touching = np.unique(components[mask & ref])
                far = ~np.isin(components, touching[touching > 0]) & mask
                out["far_share"][organ] = float(far.sum() / mask.sum())
            else:
                out["far_share"][organ] = None
            present = ref.any(axis=other_axes)
            found = mask.any(axis=other_axes)
            out["empty_slice_share"][organ] = float((present & ~found).sum() / present.sum())
            missed = ref & (pred == 0)
            if probs is not None and missed.any():
                p = probs[i][missed].astype(np.float32)
                out["missed_probability"][organ] = float(p.mean())
                out["missed_near_share"][organ] = float((p > NEAR).mean())
        if mask.any() and organ in annotated:
            came = truth[mask]
            out["precision"][organ] = {names[j]: float((came == j).mean()) for j in [0, *sorted(known)]}
    return out


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def pooled(cases: list[dict]) -> dict:
    """Case means of every share of :func:`case_errors`."""
    out: dict = {}
    for side in ("recall", "precision"):
        organs = sorted({o for c in cases for o in c[side]})
        out[side] = {o: {k: _mean([c[side][o].get(k) for c in cases if o in c[side]])
                         for k in sorted({k for c in cases if o in c[side] for k in c[side][o]})}
                     for o in organs}
    for key in ("volume_ratio", "dice", "far_share", "missed_probability", "missed_near_share", "empty_slice_share"):
        organs = sorted({o for c in cases for o in c[key]})
        out[key] = {o: _mean([c[key].get(o) for c in cases]) for o in organs}
    return out


def score_model(model: str, data: list[str], cases: str, cache_dir: Path | None, modality: str | None) -> dict:
    ckpt = load_checkpoint(model)
    device = resolve_device("cpu")
    net = ckpt.build(device)
    organs = {o: i for o, i in ckpt.scheme.label_ids.items() if i > 0}
    refs = select_cases(data, ckpt.scheme, cases=cases, seed=int(ckpt.meta.get("seed", 0)),
                        split_file=ckpt.meta.get("split"))
    per_case = []
    for ref in refs:
        if modality and ref.modality != modality:
            continue
        image, reference, affine = ref.read(ckpt.scheme)
        pre = load_case(ref, ckpt.scheme, ckpt.preprocess, cache_dir, image_only=True)
        pred, probs = predict_labels_and_probabilities(net, pre, device)
        body = body_side(image, affine, ref.modality) if ckpt.postprocess.sides else None
        pred = ckpt.postprocess.apply(pred, ckpt.scheme, body)
        slice_axis = int(np.argmax(np.abs(np.asarray(affine)[2, :3])))  # nearest the body's long axis
        errors = case_errors(pred, reference, organs, set(ref.annotated), probs, slice_axis)
        per_case.append({"case": ref.case_id, "modality": ref.modality, **errors})
        print(f"{Path(model).name}: {ref.case_id} dice "
              + ", ".join(f"{o} {d:.2f}" for o, d in errors["dice"].items()), flush=True)
    return {"model": str(ckpt.path), "cases": len(per_case), "mean": pooled(per_case), "per_case": per_case}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(result: dict, organs: list[str]) -> str:
    lines = ["# Where a model's errors go, voxel by voxel", "",
             f"`{result['command']}` ({result['date']}). Each model's own test cases, predicted as `fedgin predict` "
             "writes them (post-processing plan applied); shares are means over cases.", ""]
    for label, m in result["models"].items():
        mean = m["mean"]
        lines += [f"## {label} ({m['cases']} cases)", "", f"`{m['model']}`", "",
                  "Of each organ's reference voxels, the share predicted as (a row sums to 100%); then Dice, "
                  "predicted / reference volume, the share of the predicted organ in components that "
                  "do not touch the reference (*far*), the organ's mean probability on its missed voxels "
                  f"(*p missed*) and their share above {NEAR} (*near*), and the share of its slices "
                  "left empty:", "",
                  "| organ | " + " | ".join([BACKGROUND, *organs])
                  + " | Dice | volume | far | p missed | near | empty slices |",
                  "|---|" + "---|" * (len(organs) + 7)]
        for organ, row in mean["recall"].items():
            lines.append(f"| {organ} | " + " | ".join(_pct(row.get(k)) for k in [BACKGROUND, *organs])
                         + f" | {mean['dice'][organ]:.3f} | {mean['volume_ratio'][organ]:.2f} "
                         f"| {_pct(mean['far_share'].get(organ))} | {_num(mean['missed_probability'].get(organ))} "
                         f"| {_pct(mean['missed_near_share'].get(organ))} | {_pct(mean['empty_slice_share'].get(organ))} |")
        precision = mean["precision"]
        if precision:
            columns = sorted({k for row in precision.values() for k in row}, key=lambda k: (k != BACKGROUND, k))
            lines += ["", "Of each predicted organ's voxels, the share whose reference is:", "",
                      "| predicted | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            for organ, row in precision.items():
                lines.append(f"| {organ} | " + " | ".join(_pct(row.get(k)) for k in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True,
                        help="run dir or checkpoint (repeat); LABEL=PATH names it in the report")
    parser.add_argument("--data", action="append", required=True, help="dataset folder (repeat)")
    parser.add_argument("--cases", choices=("all", "test"), default="test")
    parser.add_argument("--modality", default=None, help="score only this modality's cases (CT, MRI)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="preprocessing cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "zero_shot_errors")
    args = parser.parse_args(argv)
    models = {}
    for spec in args.model:
        label, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        models[label] = score_model(path, args.data, args.cases, args.cache_dir, args.modality)
    organs = sorted({o for m in models.values() for c in m["per_case"] for o in c["recall"]}
                    | {o for m in models.values() for c in m["per_case"] for row in c["recall"].values() for o in row}
                    - {BACKGROUND})
    result = {**provenance(), "data": args.data, "cases": args.cases, "models": models}
    write_result(args.out.with_suffix(".json"), result)
    write_text(args.out.with_suffix(".md"), markdown(result, organs))
    print(f"-> {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
