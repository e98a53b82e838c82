"""Issue 22's goals, checked on the cross-validated grid's record (``docs/results/cv3``, written by
``benchmarks/cv_grid.py``) and the default-budget measurement (``docs/results/default_budget.json``).

Every comparison of two methods is *paired*: it pools only the folds where both runs are finished,
so a partial grid never compares one method's patients with another's. Dice is the mean over
liver, kidneys and spleen of each organ's mean over the pooled test patients (the experiment
report's ``mean``); the per-fold differences show whether a gap holds fold by fold.

Usage::

    python benchmarks/cv_goals.py            # writes docs/results/cv3_goals.{json,md}
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, now_iso  # noqa: E402

ORGANS = ("liver", "kidneys", "spleen")
MODALITIES = ("CT", "MRI")
#: the default ``federate`` model's robustness goal: no organ below this Dice in more than 5% of cases
FAIL_DICE, FAIL_SHARE = 0.7, 0.05


def read_runs(record: Path) -> dict[tuple[str, str], dict[int, list[dict]]]:
    """(scenario, method) -> fold -> the finished run's per-case rows of ``ORGANS`` with a Dice."""
    runs: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for path in sorted(record.glob("folds/fold*/runs/*/*/seed0/eval/metrics.csv")):
        run = path.parents[2]
        fold = int(run.parents[2].name.removeprefix("fold"))
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r["organ"] in ORGANS and r["dice"] != ""]
        runs.setdefault((run.parents[0].name, run.name), {})[fold] = \
            [{**r, "dice": float(r["dice"]), "fold": fold} for r in rows]
    return runs


def mean_dice(rows: list[dict], modality: str) -> float | None:
    """Mean over ``ORGANS`` of each organ's mean Dice over the rows of ``modality``."""
    means = []
    for organ in ORGANS:
        values = [r["dice"] for r in rows if r["modality"] == modality and r["organ"] == organ]
        if values:
            means.append(sum(values) / len(values))
    return sum(means) / len(means) if means else None


def paired(runs: dict, a: tuple[str, str], b: tuple[str, str], modality: str) -> dict:
    """Method ``a`` against ``b`` (each a (scenario, method)) on the folds both finished."""
    folds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    if not folds:
        return {"folds": [], "a": None, "b": None, "per_fold": {}}
    rows_a = [r for f in folds for r in runs[a][f]]
    rows_b = [r for f in folds for r in runs[b][f]]
    per_fold = {}
    for f in folds:
        da, db = mean_dice(runs[a][f], modality), mean_dice(runs[b][f], modality)
        per_fold[f] = None if da is None or db is None else round(da - db, 4)
    return {"folds": folds, "a": mean_dice(rows_a, modality), "b": mean_dice(rows_b, modality),
            "per_fold": per_fold, "pairs": case_pairs(rows_a, rows_b, modality)}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the chance of a split at least this uneven if either side were as
    likely to win each pair (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def case_pairs(rows_a: list[dict], rows_b: list[dict], modality: str) -> dict:
    """The same patient's same organ scored by both runs: how often ``a`` is better, worse, equal
    (within 0.001 Dice), and the sign test's p on that split."""
    def keyed(rows):
        return {(r["fold"], r["case"], r["organ"]): r["dice"] for r in rows if r["modality"] == modality}
    da, db = keyed(rows_a), keyed(rows_b)
    diffs = [da[k] - db[k] for k in sorted(set(da) & set(db))]
    wins, losses = sum(d > 1e-3 for d in diffs), sum(d < -1e-3 for d in diffs)
    return {"wins": wins, "losses": losses, "ties": len(diffs) - wins - losses,
            "p": round(sign_test(wins, losses), 4)}


def _goal(name: str, comparison: dict, value: float | None, target: str, met: bool | None) -> dict:
    return {"goal": name, "target": target, "value": None if value is None else round(value, 4),
            "met": met, **{k: comparison[k] for k in ("folds", "per_fold", "pairs") if k in comparison},
            **({"a": round(comparison["a"], 4), "b": round(comparison["b"], 4)}
               if comparison.get("a") is not None and comparison.get("b") is not None else {})}


def difference_goal(runs, name, a, b, modality, at_least: float) -> dict:
    c = paired(runs, a, b, modality)
    value = None if c["a"] is None or c["b"] is None else c["a"] - c["b"]
    return _goal(name, c, value, f">= {at_least:+.2f}", None if value is None else value >= at_least)


def ratio_goal(runs, name, a, b, modality, at_least: float) -> dict:
    c = paired(runs, a, b, modality)
    value = None if not c["a"] or not c["b"] else c["a"] / c["b"]
    return _goal(name, c, value, f">= {at_least:.2f}x", None if value is None else value >= at_least)


def level_goal(runs, name, run, modality, at_least: float) -> dict:
    folds = sorted(runs.get(run, {}))
    value = mean_dice([r for f in folds for r in runs[run][f]], modality) if folds else None
    return _goal(name, {"folds": folds}, value, f">= {at_least:.2f}", None if value is None else value >= at_least)


def reported(goal: dict) -> dict:
    """A comparison shown beside the goals, with no target of its own."""
    return {**goal, "target": "(reported)", "met": None, "reported": True}


def failure_goal(runs, run, name: str) -> dict:
    """The largest share, over organs and modalities, of cases with Dice below ``FAIL_DICE``."""
    folds = sorted(runs.get(run, {}))
    rows = [r for f in folds for r in runs[run][f]] if folds else []
    shares = {}
    for modality in MODALITIES:
        for organ in ORGANS:
            values = [r["dice"] for r in rows if r["modality"] == modality and r["organ"] == organ]
            if values:
                shares[f"{modality} {organ}"] = {"below": sum(v < FAIL_DICE for v in values), "cases": len(values)}
    worst = max((s["below"] / s["cases"] for s in shares.values()), default=None)
    goal = _goal(f"{name}: no organ below Dice {FAIL_DICE} in more than {FAIL_SHARE:.0%} of cases",
                 {"folds": folds}, worst, f"<= {FAIL_SHARE:.2f}", None if worst is None else worst <= FAIL_SHARE)
    goal["shares"] = shares
    return goal


#: FedGIN with random field-of-view windows (fedgin.augment.RandomField), and FedAvg with them; FedGIN
#: with them is what `fedgin federate` trains by default (the `standard` preset's fov_p = 0.5)
FOV, FOV_FEDAVG = "fedgin+fov", "fedavg+fov"
#: the grid's FedGIN, trained on whole fields: the default model until the windows became the preset's
GRID_DEFAULT = "default model before the windows"


def fov_goals(runs: dict) -> list[dict]:
    """The windows' effect (FedGIN with them against without, on the same patients) and issue 22's
    goals for FedGIN with them: against FedAvg with them (the same augmentation), level and failures."""
    c = "complete"
    out = [reported(difference_goal(runs, f"windows: {FOV} {m} - fedgin {m}", (c, FOV), (c, "fedgin"), m, 0.0))
           for m in MODALITIES]
    out += [difference_goal(runs, f"complete, with windows: {FOV} MRI - {FOV_FEDAVG} MRI", (c, FOV), (c, FOV_FEDAVG),
                            "MRI", 0.01),
            difference_goal(runs, f"complete, with windows: {FOV} CT - {FOV_FEDAVG} CT", (c, FOV), (c, FOV_FEDAVG),
                            "CT", -0.01),
            level_goal(runs, f"default model (complete, {FOV}) on MRI", (c, FOV), "MRI", 0.90),
            level_goal(runs, f"default model (complete, {FOV}) on CT", (c, FOV), "CT", 0.90),
            failure_goal(runs, (c, FOV), f"default model ({FOV})")]
    return out


def goals(runs: dict, budget: dict | None) -> list[dict]:
    c, lim = "complete", "limited-1to5"
    out = [
        difference_goal(runs, "complete: FedGIN MRI - FedAvg MRI", (c, "fedgin"), (c, "fedavg"), "MRI", 0.01),
        ratio_goal(runs, "complete: FedGIN MRI / centralized MRI", (c, "fedgin"), (c, "centralized"), "MRI", 0.97),
        difference_goal(runs, "complete: FedGIN CT - FedAvg CT", (c, "fedgin"), (c, "fedavg"), "CT", -0.01),
        difference_goal(runs, "limited-1to5: FedGIN MRI - FedAvg MRI", (lim, "fedgin"), (lim, "fedavg"), "MRI", 0.15),
        difference_goal(runs, "limited-1to5: FedGIN CT - FedAvg CT", (lim, "fedgin"), (lim, "fedavg"), "CT", -0.02),
        level_goal(runs, "CT-only model with GIN, zero-shot on MRI", (c, "local-ct+gin"), "MRI", 0.60),
        difference_goal(runs, "CT-only model: GIN's in-domain cost (local-ct+gin CT - local-ct CT)",
                        (c, "local-ct+gin"), (c, "local-ct"), "CT", -0.02),
        level_goal(runs, "CT-only model with GIN + IPA on every slice (local-ct+ipa-p100), zero-shot on MRI",
                   (c, "local-ct+ipa-p100"), "MRI", 0.60),
        difference_goal(runs, "CT-only model with GIN + IPA on every slice: in-domain cost (its CT - local-ct CT)",
                        (c, "local-ct+ipa-p100"), (c, "local-ct"), "CT", -0.02),
        level_goal(runs, f"{GRID_DEFAULT} (complete, fedgin) on MRI", (c, "fedgin"), "MRI", 0.90),
        level_goal(runs, f"{GRID_DEFAULT} (complete, fedgin) on CT", (c, "fedgin"), "CT", 0.90),
        failure_goal(runs, (c, "fedgin"), GRID_DEFAULT),
    ]
    if (c, FOV) in runs:
        out += fov_goals(runs)
    seconds = (budget or {}).get("methods", {}).get("fedgin", {}).get("federate_seconds")
    out.append({"goal": "`fedgin federate` on the bundle (default recipe), minutes on 2 cores", "target": "<= 20",
                "value": None if seconds is None else round(seconds / 60, 1),
                "met": None if seconds is None else seconds <= 20 * 60,
                "source": "docs/results/default_budget.json"})
    return out


#: the order of the grid's methods in the table (others follow, sorted)
METHOD_ORDER = ("local-ct", "local-ct+gin", "local-ct+ipa-p100", "local-mri", "centralized", "fedavg", "fedgin",
                "fedavg+fov", "fedgin+fov")


def method_table(runs: dict) -> list[dict]:
    """One row per (scenario, method): per fold and pooled over its finished folds, the mean Dice
    per modality and the organ-cases below ``FAIL_DICE``."""
    def order(key):
        scenario, method = key
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return (scenario != "complete", scenario, rank, method)
    rows = []
    for key in sorted(runs, key=order):
        folds = runs[key]
        def cell(case_rows, modality):
            values = [r["dice"] for r in case_rows if r["modality"] == modality]
            dice = mean_dice(case_rows, modality)
            return {"dice": None if dice is None else round(dice, 4), "below": sum(v < FAIL_DICE for v in values),
                    "organ_cases": len(values)}
        pooled = [r for f in sorted(folds) for r in folds[f]]
        rows.append({"scenario": key[0], "method": key[1], "folds": sorted(folds),
                     "per_fold": {f: {m: cell(folds[f], m) for m in MODALITIES} for f in sorted(folds)},
                     "pooled": {m: cell(pooled, m) for m in MODALITIES}})
    return rows


#: the methods that train on each modality: a patient they all miss is hard for the data, not the method
IN_DOMAIN = {"CT": ("local-ct", "local-ct+gin", "local-ct+ipa-p100", "centralized", "fedavg", "fedgin",
                    "fedavg+fov", "fedgin+fov"),
             "MRI": ("local-mri", "centralized", "fedavg", "fedgin", "fedavg+fov", "fedgin+fov")}


def patient_table(runs: dict, scenario: str = "complete") -> list[dict]:
    """One row per test patient of ``scenario``: its fold, modality, each method's mean Dice over the
    patient's organs of ``ORGANS``, and the organs that every finished in-domain method (``IN_DOMAIN``)
    scores below ``FAIL_DICE`` on it."""
    per_case: dict[tuple[int, str, str], dict[str, dict[str, float]]] = {}
    for (scen, method), folds in runs.items():
        if scen != scenario:
            continue
        for fold, rows in folds.items():
            for r in rows:
                per_case.setdefault((fold, r["modality"], r["case"]), {}).setdefault(method, {})[r["organ"]] = r["dice"]
    table = []
    for (fold, modality, case), methods in sorted(per_case.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        in_domain = [m for m in IN_DOMAIN[modality] if m in methods]
        organs = [o for o in ORGANS if any(o in methods[m] for m in methods)]
        missed = [o for o in organs if in_domain and all(methods[m].get(o, 1.0) < FAIL_DICE for m in in_domain)]
        table.append({"case": case, "fold": fold, "modality": modality,
                      "dice": {m: round(sum(d.values()) / len(d), 4) for m, d in methods.items()},
                      "missed_by_every_in_domain_method": missed})
    return table


def without_hard_patients(runs: dict, run: tuple[str, str], table: list[dict]) -> dict:
    """``run``'s pooled Dice per modality leaving out the patients of ``table`` that every in-domain
    method misses on some organ (a diagnosis on test patients, not a result to report alone)."""
    hard = {(r["fold"], r["case"]) for r in table if r["missed_by_every_in_domain_method"]}
    rows = [r for f in sorted(runs.get(run, {})) for r in runs[run][f] if (f, r["case"]) not in hard]
    return {"left_out": sorted(c for _, c in hard),
            **{m: None if (d := mean_dice(rows, m)) is None else round(d, 4) for m in MODALITIES}}


def _cell(value) -> str:
    return "–" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def markdown(result: dict) -> str:
    lines = ["# Issue 22's goals on the cross-validated grid", "",
             f"`{result['command']}` ({result['date']}); record: `{result['record']}`. Finished runs: "
             f"{result['finished_runs']}. A comparison pools only the folds where both of its runs are finished "
             "(column *folds*); Dice: mean over liver, kidneys, spleen of each organ's mean over the test patients.",
             "", "Column *organ-cases A / B better*: the same patient's same organ scored by both runs, "
             "how often A is better and how often B (by more than 0.001), with the exact sign test's two-sided p.",
             "", "| goal | target | measured | A | B | folds | per-fold difference | organ-cases A / B better (p) | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in result["goals"]:
        per_fold = ", ".join(f"{f}: {d:+.3f}" for f, d in g.get("per_fold", {}).items() if d is not None)
        met = "–" if g.get("reported") else {True: "yes", False: "**no**", None: "not measured yet"}[g["met"]]
        pairs = g.get("pairs")
        pairs = f"{pairs['wins']} / {pairs['losses']} (p {pairs['p']:.3f})" if pairs and pairs["wins"] + pairs["losses"] else "–"
        lines.append(f"| {g['goal']} | {g['target']} | {_cell(g['value'])} | {_cell(g.get('a'))} | {_cell(g.get('b'))} "
                     f"| {', '.join(map(str, g.get('folds', []))) or '–'} | {per_fold or '–'} | {pairs} | {met} |")
    failure = [g for g in result["goals"] if "shares" in g][-1]  # the default model's: the last
    if failure["shares"]:
        lines += ["", "Default model, cases with Dice below 0.7 per organ: " +
                  "; ".join(f"{k} {v['below']}/{v['cases']}" for k, v in failure["shares"].items()) + "."]
    table = result.get("methods", [])
    folds = sorted({f for row in table for f in row["folds"]})
    if table:
        lines += ["", "## Every finished run", "",
                  "Mean Dice over liver, kidneys, spleen per fold and pooled over the run's finished folds "
                  f"(its organ-cases below Dice {FAIL_DICE} in brackets; empty: not finished).", "",
                  "| scenario | method | " + " | ".join(f"fold {f}: {m}" for f in folds for m in MODALITIES)
                  + " | pooled: CT | pooled: MRI | pooled folds |",
                  "|---|---|" + "---|" * (len(folds) * len(MODALITIES) + 3)]

        def shown(cell):
            return "" if cell["dice"] is None else f"{cell['dice']:.3f} ({cell['below']})"
        for row in table:
            cells = [shown(row["per_fold"][f][m]) if f in row["per_fold"] else "" for f in folds for m in MODALITIES]
            cells += [shown(row["pooled"][m]) for m in MODALITIES] + [", ".join(map(str, row["folds"]))]
            lines.append(f"| {row['scenario']} | {row['method']} | " + " | ".join(cells) + " |")
    patients = result.get("patients", [])
    if patients:
        methods = [m for m in METHOD_ORDER if any(m in r["dice"] for r in patients)]
        methods += sorted({m for r in patients for m in r["dice"]} - set(methods))
        lines += ["", "## Every test patient (scenario `complete`)", "",
                  "Each method's mean Dice over the patient's organs of liver, kidneys, spleen; the last column names "
                  f"the organs that every method trained on the patient's modality scores below {FAIL_DICE}.", "",
                  "| patient | fold | modality | " + " | ".join(methods) + " | missed by every in-domain method |",
                  "|---|---|---|" + "---|" * (len(methods) + 1)]
        for r in patients:
            cells = [_cell(r["dice"].get(m)) if m in r["dice"] else "" for m in methods]
            lines.append(f"| {r['case']} | {r['fold']} | {r['modality']} | " + " | ".join(cells)
                         + f" | {', '.join(r['missed_by_every_in_domain_method']) or '–'} |")
        easy = result.get("default_without_hard_patients")
        if easy and easy["left_out"]:
            lines += ["", f"The default model (complete, {easy.get('method', 'fedgin')}) without the patients every "
                      "in-domain method misses "
                      f"({', '.join(easy['left_out'])}): CT {_cell(easy['CT'])}, MRI {_cell(easy['MRI'])} "
                      "(a diagnosis on test patients: no choice rests on it)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, default=RESULTS / "cv3")
    parser.add_argument("--budget", type=Path, default=RESULTS / "default_budget.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "cv3_goals")
    args = parser.parse_args(argv)
    runs = read_runs(args.record)
    budget = json.loads(args.budget.read_text()) if args.budget.exists() else None
    record = args.record.resolve()
    shown = record.relative_to(ROOT) if record.is_relative_to(ROOT) else record
    result = {"command": command_line(argv, __file__), "date": now_iso(), "record": str(shown),
              "finished_runs": sum(len(f) for f in runs.values()), "goals": goals(runs, budget),
              "methods": method_table(runs), "patients": patient_table(runs)}
    default = ("complete", FOV) if ("complete", FOV) in runs else ("complete", "fedgin")
    result["default_without_hard_patients"] = {"method": default[1],
                                               **without_hard_patients(runs, default, result["patients"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
