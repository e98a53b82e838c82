"""Overlay PNGs for the experiment report: every method's prediction on a few test slices.

For each scenario, one PNG per picked test case (the first ``per_modality`` cases of each
modality, by case id, from the test split the runs were evaluated on): the image, the annotated
reference and one panel per method, each label map a colour overlay on the grey axial slice with
the most annotated reference foreground. Models, datasets and split come from what each run's
evaluation recorded (``eval/summary.json``), so the overlays show the cases that were scored.

Overlays show patient images: ``--no-overlays`` leaves them out (results of real scans).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..atomic import publish, temp_path  # noqa: E402
from ..data.cache import load_case  # noqa: E402
from ..data.datasets import CaseRef  # noqa: E402
from ..data.labels import LabelScheme  # noqa: E402
from ..data.preprocess import PreprocessConfig  # noqa: E402
from ..engine.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from ..engine.inference import predict_preprocessed_labels, tile_of  # noqa: E402
from ..engine.trainer import resolve_device  # noqa: E402
from ..errors import FedginError, ModelError  # noqa: E402
from ..evaluation.qa import ORGAN_COLOURS  # noqa: E402 - one colour per organ, as on the QA page
from ..evaluation.scoring import select_cases  # noqa: E402
from .layout import OVERLAY_DIR, run_dir  # noqa: E402

#: Each panel is PANEL_INCHES x PANEL_INCHES at DPI: a PNG is ``panels x 300`` pixels wide.
PANEL_INCHES = 3.0
DPI = 100
ALPHA = 0.45
WINDOW_PERCENTILES = (1.0, 99.0)


@dataclass
class FinishedRun:
    """A method's finished run: the model its evaluation scored and that evaluation's summary."""

    checkpoint: Checkpoint
    summary: dict
    cache_dir: str | None

    @property
    def inputs(self) -> tuple[LabelScheme, PreprocessConfig]:
        """What the model expects: its label scheme and preprocessing."""
        return self.checkpoint.scheme, self.checkpoint.preprocess


@dataclass
class Panel:
    """One panel of an overlay PNG: a title and an ``H x W`` label map (None: the image alone)."""

    title: str
    labels: np.ndarray | None


def load_finished_run(run: Path) -> FinishedRun | None:
    """The evaluated model of a run dir, or None when the run has no evaluation or no model."""
    summary_path, config_path = run / "eval" / "summary.json", run / "config.json"
    if not (summary_path.exists() and config_path.exists()):
        return None
    summary = json.loads(summary_path.read_text())
    config = json.loads(config_path.read_text())
    # the evaluation names the model as the experiment saw it (a local run's model is a site
    # subfolder); re-anchor it in this run dir, since the experiment dir may have moved since
    recorded = Path(summary["arguments"]["model"])
    try:
        model = run / recorded.relative_to(config["out"])
    except ValueError:
        model = recorded
    if not model.exists():
        return None
    return FinishedRun(load_checkpoint(model), summary, config.get("cache_dir"))


def first_cases(refs: list[CaseRef], per_modality: int) -> list[CaseRef]:
    """The first ``per_modality`` cases of each modality (CT, then MRI), by case id."""
    picked: list[CaseRef] = []
    for modality in sorted({r.modality for r in refs}):
        picked += sorted((r for r in refs if r.modality == modality), key=lambda r: r.case_id)[:per_modality]
    return picked


def annotated_reference(label: np.ndarray, annotated: tuple[str, ...], scheme: LabelScheme) -> np.ndarray:
    """``label`` with the organs the case does not annotate set to 0 (their voxels are unknown)."""
    keep = [scheme.label_ids[o] for o in annotated]
    return np.where(np.isin(label, keep), label, 0).astype(np.uint8)


def foreground_slice(label: np.ndarray) -> int:
    """The axial slice (axis 0 of a ``D x H x W`` label) with the most foreground voxels, the first
    on ties; the middle slice when the label is empty."""
    counts = (label > 0).reshape(label.shape[0], -1).sum(axis=1)
    return int(counts.argmax()) if counts.any() else label.shape[0] // 2


def case_mean_dice(summary: dict, ref: CaseRef) -> float | None:
    """Mean Dice over the organs ``ref`` annotates, from an evaluation's ``metric_per_case``;
    None when the case was not scored or no organ has a Dice."""
    for record in summary["metric_per_case"]:
        if record["case"] == ref.case_id and record["dataset"] == ref.dataset:
            values = [record["metrics"][o]["dice"] for o in record["annotated"]
                      if record["metrics"].get(o, {}).get("dice") is not None]
            return float(np.mean(values)) if values else None
    return None


def organ_colours(scheme: LabelScheme) -> dict[int, tuple[float, float, float]]:
    """Class id -> RGB in [0, 1] for every organ of ``scheme``."""
    return {i: to_rgb(ORGAN_COLOURS.get(organ, f"C{i}")) for organ, i in scheme.label_ids.items() if i > 0}


def _radiological(plane: np.ndarray) -> np.ndarray:
    """A preprocessed ``H x W`` plane (RAS: R-L index, A-P index) as radiologists view an axial
    slice: anterior up, the patient's right on the left."""
    return plane.T[::-1, ::-1]


def display_window(plane: np.ndarray) -> tuple[float, float]:
    """Grey window of a preprocessed plane: its 1st-99th percentiles (z-scored slices are not in
    [0, 1], and a few bright voxels must not darken the rest); a flat plane gets a unit-wide one."""
    lo, hi = (float(v) for v in np.percentile(plane, WINDOW_PERCENTILES))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def _colour_overlay(labels: np.ndarray, colours: dict[int, tuple[float, float, float]]) -> np.ndarray:
    """``H x W`` label map -> ``H x W x 4`` RGBA, transparent where background."""
    rgba = np.zeros(labels.shape + (4,), dtype=np.float32)
    for class_id, rgb in colours.items():
        rgba[labels == class_id] = (*rgb, ALPHA)
    return rgba


def render_overlay(path: Path, image: np.ndarray, panels: list[Panel], scheme: LabelScheme, title: str,
                   notes: list[str]) -> Path:
    """Write one PNG (atomically): ``panels`` side by side over the ``H x W`` preprocessed image
    (z-scored, or [0, 1] for ``intensity="unit"`` models) in grey over its :func:`display_window`,
    a legend of the organ colours and ``notes`` underneath."""
    colours = organ_colours(scheme)
    width, height = PANEL_INCHES * len(panels), PANEL_INCHES + 1.2
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
    vmin, vmax = display_window(image)
    for ax, panel in zip(axes[0], panels):
        ax.imshow(_radiological(image), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        if panel.labels is not None:
            ax.imshow(_colour_overlay(_radiological(panel.labels), colours), interpolation="nearest")
        ax.set_title(panel.title, fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=colours[i], alpha=ALPHA, label=o) for o, i in scheme.label_ids.items() if i > 0]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.3 / height), ncol=len(handles),
               fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    if notes:
        fig.text(0.5, 0.04 / height, textwrap.fill("; ".join(notes), int(width * 14)), ha="center", va="bottom",
                 fontsize=7)
    # fixed margins rather than tight_layout: every panel is PANEL_INCHES wide in every PNG
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.6 / height, top=1 - 0.6 / height, wspace=0.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, ".png")
    try:
        fig.savefig(tmp, dpi=DPI)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _dice_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _draw_scenario(out: Path, scenario: str, runs: dict[str, FinishedRun], notes: list[str], *,
                   seed: int, per_modality: int, cache_dir: str | Path | None,
                   device: torch.device) -> list[Path]:
    """One PNG per picked test case of ``scenario``; every run shares the first run's label scheme,
    preprocessing and test split (as an experiment's runs do)."""
    first = next(iter(runs.values()))
    scheme, preprocess = first.inputs
    args = first.summary["arguments"]
    refs = first_cases(select_cases(args["data"], scheme, seed=args["seed"], split_file=args["split"],
                                    label_map=args.get("label_map")), per_modality)
    models = {m: r.checkpoint.build(device) for m, r in runs.items()}
    cache = cache_dir or first.cache_dir
    written = []
    for ref in refs:
        pre = load_case(ref, scheme, preprocess, Path(cache) if cache else None)
        reference = annotated_reference(pre.label, ref.annotated, scheme)
        z = foreground_slice(reference)
        panels = [Panel("image", None), Panel("reference", reference[z])]
        for method, model in models.items():
            # the model is 2D: the shown slice alone predicts what the whole volume would there
            labels = predict_preprocessed_labels(model, pre.image[z:z + 1], device, tile=tile_of(pre))[0]
            dice = case_mean_dice(runs[method].summary, ref)
            panels.append(Panel(f"{method}\nDice {_dice_text(dice)}", labels))
        unknown = [o for o in scheme.organs if o not in ref.annotated]
        case_notes = ([f"not annotated (no reference): {', '.join(unknown)}"] if unknown else []) + notes
        title = (f"{scenario}: {ref.case_id} ({ref.modality}), axial slice {z + 1}/{pre.image.shape[0]}, "
                 f"seed {seed}; Dice: mean over annotated organs")
        written.append(render_overlay(out / OVERLAY_DIR / f"{scenario}_{ref.case_id}.png", pre.image[z],
                                      panels, scheme, title, case_notes))
    return written


def _finished_runs(out: Path, scenario: str, methods: list[str], seed: int,
                   log) -> tuple[dict[str, FinishedRun], list[str]]:
    """The finished runs of ``methods`` in ``scenario``, and a note on the methods left out."""
    runs: dict[str, FinishedRun] = {}
    left_out: dict[str, list[str]] = {}
    for method in methods:
        reason = None
        try:
            run = load_finished_run(run_dir(out, scenario, method, seed))
        except ModelError as exc:  # a missing or damaged model must not cost the other methods' panels
            log(f"overlays {scenario}: {exc}")
            run, reason = None, "no usable model"
        if run is None:
            reason = reason or f"no finished run (seed {seed})"
        elif runs and run.inputs != next(iter(runs.values())).inputs:
            reason = "other label scheme or preprocessing than " + next(iter(runs))
        else:
            runs[method] = run
        if reason:
            left_out.setdefault(reason, []).append(method)
    return runs, [f"{reason}: {', '.join(names)}" for reason, names in left_out.items()]


def draw_overlays(out: Path, scenarios: list[str], methods: list[str], *, seed: int = 0, per_modality: int = 1,
                  cache_dir: str | Path | None = None, device: str = "auto", log=print) -> list[Path]:
    """Draw ``out/overlays/<scenario>_<case>.png`` for every scenario of an experiment dir.

    Uses each method's finished run of ``seed``; a method without one (not trained, or its model
    gone) is left out with a note in the PNG and the log. ``cache_dir`` defaults to the one the
    runs used. Returns the PNGs written.
    """
    out = Path(out)
    torch_device = resolve_device(device)
    written: list[Path] = []
    for scenario in scenarios:
        runs, notes = _finished_runs(out, scenario, methods, seed, log)
        if not runs:
            log(f"overlays {scenario}: not drawn, no finished run with its model (seed {seed})")
            continue
        for note in notes:
            log(f"overlays {scenario}: left out, {note}")
        try:
            paths = _draw_scenario(out, scenario, runs, notes, seed=seed, per_modality=per_modality,
                                   cache_dir=cache_dir, device=torch_device)
        except FedginError as exc:  # the scans are gone or unreadable: the report still gets written
            log(f"overlays {scenario}: not drawn ({exc})")
            continue
        log(f"overlays {scenario}: {len(paths)} PNG(s) in {out / OVERLAY_DIR}")
        written += paths
    return written
