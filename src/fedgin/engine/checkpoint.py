"""Checkpoints that carry everything ``predict`` needs: weights, architecture, label scheme,
preprocessing and post-processing plan. Written atomically; a damaged or foreign file is refused
with a clear message."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch

from ..atomic import publish, temp_path
from ..data.labels import LabelScheme, get_scheme
from ..data.preprocess import PreprocessConfig
from ..errors import FedginError, ModelError
from .model import ModelConfig, build_model
from .postprocess import PostprocessPlan

FORMAT = "fedgin-checkpoint-1"


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    model_config: ModelConfig
    scheme: LabelScheme
    preprocess: PreprocessConfig
    sites: list[dict]  # [{"name": .., "modality": ..}]
    meta: dict  # round / epoch, mode, strategy, seed, ...
    path: Path | None = None
    # decided on validation cases at the end of a run; checkpoints from before plans: empty
    postprocess: PostprocessPlan = field(default_factory=PostprocessPlan)

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        model = build_model(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def normalisation_note(ckpt: Checkpoint) -> str | None:
    """Which normalisation layers a FedBN checkpoint holds, in one line (None for other runs)."""
    if ckpt.meta.get("strategy") != "fedbn":
        return None
    if ckpt.meta.get("normalisation") == "averaged":
        return ("FedBN model: its normalisation layers are the sites' average, the model whose validation Dice "
                "the run recorded and whose post-processing plan it decided; each site's own layers stayed at "
                "the site")
    return ("FedBN model of an older fedgin: its normalisation layers are the sites' average, but the run's "
            "validation Dice and post-processing plan were measured with each site's own layers, not with "
            "this model")


def save_checkpoint(path: str | Path, state_dict: dict, *, model_config: ModelConfig, scheme: LabelScheme,
                    preprocess: PreprocessConfig, sites: list[dict], meta: dict,
                    extra: dict | None = None, postprocess: PostprocessPlan | None = None) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, fsync, rename).

    ``postprocess`` is the plan ``predict`` and ``evaluate`` apply (default: none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "model_config": model_config.to_dict(),
        "scheme": scheme.to_dict(),
        "preprocess": preprocess.to_dict(),
        "sites": sites,
        "meta": meta,
        "extra": extra or {},
        "postprocess": (postprocess or PostprocessPlan()).to_dict(),
    }
    tmp = temp_path(path, ".pt")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: ``--checkpoint`` names: ``last``, ``round_N`` (federated runs), ``epoch_N`` (local, centralized)
CHECKPOINT_NAME = re.compile(r"last|(round|epoch)_(\d+)")


def parse_checkpoint_name(text: str) -> str:
    """``last``, ``round_N`` or ``epoch_N`` in the run dir's spelling (``round_3`` -> ``round_003``)."""
    match = CHECKPOINT_NAME.fullmatch(text)
    if match is None:
        raise FedginError(f"--checkpoint takes last, round_N or epoch_N, got {text!r}")
    return text if text == "last" else f"{match[1]}_{int(match[2]):03d}"


def checkpoint_names(run: Path) -> list[str]:
    """The checkpoints a run dir holds: ``last`` first, then rounds or epochs in order."""
    names = {p.stem for p in (Path(run) / "checkpoints").glob("*.pt") if CHECKPOINT_NAME.fullmatch(p.stem)}
    return sorted(names, key=lambda n: ("_" in n, n.partition("_")[0], int(n.partition("_")[2] or 0)))


def _describe(names: list[str]) -> str:
    """``last, round_001..round_020``: consecutive numbers collapse into a range."""
    numbered = [(n.partition("_")[0], int(n.partition("_")[2]), n) for n in names if n != "last"]
    parts = ["last"] if "last" in names else []
    for _, run in groupby(enumerate(numbered), key=lambda item: (item[1][0], item[1][1] - item[0])):
        run = [name for _, (_, _, name) in run]
        parts.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}")
    return ", ".join(parts) or "none"


def resolve_checkpoint_path(model: str | Path, checkpoint: str | None = None) -> Path:
    """A checkpoint file, or a run dir's ``checkpoints/<checkpoint>.pt`` (default ``last``).

    ``checkpoint`` is ``last``, ``round_N`` or ``epoch_N`` and needs a run dir; a name the run does
    not hold is refused naming the ones it does."""
    path = Path(model)
    if path.is_dir():
        name = "last" if checkpoint is None else parse_checkpoint_name(checkpoint)
        candidate = path / "checkpoints" / f"{name}.pt"
        if not (path / "checkpoints" / "last.pt").exists():
            subruns = sorted(p.parent.parent.name for p in path.glob("*/checkpoints/last.pt"))
            hint = f" (a local run: pick one of {', '.join(str(path / s) for s in subruns)})" if subruns else ""
            raise ModelError(f"{path}: not a run dir with checkpoints/last.pt{hint}")
        if not candidate.exists():
            raise ModelError(f"{path}: no checkpoint {name} in this run dir (it has: "
                             f"{_describe(checkpoint_names(path))})")
        return candidate
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    if checkpoint is not None:
        raise FedginError(f"--checkpoint picks a checkpoint of a run dir, but --model {path} is a checkpoint file")
    return path


def load_raw(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError):
        raise ModelError(f"{path}: damaged or not a fedgin checkpoint (unreadable)") from None
    except Exception as exc:  # torch's loader raises many kinds on arbitrary bytes
        text = " ".join(str(exc).split())[:100] or type(exc).__name__
        raise ModelError(f"{path}: damaged or not a fedgin checkpoint ({text})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path}: not a fedgin checkpoint (format {FORMAT} expected)")
    return payload


def load_checkpoint(model: str | Path, *, checkpoint: str | None = None,
                    expect_scheme: str | None = None) -> Checkpoint:
    """Load a checkpoint file, or a run dir's ``checkpoint`` (default its last one, see
    :func:`resolve_checkpoint_path`)."""
    path = resolve_checkpoint_path(model, checkpoint)
    payload = load_raw(path)
    try:
        try:
            scheme = get_scheme(payload["scheme"]["name"])
        except FedginError as exc:
            raise ModelError(f"{path}: {exc}") from None
        if list(scheme.organs) != list(payload["scheme"]["organs"]):
            raise ModelError(f"{path}: label scheme {scheme.name} differs from this fedgin's definition")
        ckpt = Checkpoint(
            state_dict=payload["state_dict"],
            model_config=ModelConfig.from_dict(payload["model_config"]),
            scheme=scheme,
            preprocess=PreprocessConfig.from_dict(payload["preprocess"]),
            sites=list(payload["sites"]),
            meta=dict(payload["meta"]),
            path=path,
        )
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{path}: incomplete checkpoint (missing {exc})") from None
    try:
        ckpt.postprocess = PostprocessPlan.from_dict(payload.get("postprocess"))
        ckpt.postprocess.check(ckpt.scheme)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}: invalid post-processing plan ({exc})") from None
    if expect_scheme is not None and ckpt.scheme.name != expect_scheme:
        raise ModelError(f"{path}: checkpoint uses label scheme {ckpt.scheme.name}, expected {expect_scheme}")
    try:
        ckpt.build()
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line or "Missing" in line),
                     " ".join(str(exc).split()))
        raise ModelError(f"{path}: weights do not fit the stored architecture ({first[:160]})") from None
    if ckpt.model_config.out_channels != ckpt.scheme.num_classes:
        raise ModelError(f"{path}: model has {ckpt.model_config.out_channels} output channels but label scheme "
                         f"{ckpt.scheme.name} has {ckpt.scheme.num_classes}")
    return ckpt
