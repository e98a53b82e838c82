"""What the preprocessing cache saves: loading every case of the shared real bundle cold (empty
cache: read NIfTI, map labels, preprocess, write the entry) against warm (entries on disk).

Setting: both datasets of ``../shared/data/abdomen-ct-mr`` (23 cases), scheme ``abdomen5``, the
quick preset's ``PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(128, 128))``, 2 torch threads.
``warm_s`` is a warm load as a new process sees it (file hashes recomputed, entries read);
``warm_in_process_s`` is a later epoch of the same process (hashes memoised). Each time is the
median over ``--repeats`` rounds; every cold round starts from a fresh temporary cache folder.
Writes ``docs/results/cache_gain.json`` and prints it.

Usage: ``python benchmarks/cache_gain.py [--repeats 3] [--data ../shared/data/abdomen-ct-mr]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedgin.data.cache import file_digest, load_case
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme
from fedgin.data.preprocess import PreprocessConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, provenance, write_result  # noqa: E402

DATASETS = ("Dataset801_AbdomenCT", "Dataset802_AbdomenMR")
CFG = PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(128, 128))
THREADS = 2


def _forget_hashes() -> None:
    """Empty the per-process file-hash memo, so a warm load pays hashing as a new process would."""
    file_digest.__defaults__[0].clear()


def _load_all(cases, scheme, cache_dir: Path) -> float:
    start = time.perf_counter()
    for case in cases:
        load_case(case, scheme, CFG, cache_dir)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "abdomen-ct-mr")
    parser.add_argument("--repeats", type=int, default=3, help="cold/warm rounds; the median is reported")
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_gain.json")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"shared data bundle not found at {args.data}")

    torch.set_num_threads(THREADS)
    scheme = get_scheme("abdomen5")
    cases = [c for name in DATASETS for c in open_dataset(args.data / name, scheme).cases]

    cold, warm, warm_memo, entry_bytes = [], [], [], 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="fedgin-cache-bench-") as tmp:
            _forget_hashes()
            cold.append(_load_all(cases, scheme, Path(tmp)))
            _forget_hashes()
            warm.append(_load_all(cases, scheme, Path(tmp)))
            warm_memo.append(_load_all(cases, scheme, Path(tmp)))
            entry_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*.npz"))
    cold_s, warm_s, memo_s = (statistics.median(t) for t in (cold, warm, warm_memo))
    input_bytes = sum(p.stat().st_size for c in cases for p in (c.image, c.label))

    result = {
        **provenance(),
        "setting": {
            "data": "shared bundle abdomen-ct-mr: " + ", ".join(DATASETS),
            "scheme": scheme.name,
            "preprocess": CFG.to_dict(),
            "timing": f"median over {args.repeats} rounds; cold rounds start from an empty cache folder",
        },
        "cases": len(cases),
        "input_mb": round(input_bytes / 1e6, 1),
        "cache_mb": round(entry_bytes / 1e6, 1),
        "cold_s": round(cold_s, 3),
        "warm_s": round(warm_s, 3),
        "warm_in_process_s": round(memo_s, 3),
        "speedup": round(cold_s / warm_s, 2),
        "speedup_in_process": round(cold_s / memo_s, 2),
        "rounds": {"cold_s": [round(t, 3) for t in cold], "warm_s": [round(t, 3) for t in warm],
                   "warm_in_process_s": [round(t, 3) for t in warm_memo]},
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
