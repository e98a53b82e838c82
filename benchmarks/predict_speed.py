"""Time and peak memory of the ``fedgin predict`` path for one volume, each run in a fresh process.

The path timed is ``fedgin.evaluation.prediction.predict``: load the checkpoint, read the NIfTI, preprocess
(RAS, 2.5 mm in-plane, 128 x 128), slice-wise inference, probabilities back onto the input grid,
write the uint8 label map, ``labels.json`` and ``provenance.json``. The model is the quick preset's
U-Net (16-32-64-128, 6 classes) with random weights (timing does not depend on training), saved
with ``fedgin.engine.checkpoint.save_checkpoint``. 2 torch threads, CPU.

Volumes: one CHAOS T2 MRI (``chaos_t2_20``) and one BTCV CT (``btcv_sabs_18``) of the shared bundle
when it is present, and a phantom CT and MRI volume (seed 0) always, so the benchmark runs without
the bundle.

Each measurement runs in its own ``python`` process: after the imports and a small warm-up
inference (first-call costs of torch), the child records ``ru_maxrss``, times ``predict(...)`` and
reports the wall time and the peak-RSS increase during the call (``peak_rss_delta_mb``) and the
absolute peak (``peak_rss_mb``). The median over ``--repeats`` processes is reported.
Writes ``docs/results/predict_speed.json`` and prints it.

Usage: ``python benchmarks/predict_speed.py [--repeats 3] [--data ../shared/data/abdomen-ct-mr]``
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
        runs: dict[str, list[dict]] = {name: [] for name in volumes}
        for _ in range(args.repeats):  # interleaved: load from other processes hits every volume alike
            for name, (volume, modality) in volumes.items():
                runs[name].append(measure(volume, model, modality))

    results = {}
    for name, rows in runs.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        results[name] = {
            "file": os.path.relpath(volumes[name][0], ROOT) if name in REAL else "phantom (seed 0)",
            "modality": volumes[name][1],
            "shape": rows[0]["shape"],
            "seconds": round(seconds, 3),
            "seconds_runs": [round(r["seconds"], 3) for r in rows],
            "peak_rss_delta_mb": round(statistics.median(r["peak_rss_delta_mb"] for r in rows), 1),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rows), 1),
            "meets_goal": seconds <= GOAL_S,
        }
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
