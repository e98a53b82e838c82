"""How large the QA page gets: the bundle's own evaluation page, and a 50-case page of full-size CTs.

Two pages, each written by fedgin's own code path (:class:`fedgin.evaluation.qa.CaseRecorder`,
then :func:`fedgin.evaluation.qa.write_page`, as ``fedgin evaluate`` does after scoring):

- ``bundle``: every labelled case of the shared bundle (8 CT, 15 MRI) as it is, the reference as
  the prediction;
- ``full_size_ct``: ``--cases`` (50) CTs on a full-size grid, 512 x 512 x 400 voxels of 0.8 x 0.8
  x 1.0 mm, each one of the bundle's real CTs resampled onto that grid (trilinear; labels nearest)
  plus Gaussian noise of ``--noise`` HU (20: a 1-mm abdominal CT's), drawn anew per case, since
  the resampling smooths away the noise that makes a CT hard to compress.

For each: the page's size in MB, per case, how many voxels each case keeps (the share of
:func:`fedgin.evaluation.qa_views.case_voxels`), and what the scans would weigh stored losslessly
as before (zlib of row differences, in base64) against the WebP pictures now. Writes
``docs/results/qa_page_size.json`` (or ``--out``) with the command that produced it.

Usage: ``python benchmarks/qa_page_size.py [--cases 50] [--noise 20]``
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import zoom

from fedgin.data.labels import get_scheme
from fedgin.evaluation.qa import CaseRecorder, _page_case, webp_mosaic, write_page
from fedgin.evaluation.qa_views import case_voxels, read_views

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, provenance, write_result  # noqa: E402

BUNDLE = ROOT.parent / "shared" / "data" / "abdomen-ct-mr"
DATASETS = {"CT": BUNDLE / "Dataset801_AbdomenCT", "MRI": BUNDLE / "Dataset802_AbdomenMR"}
FULL_SHAPE, FULL_SPACING = (512, 512, 400), (0.8, 0.8, 1.0)
SCHEME = get_scheme("abdomen5")


def labelled_cases(root: Path) -> list[tuple[str, Path, Path]]:
    out = []
    for image in sorted((root / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        label = root / "labelsTr" / f"{case}.nii.gz"
        if label.exists():
            out.append((case, image, label))
    return out


def lossless_b64(image: np.ndarray) -> int:
    """The characters the scan took on the page before the WebP pictures (zlib of row deltas)."""
    delta = np.diff(image.astype(np.int16), axis=-1, prepend=0).astype(np.uint8)
    return len(base64.b64encode(zlib.compress(np.ascontiguousarray(delta).tobytes(), 6)))


def write_and_measure(name: str, cases, n_cases: int, folder: Path) -> dict:
    """``cases`` yields ``(case, modality, image, affine, labels)``; a page of them in ``folder``."""
    start = time.perf_counter()
    with CaseRecorder(folder, SCHEME, cases=n_cases) as recorder:
        for case, modality, image, affine, labels in cases:
            recorder.add(case, name, modality, image, affine, labels, labels)
    metas = [{**m, "shape": list(a["image"].shape), "has_ref": "ref" in a} for m, a in read_views(folder / "qa.npz")]
    page = write_page(folder / "qa.html", name, "evaluation", SCHEME, [["benchmark", name]],
                      [_page_case(None, m, i) for i, m in enumerate(metas)], folder / "qa.npz")
    seconds = time.perf_counter() - start
    webp = lossless = voxels = 0
    for _, arrays in read_views(folder / "qa.npz"):
        webp += len(webp_mosaic(arrays["image"])[0])
        lossless += lossless_b64(arrays["image"])
        voxels = max(voxels, arrays["image"].size)
    size = page.stat().st_size
    return {"cases": n_cases, "page_mb": round(size / 1e6, 2), "mb_per_case": round(size / 1e6 / n_cases, 3),
            "voxels_per_case_cap": case_voxels(n_cases), "largest_case_voxels": voxels,
            "scans_webp_mb": round(webp / 1e6, 2), "scans_lossless_zlib_mb": round(lossless / 1e6, 2),
            "lossless_over_webp": round(lossless / webp, 2), "seconds_with_making_the_cases": round(seconds, 1)}


def bundle_cases():
    for modality, root in DATASETS.items():
        for case, image_path, label_path in labelled_cases(root):
            image = nib.load(image_path)
            labels = np.asarray(nib.load(label_path).dataobj).astype(np.uint8)
            yield case, modality, np.asarray(image.dataobj), image.affine, labels


def full_size_cts(n: int, noise: float):
    """``n`` full-size CTs: the bundle's CTs in turn, resampled, with fresh noise each."""
    sources = labelled_cases(DATASETS["CT"])
    affine = np.diag([-FULL_SPACING[0], -FULL_SPACING[1], FULL_SPACING[2], 1.0])
    cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rng = np.random.default_rng(0)
    for i in range(n):
        k = i * len(sources) // n  # each source once, for n / 8 cases in a row
        if k not in cached:
            case, image_path, label_path = sources[k]
            image = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
            labels = np.asarray(nib.load(label_path).dataobj).astype(np.uint8)
            factors = [t / s for t, s in zip(FULL_SHAPE, image.shape)]
            big = zoom(image, factors, order=1, grid_mode=True, mode="nearest")[tuple(slice(0, t) for t in FULL_SHAPE)]
            big_labels = zoom(labels, factors, order=0, grid_mode=True, mode="nearest")[
                tuple(slice(0, t) for t in FULL_SHAPE)]
            cached = {k: (np.round(big).astype(np.int16), big_labels)}  # one source in memory at a time
        big, big_labels = cached[k]
        image = (big + rng.normal(0.0, noise, big.shape).astype(np.float32)).clip(-1024, 3071).astype(np.int16)
        yield f"full_{i:03d}_{sources[k][0]}", "CT", image, affine, big_labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50, help="full-size CTs on the second page")
    parser.add_argument("--noise", type=float, default=20.0, help="HU of the noise added to each")
    parser.add_argument("--out", type=Path, default=RESULTS / "qa_page_size.json")
    args = parser.parse_args(argv)
    result = {**provenance(), "full_size_grid": {"shape": FULL_SHAPE, "spacing_mm": FULL_SPACING,
                                                 "noise_hu": args.noise}}
    with tempfile.TemporaryDirectory() as tmp:
        n_bundle = sum(len(labelled_cases(root)) for root in DATASETS.values())
        result["bundle"] = write_and_measure("bundle", bundle_cases(), n_bundle, Path(tmp) / "bundle")
        print("bundle", result["bundle"], flush=True)
        result["full_size_ct"] = write_and_measure("full_size_ct", full_size_cts(args.cases, args.noise),
                                                   args.cases, Path(tmp) / "full")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
