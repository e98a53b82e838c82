"""Plots and markdown reports for a run dir (``metrics.jsonl``) and its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..data.labels import get_scheme  # noqa: E402
from ..evaluation.scoring import summary_markdown  # noqa: E402
from ..federated.recorder import privacy_words  # noqa: E402


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(run: Path, out_png: Path | None = None) -> Path | None:
    """Validation Dice (mean over organs) and training loss per round/epoch, one line per site."""
    rows = read_metrics(run)
    if not rows:
        return None
    step_key = "round" if "round" in rows[0] else "epoch"
    fig, (ax_dice, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for site in sorted({r["site"] for r in rows}):
        site_rows = [r for r in rows if r["site"] == site]
        modality = site_rows[0].get("modality", "?")
        xs = [r[step_key] for r in site_rows]
        dice = []
        for r in site_rows:
            vals = [v for v in (r.get("dice") or {}).values() if v is not None]
            dice.append(sum(vals) / len(vals) if vals else float("nan"))
        ax_dice.plot(xs, dice, marker="o", label=f"{site} ({modality})")
        ax_loss.plot(xs, [r.get("loss", float("nan")) for r in site_rows], marker=".", label=f"{site} ({modality})")
    ax_dice.set_xlabel(step_key)
    ax_dice.set_ylabel("validation Dice (mean over organs)")
    ax_dice.set_ylim(0, 1)
    ax_loss.set_xlabel(step_key)
    ax_loss.set_ylabel("training loss")
    for ax in (ax_dice, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = out_png or Path(run) / "dice_per_round.png"
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


#: which model of each run is scored, and why (the same sentence in every report)
SCORED_CHECKPOINT = (
    "Scored checkpoint: each run's last one (`checkpoints/last.pt`: the final epoch, or the final "
    "round's global model), with its post-processing plan. The learning rate decays to near zero "
    "over the run (poly schedule), so the last iterate is the settled one, as in nnU-Net; picking "
    "a 'best' epoch or round on validation Dice would pick on one or two validation cases per "
    "site, noise at this size, and would give methods a selection step the others lack.")


def _gin_recipe(train: dict) -> str:
    """The GIN settings of a run's ``config.json`` in words."""
    if not train["gin"]:
        return "off"
    views = train.get("gin_views", 1)
    parts = [f"{views} view{'s' if views > 1 else ''}", "IPA" if train.get("ipa") else "no IPA"]
    if train.get("clean_view"):
        parts.append("+ a clean view")
    if train.get("consistency"):
        parts.append(f"consistency {train['consistency']:g}")
    if train.get("gin_p", 1.0) < 1:
        parts.append(f"p {train['gin_p']:g}")
    return "on (" + ", ".join(parts) + ")"


def write_run_report(run: Path, eval_dir: Path | None, out_md: Path, title: str = "fedgin run",
                     notes: list[str] | None = None) -> Path:
    """A markdown report: settings, the per-organ per-modality table and the training curves."""
    run = Path(run)
    lines = [f"# {title}", ""]
    lines += notes or []
    config_path = run / "config.json"
    if config_path.exists():
        cfg = json.loads(config_path.read_text())
        sites = ", ".join(f"{s['name']} ({s.get('modality') or 'auto'})" for s in cfg["sites"])
        lines += [f"- sites: {sites}", f"- mode: {cfg['mode']}, strategy: {cfg.get('strategy')}, "
                  f"rounds: {cfg.get('rounds')}, local epochs: {cfg.get('local_epochs')}",
                  f"- GIN: {_gin_recipe(cfg['train'])}, preset: {cfg['preset']}, seed: {cfg['seed']}",
                  f"- learning rate {cfg['train']['lr']}, schedule {cfg['train'].get('lr_schedule', 'constant')}, "
                  f"standard intensity augmentation {'on' if cfg['train'].get('intensity_augment') else 'off'}, "
                  + (f"random intensity curves on a share {cfg['train']['curve_p']:g} of the slices, "
                     if cfg['train'].get('curve_p') else "")
                  + (f"random field-of-view windows (sides {cfg['train'].get('fov_min_mm', 150):g} mm to the crop) "
                     f"on a share {cfg['train']['fov_p']:g} of the slices, " if cfg['train'].get('fov_p') else "") +
                  f"intensities {cfg['preprocess'].get('intensity', 'unit')}", ""]
        private = [r["privacy"] for r in read_metrics(run) if r.get("privacy")]
        if private:
            lines += [f"- {privacy_words(private[-1])}", ""]
        if cfg.get("secagg"):
            lines += ["- secure aggregation (Flower's SecAgg+): the server saw only the masked sum of the sites' "
                      "updates", ""]
        lines += [SCORED_CHECKPOINT, ""]
    if eval_dir is not None and (Path(eval_dir) / "summary.json").exists():
        summary = json.loads((Path(eval_dir) / "summary.json").read_text())
        scheme = get_scheme(summary["scheme"]["name"])
        table = summary_markdown(summary, scheme, title="Test-set evaluation")
        lines += ["#" + line if line.startswith("#") else line for line in table.splitlines()]
        lines.append("")
    png = plot_training_curves(run, out_md.parent / "dice_per_round.png")
    if png is not None:
        lines += ["## Training curves", "", f"![Dice per round]({png.name})", ""]
    out_md.write_text("\n".join(lines) + "\n")
    return out_md
