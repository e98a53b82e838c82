"""Time and peak memory of the ``fedgin predict`` path for one volume, each run in a fresh process.

The path timed is ``fedgin.evaluation.prediction.predict``: load the checkpoint, read the NIfTI, preprocess
(RAS, 2.5 mm in-plane, 128 x 128), slice-wise inference, probabilities back onto the input grid,
write the uint8 label map, ``labels.json`` and ``provenance.json``. The model is the quick preset's
U-Net (16-32-64-128, 6 classes) with random weights (timing does not depend on training), saved
with ``fedgin.engine.checkpoint.save_checkpoint``. 2 torch threads, CPU.

Volumes: one CHAOS T2 MRI (``chaos_t2_20``) and one BTCV CT (``btcv_sabs_18``) of the shared bundle
when it is present, and a phantom CT and MRI volume (seed 0) always, so the benchmark runs without
the bundle. ``--large`` adds a clinical-size synthetic CT, 512 x 512 x 600 voxels of 0.8 x 0.8 x
1.5 mm (an elliptic body of soft tissue with a liver-like and two kidney-like blobs in air, int16,
``.nii.gz``), measured once per repeat like the others; its goals are a peak RSS of at
most 2.5 GB and at most 60 s.

Each measurement runs in its own ``python`` process: after the imports and a small warm-up
inference (first-call costs of torch), the child records ``ru_maxrss``, times ``predict(...)`` and
reports the wall time and the peak-RSS increase during the call (``peak_rss_delta_mb``) and the
absolute peak (``peak_rss_mb``). The median over ``--repeats`` processes is reported.
Writes ``docs/results/predict_speed.json`` and prints it.

Usage: ``python benchmarks/predict_speed.py [--repeats 3] [--data ../shared/data/abdomen-ct-mr] [--large]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, provenance, write_result  # noqa: E402

GOAL_S = 3.0
LARGE = "synthetic 512x512x600 (CT)"
LARGE_GOALS = {"peak_rss_mb": 2.5 * 1024, "seconds": 60.0}
THREADS = 2
REAL = {
    "chaos_t2_20 (MRI)": ("Dataset802_AbdomenMR/imagesTr/chaos_t2_20_0000.nii.gz", "MRI"),
    "btcv_sabs_18 (CT)": ("Dataset801_AbdomenCT/imagesTr/btcv_sabs_18_0000.nii.gz", "CT"),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(volume: str, model: str, modality: str) -> None:
    """One measurement (run in a fresh process); prints a JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(THREADS)
    from fedgin.engine.checkpoint import load_checkpoint
    from fedgin.evaluation.prediction import predict

    # first-call costs (kernel selection, allocator) once, on a tiny input, outside the timing
    net = load_checkpoint(model).build("cpu")
    with torch.no_grad():
        net(torch.zeros(1, 1, 128, 128))
    del net
    before = _rss_mb()
    with tempfile.TemporaryDirectory(prefix="fedgin-predict-bench-") as out:
        start = time.perf_counter()
        predict(volume, out, model, modality=modality, device="cpu", log=lambda *_: None)
        seconds = time.perf_counter() - start
    peak = _rss_mb()
    import nibabel as nib

    shape = list(nib.load(volume).shape)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "peak_rss_delta_mb": peak - before,
                      "shape": shape, "threads": torch.get_num_threads(), "numpy": np.__version__}))


def make_model(path: Path) -> Path:
    import torch

    from fedgin.config import resolve
    from fedgin.data.labels import get_scheme
    from fedgin.engine.checkpoint import save_checkpoint
    from fedgin.engine.model import build_model

    cfg = resolve("quick", command="bench", out=str(path.parent), sites=())
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    return save_checkpoint(path, state, model_config=cfg.model, scheme=get_scheme(cfg.scheme),
                           preprocess=cfg.preprocess, sites=[], meta={"note": "random weights, timing only"})


def make_phantoms(folder: Path) -> dict[str, tuple[str, str]]:
    from fedgin.synthetic import write_phantom_datasets

    ct, mri = write_phantom_datasets(folder, 1, 1, seed=0)
    return {
        "phantom_ct_000 (CT)": (str(ct / "imagesTr" / "phantom_ct_000_0000.nii.gz"), "CT"),
        "phantom_mr_000 (MRI)": (str(mri / "imagesTr" / "phantom_mr_000_0000.nii.gz"), "MRI"),
    }


def make_large_ct(path: Path) -> Path:
    """A 512 x 512 x 600 int16 CT at 0.8 x 0.8 x 1.5 mm: air, an elliptic body, three organ blobs."""
    import numpy as np

    from fedgin.data.nifti import write_volume

    shape, spacing = (512, 512, 600), (0.8, 0.8, 1.5)
    x, y = np.meshgrid(np.arange(shape[0]) - 256.0, np.arange(shape[1]) - 256.0, indexing="ij")
    body = (x / 220.0) ** 2 + (y / 160.0) ** 2 <= 1.0
    liver = ((x + 80.0) / 90.0) ** 2 + ((y + 20.0) / 70.0) ** 2 <= 1.0
    kidneys = (((np.abs(x) - 90.0) / 30.0) ** 2 + ((y - 80.0) / 45.0) ** 2) <= 1.0
    plane = np.full(shape[:2], -1000, np.int16)
    plane[body] = 40
    plane[liver] = 60
    plane[kidneys] = 150
    volume = np.empty(shape, np.int16)
    rng = np.random.default_rng(0)
    for z in range(shape[2]):
        volume[:, :, z] = plane + rng.integers(-20, 21, size=shape[:2], dtype=np.int16) * body
    return write_volume(path, volume, np.diag([*spacing, 1.0]), dtype=np.int16)


def measure(volume: str, model: Path, modality: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--child", volume, str(model), modality],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed on {volume}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "abdomen-ct-mr")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per volume; median reported")
    parser.add_argument("--out", type=Path, default=RESULTS / "predict_speed.json")
    parser.add_argument("--large", action="store_true", help="also a synthetic 512 x 512 x 600 CT")
    parser.add_argument("--child", nargs=3, metavar=("VOLUME", "MODEL", "MODALITY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}

    with tempfile.TemporaryDirectory(prefix="fedgin-predict-bench-") as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "quick-random.pt")
        volumes = {}
        if args.data.is_dir():
            volumes.update({name: (str(args.data / rel), mod) for name, (rel, mod) in REAL.items()})
        volumes.update(make_phantoms(tmp / "phantoms"))
        if args.large:
            volumes[LARGE] = (str(make_large_ct(tmp / "large_ct.nii.gz")), "CT")
        runs: dict[str, list[dict]] = {name: [] for name in volumes}
        for _ in range(args.repeats):  # interleaved: load from other processes hits every volume alike
            for name, (volume, modality) in volumes.items():
                runs[name].append(measure(volume, model, modality))

    results = {}
    for name, rows in runs.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        results[name] = {
            "file": (os.path.relpath(volumes[name][0], ROOT) if name in REAL else
                     "synthetic, written by the benchmark" if name == LARGE else "phantom (seed 0)"),
            "modality": volumes[name][1],
            "shape": rows[0]["shape"],
            "seconds": round(seconds, 3),
            "seconds_runs": [round(r["seconds"], 3) for r in rows],
            "peak_rss_delta_mb": round(statistics.median(r["peak_rss_delta_mb"] for r in rows), 1),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rows), 1),
            "meets_goal": seconds <= GOAL_S,
        }
        if name == LARGE:
            results[name]["goals"] = LARGE_GOALS
            results[name]["meets_goal"] = (results[name]["peak_rss_mb"] <= LARGE_GOALS["peak_rss_mb"]
                                           and seconds <= LARGE_GOALS["seconds"])
    result = {
        **provenance(threads=THREADS),
        "setting": {
            "path": "fedgin.evaluation.prediction.predict(volume, out, model, modality=...): checkpoint load, "
                    "NIfTI read, preprocess, slice-wise inference (batch 32), back to the input grid, write",
            "model": "quick preset U-Net (16-32-64-128, 6 classes), random weights",
            "memory": "ru_maxrss of a fresh process: peak during predict minus the level before it "
                      "(after imports and a one-slice warm-up)",
            "timing": f"median over {args.repeats} fresh processes per volume",
            "shared_data": args.data.is_dir(),
        },
        "goal_seconds": GOAL_S,
        "volumes": results,
        "meets_goal": all(r["meets_goal"] for r in results.values()),
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
