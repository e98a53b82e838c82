"""Does a tightly cropped field of view cost Dice? The same CT patients, whole and cropped.

The grid's fold 2 tests ``tsds_s0009``, a TotalSegmentator CT cut to 119 x 119 voxels of 1.5 mm
(179 mm in-plane, against 303-372 mm for the other CTs): no body outline, every organ cut by the
field's edge; every method misses it. To measure whether such a crop by itself costs a model its
Dice, each CT case of ``--data`` with liver, kidneys and spleen (or with the liver alone:
``chaos_ct_liver``) is written twice: whole, and cropped in-plane to ``--fov`` mm (default: the
179 mm of ``tsds_s0009``) around the centre of its labelled liver, kidneys and spleen (slices
kept; the affine moved so the patient stays where it is in space). Both are predicted with
``fedgin predict --model MODEL`` (what a user gets: the image alone, the model's post-processing)
and scored per organ (3D Dice) over the cropped region only, so both are scored on the same
voxels (an organ wholly outside the window is left out). A case's role in the model's split
(train / val / test, as training drew it: :func:`fedgin.data.splits.split_for`) is reported: a
training case shows the crop's effect on anatomy the model has seen, a val / test case on unseen
anatomy.
Writes ``docs/results/cropped_fov.json`` (or ``--out``).

Usage: ``python benchmarks/cropped_fov.py --model RUN [--data DIR] [--fov 178.5] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, provenance, write_result  # noqa: E402
from field_of_view import predict  # noqa: E402

from fedgin.data.datasets import open_dataset  # noqa: E402
from fedgin.data.labels import get_scheme  # noqa: E402
from fedgin.data.nifti import read_volume, write_volume  # noqa: E402
from fedgin.data.splits import split_for  # noqa: E402
from fedgin.engine.checkpoint import load_checkpoint  # noqa: E402
from fedgin.engine.metrics import dice_score  # noqa: E402

ORGANS = ("liver", "kidneys", "spleen")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "abdomen-ct-mr" / "Dataset801_AbdomenCT"


def crop_box(label: np.ndarray, spacing: np.ndarray, fov_mm: float, organ_ids: list[int]) -> tuple[slice, slice]:
    """The in-plane window of ``fov_mm`` around the centre of the voxels of ``organ_ids``, clamped
    inside the image (a window at least as large as the image keeps all of it)."""
    xs, ys, _ = np.nonzero(np.isin(label, organ_ids))
    window = []
    for axis, centre in enumerate((xs.mean(), ys.mean())):
        n = min(label.shape[axis], int(round(fov_mm / spacing[axis])))
        start = int(np.clip(round(centre - n / 2), 0, label.shape[axis] - n))
        window.append(slice(start, start + n))
    return tuple(window)


def moved_affine(affine: np.ndarray, window: tuple[slice, slice]) -> np.ndarray:
    """The affine of the cropped image, so that its voxels keep their place in space."""
    moved = affine.copy()
    moved[:3, 3] += affine[:3, :3] @ np.array([window[0].start, window[1].start, 0.0])
    return moved


def _rounded(value):
    return None if value is None else round(float(value), 4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a run directory or checkpoint trained on the real bundle")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a CT dataset folder")
    parser.add_argument("--fov", type=float, default=178.5, help="the cropped window's in-plane size, mm")
    parser.add_argument("--out", type=Path, default=RESULTS / "cropped_fov.json")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"the CT dataset is not at {args.data}", file=sys.stderr)
        return {}
    scheme = get_scheme("abdomen5")
    ids = {o: scheme.label_ids[o] for o in ORGANS}
    ckpt = load_checkpoint(args.model)
    dataset = open_dataset(args.data, scheme)
    refs = dataset.cases + dataset.test_cases
    split = split_for(dataset.name, [r.case_id for r in refs], int(ckpt.meta.get("seed", 0)), ckpt.meta.get("split"))
    role_of = {case: role for role in ("train", "val", "test") for case in getattr(split, role)}
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    work = Path(tempfile.mkdtemp(prefix="fedgin-bench-crop-"))
    kept = {}
    for ref in refs:
        organs = [o for o in ORGANS if o in ref.annotated]
        if "liver" not in organs:
            continue
        image, label, affine = ref.read(scheme)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        window = crop_box(label, spacing, args.fov, [ids[o] for o in organs])
        if all(w.stop - w.start == n for w, n in zip(window, image.shape[:2])):
            continue  # already no wider than the window: nothing to crop (tsds_s0009 itself)
        write_volume(work / "whole" / f"{ref.case_id}_0000.nii.gz", image, affine, dtype=np.int16)
        write_volume(work / "cropped" / f"{ref.case_id}_0000.nii.gz", image[window], moved_affine(affine, window),
                     dtype=np.int16)
        kept[ref.case_id] = (organs, label, window, spacing)
    for kind in ("whole", "cropped"):
        predict(str(args.model), work / kind, work / f"pred-{kind}", "CT", env)
    cases = []
    for case_id, (organs, label, window, spacing) in kept.items():
        whole, _ = read_volume(work / "pred-whole" / f"{case_id}.nii.gz", kind="label")
        cropped, _ = read_volume(work / "pred-cropped" / f"{case_id}.nii.gz", kind="label")
        ref_crop, whole_crop = label[window], whole[window]
        row = {"case": case_id, "role": role_of.get(case_id, "unknown"), "shape": list(label.shape),
               "fov_mm": [round(float(n * s), 1) for n, s in zip(label.shape[:2], spacing[:2])],
               "window_voxels": [w.stop - w.start for w in window], "organs": {}}
        for organ in organs:
            i = ids[organ]
            total, inside = int((label == i).sum()), int((ref_crop == i).sum())
            if not inside:
                continue  # the organ lies wholly outside the window: nothing to score
            row["organs"][organ] = {
                "share_inside_window": _rounded(inside / total),
                "dice_whole": _rounded(dice_score(whole_crop == i, ref_crop == i)),
                "dice_cropped": _rounded(dice_score(cropped == i, ref_crop == i))}
        cases.append(row)
        print(json.dumps(row), flush=True)

    def mean(key: str, role: str | None = None) -> float | None:
        values = [o[key] for r in cases if role in (None, r["role"]) for o in r["organs"].values()
                  if o[key] is not None]
        return round(float(np.mean(values)), 4) if values else None

    result = {**provenance(2), "model": str(args.model), "data": str(args.data), "fov_mm": args.fov,
              "organs": list(ORGANS), "cases": cases,
              "mean_over_organ_cases": {role or "all": {k: mean(k, role) for k in ("dice_whole", "dice_cropped")}
                                        for role in (None, "train", "val", "test")}}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
