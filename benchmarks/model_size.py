"""Choose the default U-Net size and quick-preset learning rate by measurement on 2 CPU cores.

Trains each (channels, lr) candidate with the fedgin trainer on phantom CT for the same number of
steps (no GIN, so only capacity and speed differ), then scores per-case 3D Dice on held-out phantom
CT cases. Reports slices/s and Dice per organ. Results: docs/results/model_size.json and .md.

    python benchmarks/model_size.py [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedgin.config import SiteSpec, resolve
from fedgin.data.labels import get_scheme
from fedgin.engine.inference import predict_preprocessed_labels, tile_of
from fedgin.engine.metrics import dice_score
from fedgin.engine.model import build_model
from fedgin.engine.runs import load_sites
from fedgin.engine.trainer import Trainer, seed_everything
from fedgin.synthetic import write_phantom_datasets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, provenance, write_result, write_text  # noqa: E402

CANDIDATES = [
    ((8, 16, 32, 64), 1e-3),
    ((16, 32, 64, 128), 5e-4),
    ((16, 32, 64, 128), 1e-3),
    ((16, 32, 64, 128), 2e-3),
    ((32, 64, 128, 256), 1e-3),
]


def score(model, cases, scheme) -> dict[str, float]:
    out = {}
    for organ, idx in scheme.label_ids.items():
        if idx == 0:
            continue
        vals = [dice_score(predict_preprocessed_labels(model, c.image, torch.device("cpu"), tile=tile_of(c)) == idx,
                           np.asarray(c.label) == idx)
                for c in cases]
        vals = [v for v in vals if v is not None]
        out[organ] = round(float(np.mean(vals)), 3) if vals else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(2)
    scheme = get_scheme("abdomen5")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ct, _ = write_phantom_datasets(Path(tmp) / "train", n_ct=10, n_mri=1, seed=11)
        test_ct, _ = write_phantom_datasets(Path(tmp) / "test", n_ct=4, n_mri=1, seed=12)
        base = resolve("quick", command="bench", out=tmp, cache_dir=str(Path(tmp) / "cache"),
                       sites=(SiteSpec("ct", str(ct)), SiteSpec("test", str(test_ct))),
                       train_overrides={"gin": False, "steps_per_epoch": args.steps, "validate": False})
        train_site, test_site = load_sites(base)
        test_cases = test_site.train + test_site.val
        for channels, lr in CANDIDATES:
            cfg = replace(base, model=replace(base.model, channels=channels), train=replace(base.train, lr=lr))
            seed_everything(0)
            model = build_model(cfg.model)
            trainer = Trainer(model, cfg.train, scheme, torch.device("cpu"), seed=0)
            start = time.perf_counter()
            trainer.fit(train_site.train, 1)
            seconds = time.perf_counter() - start
            dice = score(model, test_cases, scheme)
            vals = [v for v in dice.values() if v is not None]
            row = {"channels": list(channels), "lr": lr, "parameters": sum(p.numel() for p in model.parameters()),
                   "steps": args.steps, "train_seconds": round(seconds, 1),
                   "slices_per_s": round(args.steps * cfg.train.batch_size / seconds, 1),
                   "dice": dice, "mean_dice": round(float(np.mean(vals)), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {**provenance(),
              "setting": f"phantom CT, 10 training cases, {args.steps} steps of batch 8 at 128x128, no GIN; "
                         "test: 4 held-out phantom CT cases, per-case 3D Dice in preprocessed space",
              "rows": rows}
    write_result("model_size", result)
    lines = ["# Model size and quick-preset learning rate", "", f"`{result['command']}` on {result['date']}, "
             f"{result['machine']['cpu_count']} CPU cores. {result['setting']}.", "",
             "| channels | lr | parameters | slices/s | liver | kidneys | spleen | pancreas | gallbladder | mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["dice"]
        lines.append(f"| {'-'.join(map(str, r['channels']))} | {r['lr']:g} | {r['parameters']:,} | "
                     f"{r['slices_per_s']} | " + " | ".join(str(d[o]) for o in scheme.organs) + f" | {r['mean_dice']} |")
    write_text(RESULTS / "model_size.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
