"""Server-side bookkeeping of a federated run (plain Python): per-round global checkpoints,
one ``metrics.jsonl`` line per site per round, the post-processing plan decided from the sites'
validation Dice (``postprocess.json``), terminal progress, and the state to resume from."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..data.labels import get_scheme
from ..engine.checkpoint import load_raw, save_checkpoint
from ..engine.postprocess import PostprocessPlan, decide_plan, decision_record, write_decision
from ..engine.runs import MetricsLog
from .task import nan_weighted_mean, numpy_to_state

MODALITY_NAMES = {0: "CT", 1: "MRI"}
#: what a FedBN checkpoint's normalisation layers are (its ``meta["normalisation"]``)
FEDBN_NORMALISATION = "averaged"


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def privacy_words(record: dict) -> str:
    """A differential-privacy record of ``metrics.jsonl`` (``privacy``) in one line: the spent
    epsilon, the neighbouring relation it holds for, and where the noise came from."""
    insecure = "--dp-insecure-seeded-noise" in str(record.get("noise_source", ""))
    warning = "; NO PRIVACY: the noise was seeded (--dp-insecure-seeded-noise), any site can remove it" \
        if insecure else ""
    if record["epsilon"] is None:
        return (f"differential privacy: updates clipped to {record['clipping_norm']:g} ({record['mode']}-side), "
                f"no noise (--dp-noise 0): no privacy guarantee{warning}")
    relation = record.get("neighbouring", "add-or-remove-one site (fedgin before replace-one accounting)")
    sensitivity = f", sensitivity {record['sensitivity']:.4g} of the mean" if "sensitivity" in record else ""
    source = f"; noise from {record['noise_source']}" if "noise_source" in record and not insecure else ""
    return (f"differential privacy: epsilon {record['epsilon']:.4g} at delta {record['delta']:g} after "
            f"{record['releases']} round(s) ({relation}{sensitivity}; noise multiplier {record['noise_multiplier']:g}, "
            f"clip {record['clipping_norm']:g}, {record['mode']}-side clipping; Flower's RDP accountant{source}){warning}")


class RoundRecorder:
    """Collects what the strategy sees each round and writes it to the run dir."""

    def __init__(self, cfg: RunConfig, out: Path, log=print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.scheme = get_scheme(cfg.scheme)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.train: dict[int, dict] = {}
        self.evaluate: dict[int, dict] = {}
        self.failures: dict[int, list[str]] = {}
        self.privacy: dict[int, dict] = {}  # round -> the differential-privacy record after its release
        self.round_start = time.perf_counter()
        self.sites = [{"name": s.name, "modality": s.modality, "dataset": s.dataset} for s in cfg.sites]

    # --- resume ---------------------------------------------------------------------------
    def resume_point(self) -> tuple[int, dict[str, np.ndarray] | None, dict]:
        """(last completed round, its global arrays, strategy state) or (0, None, {})."""
        last = self.out / "checkpoints" / "last.pt"
        if not last.exists():
            return 0, None, {}
        payload = load_raw(last)
        done = int(payload["meta"]["round"])
        arrays = {k: v.numpy() for k, v in payload["state_dict"].items()}
        self.metrics.truncate_after("round", done)
        return done, arrays, dict(payload["extra"].get("strategy_state", {}))

    # --- per round ------------------------------------------------------------------------
    def site_name(self, index: int) -> str:
        return self.cfg.sites[index].name if 0 <= index < len(self.cfg.sites) else f"site{index}"

    def record_train(self, server_round: int, replies: list[dict], failures: list[str]) -> None:
        self.train[server_round] = {int(r["site-index"]): r for r in replies}
        self.failures[server_round] = failures
        for failure in failures:
            self.log(f"round {server_round}: a site failed and was left out of this round: {failure}")

    def record_privacy(self, server_round: int, record: dict) -> None:
        self.privacy[server_round] = record

    def privacy_line(self, server_round: int) -> str | None:
        """The spent (epsilon, delta) after ``server_round``, in words; None without DP."""
        released = [r for r in self.privacy if r <= server_round]
        if not released:
            return None
        return privacy_words(self.privacy[max(released)])

    def record_evaluate(self, server_round: int, replies: list[dict]) -> None:
        self.evaluate[server_round] = {int(r["site-index"]): r for r in replies}

    def finish_round(self, server_round: int, arrays: dict[str, np.ndarray], reference: dict[str, torch.Tensor],
                     strategy_state: dict) -> Path:
        """Write the round's metrics lines and its global checkpoint (then ``last.pt``)."""
        train = self.train.get(server_round, {})
        evaluate = self.evaluate.get(server_round, {})
        for index in sorted(set(train) | set(evaluate)):
            t, e = train.get(index, {}), evaluate.get(index, {})
            modality = MODALITY_NAMES.get(int(t.get("modality", e.get("modality", -1))), "?")
            self.metrics.write(
                round=server_round,
                site=self.site_name(index),
                modality=modality,
                loss=_clean(t.get("loss")),
                dice={o: _clean(e.get(f"dice-{o}")) for o in self.scheme.organs} if e else None,
                dice_pp={o: _clean(e.get(f"dice-pp-{o}")) for o in self.scheme.organs} if e else None,
                local_dice={o: _clean(t.get(f"dice-{o}")) for o in self.scheme.organs} if t else None,
                seconds=_clean(t.get("seconds")),
                lr=_clean(t.get("lr")),
                num_examples=int(t["num-examples"]) if t else None,
                trained=bool(t),
                **({"privacy": self.privacy[server_round]} if server_round in self.privacy else {}),
                # FedBN: the global weights with this site's own normalisation layers (the model the
                # site keeps; not the checkpoint, whose Dice is `dice`)
                **({"dice_own_norm": {o: _clean(e.get(f"dice-own-norm-{o}")) for o in self.scheme.organs}}
                   if any(k.startswith("dice-own-norm-") for k in e) else {}),
            )
        state = numpy_to_state(arrays, reference)
        plan, decision = self.decide_postprocessing(server_round)
        meta = {"mode": "federated", "round": server_round, "strategy": self.cfg.strategy, "seed": self.cfg.seed,
                "split": self.cfg.split, "label_map": self.cfg.label_map,
                "gin": self.cfg.train.gin, "sites_replied": len(train), "time": time.time(),
                "postprocess": decision, "privacy": self.privacy.get(server_round)}
        if self.cfg.strategy == "fedbn":
            meta["normalisation"] = FEDBN_NORMALISATION
        # written before the checkpoints: a round whose checkpoint exists has its decision
        write_decision(self.out / "postprocess.json", decision)
        kwargs = dict(model_config=self.cfg.model, scheme=self.scheme, preprocess=self.cfg.preprocess,
                      sites=self.sites, meta=meta, extra={"strategy_state": strategy_state}, postprocess=plan)
        path = save_checkpoint(self.out / "checkpoints" / f"round_{server_round:03d}.pt", state, **kwargs)
        save_checkpoint(self.out / "checkpoints" / "last.pt", state, **kwargs)
        self._progress(server_round, train, evaluate)
        if server_round == self.cfg.rounds:
            self.log(f"post-processing decided on the sites' validation cases: {plan.describe()}")
            line = self.privacy_line(server_round)
            if line:
                self.log(line)
        return path

    def decide_postprocessing(self, server_round: int) -> tuple[PostprocessPlan, dict]:
        """The plan for this round's global model, from its evaluate replies only (so a resumed run
        decides the same): per organ the sites' validation Dice without and with the candidate
        post-processing, weighted by their validation cases over the sites that have a value."""
        evaluate = self.evaluate.get(server_round, {})
        names = {self.site_name(i): int(e.get("num-examples", 0)) for i, e in sorted(evaluate.items())}
        context = {"round": server_round, "evaluate_sites": names}
        if not self.cfg.postprocess:
            return PostprocessPlan(), decision_record(self.scheme, PostprocessPlan(), None, None, **context,
                                                      note="post-processing off (--no-postprocess)")
        replies = [evaluate[i] for i in sorted(evaluate)]
        weights = [float(r.get("num-examples", 0)) for r in replies]
        nan = float("nan")
        plain = {o: _clean(nan_weighted_mean([float(r.get(f"dice-{o}", nan)) for r in replies], weights))
                 for o in self.scheme.organs}
        pp = {o: _clean(nan_weighted_mean([float(r.get(f"dice-pp-{o}", nan)) for r in replies], weights))
              for o in self.scheme.organs}
        plan = decide_plan(plain, pp, self.scheme)
        note = None if any(v is not None for v in plain.values()) else \
            "no validation Dice from any site this round: no post-processing"
        return plan, decision_record(self.scheme, plan, plain, pp, **context, note=note)

    def _progress(self, server_round: int, train: dict, evaluate: dict) -> None:
        seconds = time.perf_counter() - self.round_start
        self.round_start = time.perf_counter()
        parts = []
        for index in sorted(set(train) | set(evaluate)):
            e = evaluate.get(index, {})
            vals = [e.get(f"dice-{o}") for o in self.scheme.organs]
            vals = [v for v in vals if v is not None and not math.isnan(v)]
            dice = f"{np.mean(vals):.3f}" if vals else "-"
            loss = train.get(index, {}).get("loss")
            loss_text = f"{loss:.3f}" if loss is not None else "failed"
            parts.append(f"{self.site_name(index)}: loss {loss_text} val Dice {dice}")
        self.log(f"round {server_round}/{self.cfg.rounds} ({seconds:.0f}s) " + "; ".join(parts))
