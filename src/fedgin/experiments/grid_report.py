"""The experiment report: paper-style tables, Dice-per-round curves, a bar chart by method, a
reading of the paper's claims against what was measured, and prediction overlays."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..data.labels import get_scheme  # noqa: E402
from .layout import OVERLAY_DIR, overlay_paths, run_dir  # noqa: E402
from .run_report import SCORED_CHECKPOINT, read_metrics  # noqa: E402

#: A hand-written reading of an experiment's numbers, put in ``report.md`` after the measured claims.
ANALYSIS_FILE = "analysis.md"


def _cell(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    sd = stat.get("sd")
    return f"{stat['mean']:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def _mean_dice(table, scenario, method, modality):
    try:
        return table[scenario][method][modality]["mean"]["dice"]["mean"]
    except KeyError:
        return None


def plot_curves(out: Path, scenario: str, methods: list[str], seeds: int) -> Path | None:
    """Validation Dice of the global model per round, per modality, for the federated methods."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    drawn = False
    for method in methods:
        for seed in range(seeds):
            rows = read_metrics(run_dir(out, scenario, method, seed))
            rows = [r for r in rows if "round" in r and r.get("dice")]
            for ax, modality in zip(axes, ("CT", "MRI")):
                mod_rows = [r for r in rows if r["modality"] == modality]
                if not mod_rows:
                    continue
                xs = [r["round"] for r in mod_rows]
                ys = [np.nanmean([v if v is not None else np.nan for v in r["dice"].values()]) for r in mod_rows]
                ax.plot(xs, ys, marker=".", label=f"{method} s{seed}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, modality in zip(axes, ("CT", "MRI")):
        ax.set_title(f"{scenario}: {modality} validation")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean Dice (global model)")
    fig.tight_layout()
    path = out / f"curves_{scenario}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(out: Path, scenarios: list[str], methods: list[str], table: dict) -> Path:
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 3.6), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        x = np.arange(len(methods))
        for i, modality in enumerate(("CT", "MRI")):
            vals = [_mean_dice(table, scenario, m, modality) or 0.0 for m in methods]
            ax.bar(x + (i - 0.5) * 0.38, vals, width=0.38, label=modality)
        ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(scenario)
        ax.set_ylabel("test Dice (mean over organs)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "dice_by_method.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def claims(table: dict, scenarios: list[str]) -> list[str]:
    """The paper's claims, checked against the measured means (no verdict where data is missing)."""
    lines = []

    def ratio_line(label, a, b, what):
        if a is None or b is None:
            return f"- {label}: not measured."
        return f"- {label}: {a:.3f} vs {b:.3f} ({what} {a - b:+.3f} Dice, ratio {a / b:.2f})" if b else \
            f"- {label}: {a:.3f} vs {b:.3f}"

    for scenario in scenarios:
        fg = {m: _mean_dice(table, scenario, "fedgin", m) for m in ("CT", "MRI")}
        fa = {m: _mean_dice(table, scenario, "fedavg", m) for m in ("CT", "MRI")}
        ce = {m: _mean_dice(table, scenario, "centralized", m) for m in ("CT", "MRI")}
        lines.append(f"**{scenario}**")
        lines.append(ratio_line("FedGIN vs FedAvg on MRI", fg["MRI"], fa["MRI"], "difference"))
        lines.append(ratio_line("FedGIN vs FedAvg on CT", fg["CT"], fa["CT"], "difference"))
        lines.append(ratio_line("FedGIN vs centralized on MRI", fg["MRI"], ce["MRI"], "difference"))
        lines.append(ratio_line("FedGIN vs local-MRI on MRI", fg["MRI"], _mean_dice(table, scenario, "local-mri", "MRI"),
                                "difference"))
        lines.append(ratio_line("FedGIN vs local-CT on CT", fg["CT"], _mean_dice(table, scenario, "local-ct", "CT"),
                                "difference"))
        lines.append(ratio_line("GIN on a CT-only model, tested on MRI (local-ct+gin vs local-ct)",
                                _mean_dice(table, scenario, "local-ct+gin", "MRI"),
                                _mean_dice(table, scenario, "local-ct", "MRI"), "difference"))
        # beyond the paper: GIN with IPA, where it was run
        if "fedgin+ipa" in table.get(scenario, {}):
            fi = {m: _mean_dice(table, scenario, "fedgin+ipa", m) for m in ("CT", "MRI")}
            lines.append(ratio_line("FedGIN+IPA vs FedAvg on MRI", fi["MRI"], fa["MRI"], "difference"))
            lines.append(ratio_line("FedGIN+IPA vs FedAvg on CT", fi["CT"], fa["CT"], "difference"))
            lines.append(ratio_line("FedGIN+IPA vs centralized on MRI", fi["MRI"], ce["MRI"], "difference"))
        if "local-ct+ipa" in table.get(scenario, {}):
            lines.append(ratio_line("GIN+IPA on a CT-only model, tested on MRI (local-ct+ipa vs local-ct)",
                                    _mean_dice(table, scenario, "local-ct+ipa", "MRI"),
                                    _mean_dice(table, scenario, "local-ct", "MRI"), "difference"))
        lines.append("")
    return lines


def overlay_lines(out: Path, scenarios: list[str], overlays: bool) -> list[str]:
    """The report's overlay section: the PNGs under ``out/overlays``, or why there are none."""
    lines = ["## Overlays", "",
             "Overlays show patient images: for real scans they are kept out of published copies of the "
             "results (`fedgin experiment` / `fedgin report` with `--no-overlays`).", ""]
    if not overlays:
        lines.append("Not drawn (`--no-overlays`).")
        if any(overlay_paths(out, s) for s in scenarios):
            lines.append(f"`{OVERLAY_DIR}/` still holds PNGs from an earlier call: delete it before publishing.")
        return lines + [""]
    drawn = {s: overlay_paths(out, s) for s in scenarios}
    if not any(drawn.values()):
        return lines + ["None drawn: no finished run with its model and test scans at hand (see the log).", ""]
    lines += ["Seed 0's models on the first test case of each modality, on the axial slice with the most "
              "annotated reference: image | reference | one panel per method, titled with that case's "
              "mean Dice over its annotated organs. Organs a case does not annotate have no reference.", ""]
    for scenario, paths in drawn.items():
        if paths:
            lines += [f"### {scenario}", ""] + [f"![{p.stem}]({OVERLAY_DIR}/{p.name})" for p in paths] + [""]
    return lines


def _outcome_cell(organs: dict, scheme) -> str:
    """Misses / false positives summed over the scheme's organs (over seeds and test cases)."""
    counts = [organs[o]["outcomes"] for o in scheme.organs if o in organs and "outcomes" in organs[o]]
    if not sum(c["annotated"] for c in counts):  # runs evaluated before misses were recorded
        return "-"
    return f"{sum(c['missed'] for c in counts)} / {sum(c['false_positives'] for c in counts)}"


def _failure_cell(outcomes: dict | None) -> str:
    """``a% / b%``: the share of cases holding the organ with Dice < 0.5 / with HD95 > 50 mm (or missed)."""
    if not outcomes or not outcomes.get("present"):
        return "-"
    n = outcomes["present"]
    return f"{outcomes['dice_below_0.5'] / n:.0%} / {outcomes['hd95_above_50mm'] / n:.0%}"


def _failure_table(runs: dict, methods: list[str], modality: str, scheme) -> list[str]:
    """Per method and organ, the share of failed cases (over all seeds' test cases)."""
    rows = []
    for method in methods:
        organs = runs.get(method, {}).get(modality)
        if organs:
            rows.append(f"| {method} | " + " | ".join(_failure_cell(organs.get(o, {}).get("outcomes"))
                                                     for o in scheme.organs) + " |")
    if not rows:
        return []
    return [f"Failures, {modality}: share of the cases whose reference holds the organ with Dice < 0.5 / "
            "with HD95 > 50 mm (a missed organ counts in both), over all seeds.", "",
            "| method | " + " | ".join(scheme.organs) + " |", "|---" * (len(scheme.organs) + 1) + "|", *rows, ""]


def write_experiment_report(out: Path, scenarios: list[str], methods: list[str], seeds: int, table: dict,
                            notes: list[str] | None = None, overlays: bool = True) -> Path:
    scheme = get_scheme("abdomen5")
    lines = ["# fedgin experiment", ""]
    meta_path = out / "experiment.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        lines += [f"- command: `{meta.get('command', '')}`", f"- date: {meta.get('date', '')}",
                  f"- machine: {meta.get('machine', '')}", f"- wall time: {meta.get('wall_minutes', '?')} min", ""]
    lines += notes or []
    lines += [SCORED_CHECKPOINT, ""]
    lines += [f"Test-set Dice per organ (mean over test cases, then mean ± sd over {seeds} seed(s)); "
              "'-' = not annotated in any test case. *missed / FP*: organs in the reference but not predicted / "
              "predicted but absent from the reference, counted over all seeds' test cases (HD95 is undefined "
              "for them, so its mean leaves them out).", ""]
    for scenario in scenarios:
        lines += [f"## {scenario}", ""]
        for modality in ("CT", "MRI"):
            lines += [f"### {modality}", "", "| method | " + " | ".join(scheme.organs)
                      + " | mean | HD95 mean (mm) | missed / FP |", "|---" * (len(scheme.organs) + 4) + "|"]
            for method in methods:
                organs = table.get(scenario, {}).get(method, {}).get(modality)
                if not organs:
                    continue
                hd = [organs[o]["hd95"]["mean"] for o in scheme.organs if o in organs and organs[o]["hd95"]["mean"]]
                cells = [_cell(organs.get(o, {}).get("dice")) for o in scheme.organs]
                mean = _cell(organs["mean"]["dice"])
                lines.append(f"| {method} | " + " | ".join(cells) + (f" | **{mean}** | " if mean != "-" else " | - | ")
                             + (f"{np.mean(hd):.1f} | " if hd else "- | ") + _outcome_cell(organs, scheme) + " |")
            lines.append("")
            lines += _failure_table(table.get(scenario, {}), methods, modality, scheme)
        curve = plot_curves(out, scenario, [m for m in methods if m.startswith(("fedavg", "fedgin"))], seeds)
        if curve is not None:
            lines += [f"![Dice per round, {scenario}]({curve.name})", ""]
    bars = plot_bars(out, scenarios, methods, table)
    lines += ["## By method", "", f"![Dice by method]({bars.name})", "", "## The paper's claims, as measured", ""]
    lines += claims(table, scenarios)
    analysis = out / ANALYSIS_FILE
    if analysis.exists():  # the authors' reading of the numbers, kept across redraws
        lines += ["## Reading the results", "", analysis.read_text().strip(), ""]
    lines += overlay_lines(out, scenarios, overlays)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
