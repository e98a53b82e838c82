"""``fedgin demo``: the embedded default, end to end on synthetic data in a few minutes on 2 CPU cores.

Phantom CT site + phantom MRI site -> check -> FedGIN on Flower -> test-set evaluation -> report.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import SiteSpec, resolve
from ..data.check import check_datasets
from ..data.labels import get_scheme
from ..errors import FedginError
from ..evaluation.scoring import evaluate
from .run_report import write_run_report

DEMO_ROUNDS = 10


def run_demo(out: Path, *, seed: int = 0, rounds: int | None = None, log=print) -> Path:
    """Run the demo into ``out``: ``data/``, ``run/``, ``eval/summary.json``, ``report.md``."""
    from ..federated.launcher import federate
    from ..synthetic import write_phantom_datasets

    start = time.perf_counter()
    out = Path(out)
    if (out / "run" / "config.json").exists():
        raise FedginError(f"{out}: a demo already ran here; remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    log("1/4 writing synthetic phantom sites: 8 CT and 8 MRI cases (T2-like contrast, bias field, "
        "coarser slices, another orientation) ...")
    ct, mri = write_phantom_datasets(out / "data", n_ct=8, n_mri=8, seed=seed)
    scheme = get_scheme("abdomen5")
    rows, errors = check_datasets([str(ct), str(mri)], scheme)
    if errors:
        raise FedginError(f"phantom data failed its check: {errors[0]}")
    log(f"    checked {len(rows)} cases: all readable and mapped")
    log("2/4 federated training with GIN on Flower's simulation engine (one SuperNode per site) ...")
    cfg = resolve("quick", command="demo", out=str(out / "run"),
                  sites=(SiteSpec("ct-hospital", str(ct)), SiteSpec("mri-hospital", str(mri))),
                  train_overrides={"gin": True, "steps_per_epoch": 100}, seed=seed,
                  cache_dir=str(out / "cache"), rounds=rounds or DEMO_ROUNDS, local_epochs=1)
    federate(cfg, log=log)
    log("3/4 evaluating the global model on the held-out test cases of both sites ...")
    summary = evaluate(str(out / "run"), [str(ct), str(mri)], str(out / "eval"), seed=seed,
                       cache_dir=str(out / "cache"), qa=True)
    log("4/4 writing the report ...")
    minutes = (time.perf_counter() - start) / 60
    notes = [f"Synthetic demo: one CT site and one MRI site (phantoms), FedGIN (FedAvg + GIN) on Flower, "
             f"{cfg.rounds} rounds; total {minutes:.1f} min.", ""]
    report = write_run_report(out / "run", out / "eval", out / "report.md", title="fedgin demo", notes=notes)
    for modality, stats in summary["by_modality"].items():
        if modality != "all" and stats["mean_dice"] is not None:
            log(f"    {modality}: mean test Dice {stats['mean_dice']:.3f} ({stats['cases']} cases)")
    log(f"done in {minutes:.1f} min: {report} (and the QA page {out / 'eval' / 'qa.html'})")
    return report
