"""``qa.html``: one self-contained page to look through an evaluation or a prediction folder.

The page opens offline from the file system (no external file, no network): a sortable table of
the cases, worst first (lowest mean Dice over the annotated organs; for predictions, the most
plausibility warnings), with Dice, HD95, missed / false-positive flags and organ volumes; per case
a canvas viewer (axial, coronal, sagittal; slice slider, mouse wheel or arrow keys; CT window
presets, percentile windows for MRI; prediction, reference, both or no overlay, one colour per
organ) and the run's provenance (model, checkpoint SHA-256, scheme, post-processing plan).

Each case's images are the small copies of :mod:`fedgin.evaluation.qa_views`, stored in the page
in base64: the scan as one WebP picture of its axial slices side by side (lossy, quality
:data:`WEBP_QUALITY`: on the bundle's scans a code is off by 1.4 on average, 6 (18 HU) at the
99th percentile, for scans 3-3.7 times smaller than as lossless zlib), the label maps exactly, as zlib
data. The browser decodes the picture natively and inflates the labels with its
``DecompressionStream``; the viewer is ``qa_assets/viewer.js``, written for fedgin. ``qa.npz``
next to the page keeps the exact copies, so ``fedgin report DIR`` redraws the page.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import publish, temp_path
from ..data.cache import file_digest
from ..data.labels import LabelScheme
from ..data.nifti import read_volume
from ..engine.postprocess import PostprocessPlan
from .qa_views import ViewWriter, case_view, case_voxels, read_views
from .statistics import STATISTICS_DIR, case_statistics, statistics_path, write_statistics

QA_PAGE, QA_VIEWS = "qa.html", "qa.npz"
#: libwebp's quality of the scans on the page (0-100; the labels are stored exactly).
WEBP_QUALITY = 90
ASSETS = Path(__file__).with_name("qa_assets")
#: One colour per organ on the page and in the experiment overlays (matplotlib's tab10 names).
ORGAN_COLOURS = {
    "liver": "tab:red",
    "kidneys": "tab:blue",
    "kidney_right": "tab:blue",
    "kidney_left": "tab:cyan",
    "spleen": "tab:purple",
    "pancreas": "tab:orange",
    "gallbladder": "tab:green",
}
_TAB10 = {"tab:blue": "#1f77b4", "tab:orange": "#ff7f0e", "tab:green": "#2ca02c", "tab:red": "#d62728",
          "tab:purple": "#9467bd", "tab:brown": "#8c564b", "tab:pink": "#e377c2", "tab:grey": "#7f7f7f",
          "tab:olive": "#bcbd22", "tab:cyan": "#17becf"}


def organ_hex(scheme: LabelScheme) -> dict[str, str]:
    """``{organ: "#rrggbb"}`` for every organ of ``scheme`` (an unknown organ: tab10 by its id)."""
    cycle = list(_TAB10.values())
    return {o: _TAB10.get(ORGAN_COLOURS.get(o, ""), cycle[i % len(cycle)])
            for o, i in scheme.label_ids.items() if i > 0}


class CaseRecorder:
    """What :func:`fedgin.evaluation.scoring.evaluate_cases` and ``fedgin predict`` keep of each
    case for the page: its statistics (returned by :meth:`add`, and written to ``statistics_dir``
    by :meth:`close` if given) and, with ``views``, its small copies appended to ``qa.npz`` in
    ``folder``. Until :meth:`close` nothing is there but a hidden temporary file, which
    :meth:`discard` removes (with ``folder`` if this recorder created it), so a failed run leaves
    nothing behind. ``cases``: how many cases the page will show, which sets how finely each is
    kept (:func:`fedgin.evaluation.qa_views.case_voxels`)."""

    def __init__(self, folder: Path, scheme: LabelScheme, *, views: bool = True,
                 statistics_dir: Path | None = None, cases: int | None = None):
        self.folder, self.scheme, self.statistics_dir = Path(folder), scheme, statistics_dir
        self.keep_views, self.views = views, None
        self.max_voxels = case_voxels(cases)
        self._created = not self.folder.exists()
        self._statistics: list[tuple[str, dict]] = []

    @classmethod
    def for_evaluation(cls, out: str | Path, scheme: LabelScheme, qa: bool, cases: int | None = None) -> "CaseRecorder":
        """An evaluation's: statistics to ``out/statistics/``, images (with ``qa``) to ``out/qa.npz``."""
        return cls(Path(out), scheme, views=qa, statistics_dir=Path(out) / STATISTICS_DIR, cases=cases)

    def add(self, case: str, dataset: str | None, modality: str, image: np.ndarray, affine: np.ndarray,
            pred: np.ndarray, reference: np.ndarray | None = None) -> dict:
        stats = case_statistics(case, modality, pred, image, affine, self.scheme, reference)
        self._statistics.append((case, {"dataset": dataset, **stats}))
        if self.keep_views:
            if self.views is None:
                self.views = ViewWriter(self.folder / QA_VIEWS)
            arrays, meta = case_view(image, affine, modality, pred, reference, self.max_voxels)
            self.views.add(arrays, {**meta, "case": case, "dataset": dataset, "statistics": stats})
        return stats

    def close(self) -> list[Path]:
        """Publish ``qa.npz`` and write the statistics files; returns what was written."""
        written = [self.views.close()] if self.views is not None else []
        if self.statistics_dir is not None:
            written += [write_statistics(statistics_path(self.statistics_dir, case), stats)
                        for case, stats in self._statistics]
        return written

    def discard(self) -> None:
        if self.views is not None:
            self.views.discard()
        if self._created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def __enter__(self) -> "CaseRecorder":
        return self

    def __exit__(self, kind, *_) -> None:
        """``qa.npz`` is published when the block succeeds and thrown away when it fails."""
        if kind is None:
            self.close()
        else:
            self.discard()


def _mean_dice(record: dict) -> float | None:
    values = [record["metrics"][o]["dice"] for o in record.get("annotated", [])
              if record["metrics"].get(o, {}).get("dice") is not None]
    return float(np.mean(values)) if values else None


def _page_case(record: dict | None, meta: dict | None, index: int | None) -> dict:
    """One case of the page's data: the evaluation ``record`` (None for predictions) and the view
    ``meta`` of case ``index`` of ``qa.npz`` (None: no images stored)."""
    base = record or {}
    stats = base.get("statistics") or (meta or {}).get("statistics") or {}
    source = meta or base
    case = {"case": source.get("case"), "dataset": source.get("dataset"), "modality": source.get("modality"),
            "annotated": base.get("annotated"), "metrics": base.get("metrics"),
            "mean_dice": _mean_dice(base) if record else None,
            "organs": stats.get("organs", {}), "warnings": stats.get("warnings", []),
            "intensity": stats.get("intensity"), "view": None, "view_index": None}
    if meta is not None:
        case["view"] = {k: meta[k] for k in ("shape", "spacing", "codes", "values", "has_ref")}
        case["view_index"] = index
    return case


def _view_metas(npz: Path | None) -> list[dict]:
    if npz is None or not npz.is_file():
        return []
    return [{**meta, "shape": list(arrays["image"].shape), "has_ref": "ref" in arrays}
            for meta, arrays in read_views(npz)]


def _b64(array: np.ndarray) -> str:
    """A label map, exactly: zlib in base64."""
    data = np.ascontiguousarray(array, dtype=np.uint8)
    return base64.b64encode(zlib.compress(data.tobytes(), 6)).decode("ascii")


def mosaic_columns(shape: tuple[int, int, int]) -> int:
    """How many axial slices the scan's picture puts side by side (a near-square picture)."""
    return max(1, math.ceil(math.sqrt(shape[0] * shape[1] / shape[2])))


def _tiles(shape: tuple[int, int, int], columns: int):
    """``(z, (rows, cols))``: where axial slice ``z`` sits in the picture, ``columns`` to a row."""
    _, ny, nx = shape
    for z in range(shape[0]):
        r, c = divmod(z, columns)
        yield z, (slice(r * ny, (r + 1) * ny), slice(c * nx, (c + 1) * nx))


def webp_mosaic(image: np.ndarray) -> tuple[str, int]:
    """A ``Z x Y x X`` uint8 scan as one WebP picture of its axial slices, ``columns`` to a row
    (slice ``z`` at row ``z // columns``, column ``z % columns``), in base64; and ``columns``."""
    nz, ny, nx = image.shape
    columns = mosaic_columns(image.shape)
    picture = np.zeros((math.ceil(nz / columns) * ny, columns * nx), dtype=np.uint8)
    for z, tile in _tiles(image.shape, columns):
        picture[tile] = image[z]
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="WEBP", quality=WEBP_QUALITY, method=6)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), columns


def read_mosaic(text: str, shape: tuple[int, int, int], columns: int) -> np.ndarray:
    """The ``Z x Y x X`` scan back from :func:`webp_mosaic`'s picture (as the page decodes it)."""
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("L"))
    out = np.empty(shape, dtype=np.uint8)
    for z, tile in _tiles(shape, columns):
        out[z] = picture[tile]
    return out


def _json_for_html(data) -> str:
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def write_page(path: Path, title: str, kind: str, scheme: LabelScheme, provenance: list[list[str]],
               cases: list[dict], npz: Path | None) -> Path:
    """Write ``qa.html`` atomically, one case's images at a time from ``npz`` (a case shows the
    images of ``npz``'s case ``view_index``; None: none)."""
    data = {"title": title, "kind": kind, "organs": list(scheme.organs), "labels": scheme.label_ids,
            "colours": organ_hex(scheme), "provenance": provenance, "cases": cases,
            "drawn": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    template = (ASSETS / "page.html").read_text()
    head, tail = template.split("<!--DATA-->")
    head = head.replace("{{TITLE}}", _escape(title)).replace("{{STYLE}}", (ASSETS / "style.css").read_text())
    tail = tail.replace("{{SCRIPT}}", (ASSETS / "viewer.js").read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, ".html")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(head)
            fh.write(f'<script type="application/json" id="qa-data">{_json_for_html(data)}</script>\n')
            if npz is not None and any(c["view"] for c in cases):
                for index, (_, arrays) in enumerate(read_views(npz)):
                    text, columns = webp_mosaic(arrays["image"])
                    fh.write(f'<script type="text/plain" id="qa-v{index}-image" data-columns="{columns}">'
                             f'{text}</script>\n')
                    for name in ("pred", "ref"):
                        if name in arrays:
                            fh.write(f'<script type="text/plain" id="qa-v{index}-{name}">'
                                     f'{_b64(arrays[name])}</script>\n')
            fh.write(tail)
        return publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _text(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def _checkpoint_rows(model: str | None, meta: dict | None, digest: str | None = None) -> list[list[str]]:
    meta = meta or {}
    if digest is None and model and Path(model).is_file():
        digest = file_digest(Path(model))
    when = ", ".join(f"{k} {meta[k]}" for k in ("round", "epoch") if k in meta)
    return [["model", _text(model)],
            ["checkpoint SHA-256", digest or "(the checkpoint file is not there to hash)"],
            *([["checkpoint", when]] if when else []),
            *([["trained", f"{meta.get('mode', '')} {meta.get('strategy', '')}".strip()]]
              if meta.get("mode") or meta.get("strategy") else [])]


def _plan_text(plan: dict | None, applied: bool) -> str:
    if not applied:
        return "none (not applied)"
    if not plan or not plan.get("keep_largest_components"):
        return "none (the model's plan keeps every component)"
    return PostprocessPlan.from_dict(plan).describe()


def evaluation_page(folder: Path, summary: dict, scheme: LabelScheme) -> Path:
    """``folder/qa.html`` of an evaluation (its ``summary.json`` and, where there, ``qa.npz``)."""
    args = summary.get("arguments", {})
    metas = {(m.get("dataset"), m.get("case")): (m, i) for i, m in enumerate(_view_metas(folder / QA_VIEWS))}
    cases = [_page_case(record, *metas.get((record["dataset"], record["case"]), (None, None)))
             for record in summary["metric_per_case"]]
    scored = (f"predictions in {summary['predictions']}, scored as they are" if summary.get("predictions")
              else "the model's predictions")
    provenance = [["evaluated", scored], *_checkpoint_rows(summary.get("model"), summary.get("model_meta")),
                  ["scheme", f"{scheme.name}: {', '.join(scheme.organs)}"],
                  ["post-processing plan", _plan_text(args.get("postprocess_plan"), bool(args.get("postprocess")))],
                  ["reference data", _text(args.get("data"))],
                  ["cases", f"{args.get('cases')} (split seed {args.get('seed')}, split file {_text(args.get('split'))})"],
                  ["label map", _text(args.get("label_map"))],
                  ["versions", _text(summary.get("versions"))]]
    title = f"fedgin QA: evaluation of {Path(summary.get('model') or summary.get('predictions') or folder).name}"
    return write_page(folder / QA_PAGE, title, "evaluation", scheme, provenance, cases, folder / QA_VIEWS)


def prediction_page(folder: Path, provenance: dict, scheme: LabelScheme) -> Path:
    """``folder/qa.html`` of a ``fedgin predict`` output folder (its ``provenance.json`` and
    ``qa.npz``)."""
    cases = [_page_case(None, meta, index) for index, meta in enumerate(_view_metas(folder / QA_VIEWS))]
    args = provenance.get("arguments", {})
    checkpoint = provenance.get("checkpoint", {}) if isinstance(provenance.get("checkpoint"), dict) else {}
    rows = [["predicted", f"{len(cases)} case(s) of {_text(args.get('input'))} ({_text(args.get('modality'))})"],
            *_checkpoint_rows(provenance.get("model"), provenance.get("model_meta"), checkpoint.get("sha256")),
            ["scheme", f"{scheme.name}: {', '.join(scheme.organs)}"],
            ["post-processing plan", _plan_text(args.get("postprocess_plan"), bool(args.get("postprocess")))],
            ["preprocessing", _text(provenance.get("preprocess"))],
            ["created", _text(provenance.get("created"))], ["versions", _text(provenance.get("versions"))]]
    title = f"fedgin QA: predictions of {Path(provenance.get('model') or folder).name}"
    return write_page(folder / QA_PAGE, title, "prediction", scheme, rows, cases, folder / QA_VIEWS)


def rebuild_prediction_views(folder: Path, provenance: dict, scheme: LabelScheme,
                             names: Iterable[tuple[str, Path]]) -> Path | None:
    """``qa.npz`` of a prediction folder written without one (``--no-qa``), from its inputs
    (``names``: ``(case, input file)``) and its ``{case}.nii.gz`` label maps; None where no input
    is there any more."""
    modality = provenance.get("arguments", {}).get("modality", "CT")
    pairs = [(case, source, folder / f"{case}.nii.gz") for case, source in names]
    pairs = [p for p in pairs if p[1].is_file() and p[2].is_file()]
    if not pairs:
        return None
    with CaseRecorder(folder, scheme, cases=len(pairs)) as recorder:
        for case, source, label_file in pairs:
            image, affine = read_volume(source, kind="image")
            labels, _ = read_volume(label_file, kind="label")
            recorder.add(case, None, modality, image, affine, labels)
    return folder / QA_VIEWS
