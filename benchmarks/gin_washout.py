"""Share of washed-out GIN draws on real CT and MRI slices, on [0, 1] input and on z-scored input.

GIN's networks have N(0, 1) weights *and* biases. On [0, 1] input the biases dominate, and many
draws come out nearly constant over the body ("washed out"): the model then trains on an image
without anatomy. Z-scoring the body (``PreprocessConfig(intensity="zscore")``, the default) is the
fix this benchmark measures.

Definition: a draw is *washed out* when its standard deviation over the body is below
``WASHOUT_RATIO`` (0.2) x its root mean square over the body. The ratio std / RMS is scale-free
(GIN's norm restoration does not change it), 1 for a body of mean 0 and 0 for a constant body.
The body is the voxels above ``fedgin.data.preprocess.BODY_THRESHOLD`` (CT > 0.0, MRI > 0.05) in
the ``intensity="unit"`` preprocessing of the case, so both modes are scored on the same voxels.

Setting: the shared bundle ``../shared/data/abdomen-ct-mr`` next to the repository (nnU-Net raw:
``Dataset801_AbdomenCT``, ``Dataset802_AbdomenMR``), read with ``fedgin.data.datasets.open_dataset``
and the ``abdomen5`` scheme, preprocessed with ``PreprocessConfig(spacing_mm=(2.5, 2.5),
slice_size=(128, 128), intensity=...)``. Per case: three axial slices, the middle of the labelled
range (first and last preprocessed slice with any organ voxel) and the slices 2 below and 2 above
it. Per slice: ``--draws`` draws of ``GIN(spatial_dims=2)`` (defaults: 4 layers, 2 hidden channels,
kernels 1/3, alpha ~ U(0, 1), p = 1). The generator is seeded with ``--seed`` once per case and
mode, so both modes see the very same networks and alphas on the same slices.

Writes ``docs/results/gin_washout.json`` and ``docs/results/gin_washout.md`` (or ``--out`` and the
``.md`` next to it) and prints them. A missing bundle exits with status 2 and writes nothing.

Usage: ``python benchmarks/gin_washout.py [--cases btcv_sabs_00,chaos_t2_01] [--draws 100]
[--seed 0] [--out docs/results/gin_washout.json]``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from fedgin.augment import GIN
from fedgin.data.datasets import CaseRef, open_dataset
from fedgin.data.labels import LabelScheme, get_scheme
from fedgin.data.preprocess import BODY_THRESHOLD, PreprocessConfig, preprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, machine_info, now_iso, write_result, write_text  # noqa: E402

WASHOUT_RATIO = 0.2
MODES = ("unit", "zscore")
MODALITIES = ("CT", "MRI")
SLICE_OFFSETS = (-2, 0, 2)  # around the middle of the labelled range
SCHEME = "abdomen5"
BUNDLE = ROOT.parent / "shared" / "data" / "abdomen-ct-mr"
DATASETS = ("Dataset801_AbdomenCT", "Dataset802_AbdomenMR")
DEFAULT_CASES = ("btcv_sabs_00", "chaos_t2_01")
SPACING_MM, SLICE_SIZE = (2.5, 2.5), (128, 128)

Augment = Callable[..., torch.Tensor]


def fail(message: str) -> NoReturn:
    print(f"gin_washout: {message}", file=sys.stderr)
    sys.exit(2)


def std_rms_ratio(images: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """std / RMS of each ``B x 1 x H x W`` image over its body (``B x H x W`` bool, or one
    ``H x W`` mask for all); ``B`` values in [0, 1], 0 where the body is constant (or all zero)."""
    body = body.expand(images.shape[0], *images.shape[-2:])
    ratios = []
    for image, mask in zip(images[:, 0], body):
        values = image[mask].double()
        rms = values.square().mean().sqrt()
        std = values.std(correction=0)
        ratios.append(std / rms if rms > 0 else torch.zeros((), dtype=torch.float64))
    return torch.stack(ratios).float()


def washed_out(ratio: torch.Tensor) -> torch.Tensor:
    """True where a draw's std / RMS over the body is below ``WASHOUT_RATIO``."""
    return ratio < WASHOUT_RATIO


def gin_ratios(augment: Augment, slices: torch.Tensor, body: torch.Tensor, draws: int,
               generator: torch.Generator) -> torch.Tensor:
    """std / RMS over the body of ``draws`` augmentations of every slice: ``S x draws``.

    ``slices`` is ``S x H x W`` float, ``body`` ``S x H x W`` bool; ``augment(x, generator=g)`` is
    called once on the ``S * draws x 1 x H x W`` batch (sample ``s * draws + d`` is slice ``s``), so
    the same seed gives the same networks for any input of that shape.
    """
    batch = slices[:, None].repeat_interleave(draws, dim=0)
    out = augment(batch, generator=generator)
    return std_rms_ratio(out, body.repeat_interleave(draws, dim=0)).view(len(slices), draws)


def summarise(ratios: torch.Tensor) -> dict:
    """Counts, share of washed-out draws and median std / RMS of any tensor of ratios."""
    flat = ratios.flatten()
    out = int(washed_out(flat).sum())
    return {"draws": flat.numel(), "washed_out": out, "washed_out_share": round(out / flat.numel(), 4),
            "median_ratio": round(float(flat.median()), 4)}


def find_case(case_id: str, bundle: Path, scheme: LabelScheme) -> CaseRef:
    for name in DATASETS:
        try:
            return open_dataset(bundle / name, scheme).case(case_id)
        except KeyError:
            continue
    fail(f"case {case_id!r} is in neither {' nor '.join(DATASETS)} of {bundle}")


def mid_slices(label: np.ndarray) -> list[int]:
    """The middle of the slices (axis 0 of ``D x H x W``) holding any organ, and its neighbours
    at ``SLICE_OFFSETS``, kept inside the volume; ``label`` must hold some organ."""
    labelled = np.flatnonzero((label > 0).any(axis=(1, 2)))
    mid = (int(labelled[0]) + int(labelled[-1])) // 2
    return sorted({min(max(mid + o, 0), label.shape[0] - 1) for o in SLICE_OFFSETS})


def measure_case(ref: CaseRef, scheme: LabelScheme, gin: GIN, draws: int, seed: int) -> dict:
    """Both modes on one case: the slices used, the input's ratios and the draws' ratios."""
    image, label, affine = ref.read(scheme)
    configs = {mode: PreprocessConfig(spacing_mm=SPACING_MM, slice_size=SLICE_SIZE, intensity=mode) for mode in MODES}
    pre = {mode: preprocess(image, affine, ref.modality, cfg, label) for mode, cfg in configs.items()}
    if label is None or not pre["unit"].label.any():
        fail(f"case {ref.case_id!r} has no labelled slice")
    z = mid_slices(pre["unit"].label)
    body = torch.from_numpy(pre["unit"].image[z] > BODY_THRESHOLD[ref.modality])
    record = {"case": ref.case_id, "modality": ref.modality, "slices": z, "depth": pre["unit"].image.shape[0],
              "body_voxels": body.sum(dim=(1, 2)).tolist()}
    for mode in MODES:
        slices = torch.from_numpy(np.ascontiguousarray(pre[mode].image[z]))
        ratios = gin_ratios(gin, slices, body, draws, torch.Generator().manual_seed(seed))
        record[mode] = {"input_ratio": [round(float(r), 4) for r in std_rms_ratio(slices[:, None], body)],
                        **summarise(ratios), "per_slice": [summarise(row) for row in ratios], "ratios": ratios}
    return record


def markdown(result: dict, json_path: Path) -> str:
    setting, machine = result["setting"], result["machine"]
    lines = [
        "# GIN draws washed out on [0, 1] and on z-scored input",
        "",
        f"A draw is washed out when its std over the body is below {setting['washout_ratio']} x its RMS over the "
        f"body. {setting['body']} {setting['slices']} {setting['draws']}",
        "",
        "| modality | intensity | cases | draws | washed out | share | median std/RMS | input std/RMS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for modality, modes in result["results"].items():
        for mode, r in modes.items():
            lines.append(f"| {modality} | {mode} | {', '.join(r['cases'])} | {r['draws']} | {r['washed_out']} | "
                         f"**{100 * r['washed_out_share']:.1f}%** | {r['median_ratio']:.3f} | "
                         f"{min(r['input_ratio']):.3f}-{max(r['input_ratio']):.3f} |")
    lines += ["", "| case | modality | slices (0-based, of D) | body voxels | share unit | share zscore |",
              "|---|---|---|---|---|---|"]
    for c in result["cases"]:
        lines.append(f"| {c['case']} | {c['modality']} | {', '.join(map(str, c['slices']))} (of {c['depth']}) | "
                     f"{', '.join(map(str, c['body_voxels']))} | {100 * c['unit']['washed_out_share']:.1f}% | "
                     f"{100 * c['zscore']['washed_out_share']:.1f}% |")
    load = machine.get("load_average_1min")
    lines += [
        "",
        f"- Command: `{result['command']}`",
        f"- Date: {result['date']}",
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}"
        + (f", load average {load:.1f}" if load is not None else ""),
        f"- GIN: `{setting['gin']}`",
        f"- Full numbers (per slice): `{os.path.relpath(json_path, ROOT)}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="comma list of case ids of the bundle (CT or MRI)")
    parser.add_argument("--draws", type=int, default=100, help="GIN draws per slice")
    parser.add_argument("--seed", type=int, default=0, help="GIN generator seed")
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="the abdomen-ct-mr bundle")
    parser.add_argument("--out", type=Path, default=RESULTS / "gin_washout.json")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error("--draws must be at least 1")
    if not all((args.bundle / name / "dataset.json").is_file() for name in DATASETS):
        fail(f"real data bundle not found: {args.bundle} needs {DATASETS[0]}/ and {DATASETS[1]}/")

    scheme = get_scheme(SCHEME)
    gin = GIN(spatial_dims=2)
    refs = [find_case(c.strip(), args.bundle, scheme) for c in args.cases.split(",") if c.strip()]
    cases = [measure_case(ref, scheme, gin, args.draws, args.seed) for ref in refs]

    results: dict[str, dict] = {}
    for modality in MODALITIES:
        mine = [c for c in cases if c["modality"] == modality]
        if mine:
            results[modality] = {
                mode: {"cases": [c["case"] for c in mine],
                       "input_ratio": [r for c in mine for r in c[mode]["input_ratio"]],
                       **summarise(torch.cat([c[mode]["ratios"].flatten() for c in mine]))}
                for mode in MODES}
    for c in cases:
        for mode in MODES:
            del c[mode]["ratios"]

    offsets = ", ".join(f"{o:+d}" for o in SLICE_OFFSETS)
    result = {
        "command": command_line(argv, __file__),
        "date": now_iso(),
        "machine": machine_info(),
        "setting": {
            "bundle": os.path.relpath(args.bundle, ROOT),
            "scheme": SCHEME,
            "preprocess": f"PreprocessConfig(spacing_mm={SPACING_MM}, slice_size={SLICE_SIZE}, "
                          "intensity='unit' | 'zscore')",
            "washout_ratio": WASHOUT_RATIO,
            "body": "Body: voxels above BODY_THRESHOLD (CT > 0.0, MRI > 0.05) of the intensity='unit' "
                    "preprocessing, the same mask for both modes.",
            "slices": f"Slices: the middle of each case's labelled range (preprocessed axial slices with any "
                      f"organ) and offsets {offsets} from it.",
            "draws": f"{args.draws} GIN draws per slice, torch.Generator seeded {args.seed} per case and mode "
                     "(the same networks for both modes).",
            "gin": repr(gin),
            "seed": args.seed,
        },
        "results": results,
        "cases": cases,
    }
    write_result(args.out, result)
    write_text(args.out.with_suffix(".md"), markdown(result, args.out))
    return result


if __name__ == "__main__":
    main()
