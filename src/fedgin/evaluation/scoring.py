"""``fedgin evaluate``: per-case 3D Dice and HD95 per organ and modality, nnU-Net-like summary.

``--model`` scores exactly what ``fedgin predict`` writes: each case's image is preprocessed alone
(its label never widens the plane the model sees), predicted slice-wise, mapped back to the case's
own grid, post-processed there with the checkpoint's plan (unless ``--no-postprocess``), and
compared there with the reference (HD95 uses the case's own voxel spacing, in mm).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..config import package_versions
from ..data.body import body_side
from ..data.cache import load_case
from ..data.datasets import CaseRef, Dataset, check_label_map_names, open_dataset
from ..data.labels import LabelScheme, normalise_label_map
from ..data.nifti import spacing_of
from ..data.sites import test_refs
from ..data.splits import split_for
from ..engine.checkpoint import Checkpoint, load_checkpoint, normalisation_note
from ..engine.inference import predict_labels
from ..engine.metrics import case_metrics, failure_keys, mean_sd, outcome_counts, share
from ..engine.trainer import resolve_device
from ..errors import FedginError
from .qa import CaseRecorder, evaluation_page


def cases_to_score(datasets: list[Dataset], *, cases: str = "test", seed: int = 0,
                   split_file: str | None = None) -> list[CaseRef]:
    """The cases to score: each dataset's test split (``test``) or all of its labelled cases (``all``)."""
    refs: list[CaseRef] = []
    for dataset in datasets:
        if cases == "all":
            refs += dataset.cases + [c for c in dataset.test_cases if c.label is not None]
        elif cases == "test":
            split = split_for(dataset.name, [c.case_id for c in dataset.cases], seed, split_file)
            refs += test_refs(dataset, split)
        else:
            raise FedginError(f"--cases must be test or all, got {cases!r}")
    if not refs:
        raise FedginError("no labelled cases to evaluate (try --cases all)")
    return refs


def select_cases(datasets: list[str], scheme: LabelScheme, *, cases: str = "test", seed: int = 0,
                 split_file: str | None = None, label_map: Mapping[str, str] | None = None) -> list[CaseRef]:
    """:func:`cases_to_score` of the dataset folders ``datasets`` (``label_map``: see :func:`open_dataset`)."""
    opened = [open_dataset(path, scheme, label_map=label_map) for path in datasets]
    return cases_to_score(opened, cases=cases, seed=seed, split_file=split_file)


def merged_label_map(recorded: Mapping[str, str] | None, given: Mapping[str, str] | None) -> dict[str, str] | None:
    """The label map a model (or its predictions) recorded, with the command line's entries on top."""
    merged = {**normalise_label_map(recorded), **normalise_label_map(given)}
    return merged or None


def evaluate_cases(ckpt: Checkpoint, refs: list[CaseRef], *, device: torch.device | None = None,
                   cache_dir: Path | None = None, with_hd95: bool = True, postprocess: bool = True,
                   compile: bool = False, recorder: CaseRecorder | None = None) -> list[dict]:
    """One record per case: id, dataset, modality, and ``{organ: {dice, hd95, missed, false_positive}}``; ``postprocess``
    applies the checkpoint's post-processing plan to each prediction; ``recorder`` adds each case's
    organ statistics (and keeps its images for the QA page)."""
    device = device or resolve_device()
    model = ckpt.build(device)
    organs = {o: i for o, i in ckpt.scheme.label_ids.items() if i > 0}
    records = []
    for ref in tqdm(refs, desc="evaluate", unit="case", leave=False, disable=None):
        start = time.perf_counter()
        image, reference, affine = ref.read(ckpt.scheme)
        # the image alone, as `fedgin predict` preprocesses it: the label must not widen the plane
        pre = load_case(ref, ckpt.scheme, ckpt.preprocess, cache_dir, image_only=True)
        pred = predict_labels(model, pre, device, compile=compile)
        if postprocess:
            body = body_side(image, affine, ref.modality) if ckpt.postprocess.sides else None
            pred = ckpt.postprocess.apply(pred, ckpt.scheme, body)
        scores = case_metrics(pred, reference, organs, ref.annotated, spacing_of(affine), with_hd95=with_hd95)
        records.append({"case": ref.case_id, "dataset": ref.dataset, "modality": ref.modality,
                        "annotated": list(ref.annotated), "metrics": scores,
                        "seconds": time.perf_counter() - start})
        if recorder is not None:
            records[-1]["statistics"] = recorder.add(ref.case_id, ref.dataset, ref.modality, image, affine,
                                                     pred, reference)
    return records


def summarise(records: list[dict], scheme: LabelScheme) -> dict:
    """Mean and sd per organ per modality (and over all cases), ignoring nulls, and per organ the
    count of misses and false positives among the cases that annotate it, and the failures (Dice
    below 0.5 and 0.7, HD95 above 50 mm or missed) among the cases whose reference holds it, with
    their share (``failure_share``; None where no case holds it)."""
    groups: dict[str, list[dict]] = {"all": records}
    for r in records:
        groups.setdefault(r["modality"], []).append(r)
    out = {}
    for name, rows in groups.items():
        out[name] = {}
        for organ in scheme.organs:
            metrics = [r["metrics"][organ] for r in rows]
            counts = outcome_counts(metrics)
            out[name][organ] = {**{m: mean_sd([x[m] for x in metrics]) for m in ("dice", "hd95")}, **counts,
                                "failure_share": {k: share(counts[k], counts["present"]) for k in failure_keys()}}
        means = [out[name][o]["dice"]["mean"] for o in scheme.organs if out[name][o]["dice"]["mean"] is not None]
        out[name]["mean_dice"] = sum(means) / len(means) if means else None
        out[name]["cases"] = len(rows)
    return out


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _failures(stats: dict, key: str) -> str:
    """``k / n (share)`` failed cases of an organ, '-' where no case holds it (or an old summary)."""
    if not stats.get("present"):
        return "-"
    return f"{stats[key]} / {stats['present']} ({stats[key] / stats['present']:.0%})"


def summary_markdown(summary: dict, scheme: LabelScheme, title: str = "Evaluation") -> str:
    lines = [f"# {title}", "", "Per-case 3D Dice and HD95 (mm), mean ± sd over cases; '-' = no annotated case. "
             "HD95 is undefined where one side is empty, so its mean leaves out the organs counted in "
             "*missed* (in the reference, not predicted) and *FP* (predicted, absent from the reference); "
             "n: cases that annotate the organ. *Dice < 0.5* and *HD95 > 50 mm*: failed cases out of those "
             "whose reference holds the organ (a missed organ fails both).", ""]
    for modality, stats in summary["by_modality"].items():
        if modality == "all":
            continue
        lines += [f"## {modality} ({stats['cases']} cases)", "",
                  "| organ | Dice | HD95 (mm) | missed | FP | n | Dice < 0.5 | HD95 > 50 mm |",
                  "|---|---|---|---|---|---|---|---|"]
        for organ in scheme.organs:
            s = stats[organ]
            fails = " | ".join(_failures(s, key) for key in ("dice_below_0.5", "hd95_above_50mm"))
            lines.append(f"| {organ} | {_fmt(s['dice'])} | {_fmt(s['hd95'], 1)} | {s['missed']} | "
                         f"{s['false_positives']} | {s['annotated']} | {fails} |")
        md = stats["mean_dice"]
        lines += [f"| **mean** | **{md:.3f}** | | | | | | |" if md is not None else "| mean | - | | | | | | |", ""]
    return "\n".join(lines) + "\n"


def mean_dice_lines(summary: dict) -> list[str]:
    """One line per modality of an evaluation summary with a mean Dice: that mean and the case count."""
    return [f"{modality}: mean Dice {stats['mean_dice']:.3f} over {stats['cases']} cases"
            for modality, stats in summary["by_modality"].items()
            if modality != "all" and stats["mean_dice"] is not None]


def write_evaluation(out: Path, records: list[dict], scheme: LabelScheme, args: dict, *,
                     model: str | None, model_meta: dict | None, predictions: str | None = None) -> dict:
    """Write ``summary.json`` (nnU-Net-like), ``metrics.csv`` and ``summary.md`` into ``out``.

    ``model`` (None: not known) made the scored labels, or ``predictions`` holds them (``--pred``)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "metric_per_case": records,
        "by_modality": summarise(records, scheme),
        "scheme": scheme.to_dict(),
        "model": model,
        "model_meta": model_meta,
        **({"predictions": predictions} if predictions is not None else {}),
        "arguments": args,
        "versions": package_versions(),
        "null_means": "organ not annotated in the case, or absent from both prediction and reference "
                      "(HD95 also when either side is empty: see missed and false_positive)",
    }
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", "dataset", "modality", "organ", "annotated", "dice", "hd95", "missed", "false_positive"])
    for r in records:
        for organ, m in r["metrics"].items():
            writer.writerow([r["case"], r["dataset"], r["modality"], organ, organ in r["annotated"],
                             "" if m["dice"] is None else f"{m['dice']:.6f}",
                             "" if m["hd95"] is None else f"{m['hd95']:.4f}",
                             "" if m.get("missed") is None else m["missed"],
                             "" if m.get("false_positive") is None else m["false_positive"]])
    write_text(out / "metrics.csv", buf.getvalue())
    write_text(out / "summary.md", summary_markdown(summary, scheme))
    return summary


def evaluate(model: str, datasets: list[str], out: str, *, cases: str = "test", seed: int | None = None,
             split_file: str | None = None, device: str = "auto", cache_dir: str | None = None,
             postprocess: bool = True, label_map: Mapping[str, str] | None = None, compile: bool = False,
             qa: bool = False) -> dict:
    """Score a model; the split (seed and split file) defaults to the one the model was trained with,
    so a model is never scored on its own training cases by accident. ``postprocess`` False scores
    the raw predictions (the checkpoint's post-processing plan is not applied). The label map is the
    one the model was trained with (checkpoint meta), ``label_map``'s entries on top; a name of
    ``label_map`` that no dataset labels is refused. Each case's organ statistics go to
    ``statistics/``; ``qa`` also writes ``qa.html`` and ``qa.npz`` (:mod:`fedgin.evaluation.qa`)."""
    ckpt = load_checkpoint(model)
    if seed is None:
        seed = int(ckpt.meta.get("seed", 0))
    if split_file is None:
        split_file = ckpt.meta.get("split")
    effective = merged_label_map(ckpt.meta.get("label_map"), label_map)
    opened = [open_dataset(path, ckpt.scheme, label_map=effective) for path in datasets]
    check_label_map_names(label_map, opened)
    refs = cases_to_score(opened, cases=cases, seed=seed, split_file=split_file)
    with CaseRecorder.for_evaluation(out, ckpt.scheme, qa, cases=len(refs)) as recorder:
        records = evaluate_cases(ckpt, refs, device=resolve_device(device),
                                 cache_dir=Path(cache_dir) if cache_dir else None, postprocess=postprocess,
                                 compile=compile, recorder=recorder)
    args = {"model": model, "data": datasets, "cases": cases, "seed": seed, "split": split_file,
            "label_map": effective, "postprocess": postprocess,
            "postprocess_plan": ckpt.postprocess.to_dict() if postprocess else None}
    note = normalisation_note(ckpt)
    if note:
        args["normalisation"] = note
    summary = write_evaluation(Path(out), records, ckpt.scheme, args, model=str(ckpt.path), model_meta=ckpt.meta)
    if qa:
        evaluation_page(Path(out), summary, ckpt.scheme)
    return summary
