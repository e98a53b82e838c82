"""Post-processing by size alone against the side-of-body rule, on one model's predictions.

For every labelled case of the given datasets (``--cases all``, or the model's ``test`` split),
the model predicts once (as ``fedgin predict`` does: the image alone, on its input grid); the
prediction is then scored three ways per organ (3D Dice and HD95): as predicted, after keeping the
largest component(s) by size alone (the rule before the side of the body), and after the
side-of-body rule (``fedgin.engine.postprocess.SIDE_OF_BODY``: the largest component on the organ's
side of the body's midline). Writes ``docs/results/side_rule.json`` (or ``--out``)
with the command that produced it.

Usage: ``python benchmarks/side_rule.py --model RUN --data DATASET [--data ...] [--cases all|test]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedgin.data.body import body_side
from fedgin.data.cache import load_case
from fedgin.data.nifti import spacing_of
from fedgin.engine.checkpoint import load_checkpoint
from fedgin.engine.inference import predict_labels
from fedgin.engine.metrics import case_metrics
from fedgin.engine.postprocess import PostprocessPlan, candidate_plan
from fedgin.engine.trainer import resolve_device
from fedgin.evaluation.scoring import select_cases

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, provenance, write_result  # noqa: E402

RULES = ("as_predicted", "by_size", "side_of_body")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run dir or checkpoint")
    parser.add_argument("--data", action="append", required=True, help="dataset folder (repeat)")
    parser.add_argument("--cases", choices=("all", "test"), default="all")
    parser.add_argument("--cache-dir", help="preprocessing cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "side_rule.json")
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.model)
    scheme = ckpt.scheme
    sided = candidate_plan(scheme)
    plans = {"by_size": PostprocessPlan(sided.keep_largest), "side_of_body": sided}
    organs = {o: i for o, i in scheme.label_ids.items() if i > 0}
    device = resolve_device("cpu")
    model = ckpt.build(device)
    refs = select_cases(args.data, scheme, cases=args.cases, seed=int(ckpt.meta.get("seed", 0)),
                        split_file=ckpt.meta.get("split"))
    cases, changed = [], []
    for ref in refs:
        image, reference, affine = ref.read(scheme)
        pre = load_case(ref, scheme, ckpt.preprocess, Path(args.cache_dir) if args.cache_dir else None,
                        image_only=True)
        pred = predict_labels(model, pre, device)
        body = body_side(image, affine, ref.modality)
        preds = {"as_predicted": pred, **{k: plan.apply(pred, scheme, body) for k, plan in plans.items()}}
        spacing = spacing_of(affine)
        scores = {rule: case_metrics(p, reference, organs, ref.annotated, spacing) for rule, p in preds.items()}
        differ = [o for o, i in organs.items() if not np.array_equal(preds["by_size"] == i, preds["side_of_body"] == i)]
        cases.append({"case": ref.case_id, "modality": ref.modality, "dataset": ref.dataset,
                      "midline_x_mm": round(body.midline_x, 1), "organs_where_the_rules_differ": differ,
                      "metrics": scores})
        if differ:
            changed.append(ref.case_id)
        print(f"{ref.case_id} ({ref.modality}): rules differ on {differ or 'nothing'}", flush=True)
    result = {**provenance(), "model": str(ckpt.path), "cases_scored": len(cases),
              "cases_where_the_rules_differ": changed, "rules": list(RULES), "per_case": cases}
    write_result(args.out, result)
    print(f"{len(changed)} of {len(cases)} cases differ between the rules -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
