"""Checkpoints that carry everything ``predict`` needs: weights, architecture, label scheme,
preprocessing and post-processing plan. Written atomically; a damaged or foreign file is refused
with a clear message."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
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


def resolve_checkpoint_path(model: str | Path) -> Path:
    """A checkpoint file, or a run dir (its ``checkpoints/last.pt``)."""
    path = Path(model)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        if not candidate.exists():
            subruns = sorted(p.parent.parent.name for p in path.glob("*/checkpoints/last.pt"))
            hint = f" (a local run: pick one of {', '.join(str(path / s) for s in subruns)})" if subruns else ""
            raise ModelError(f"{path}: not a run dir with checkpoints/last.pt{hint}")
        return candidate
    if not path.exists():
        raise ModelError(f"{path}: model not found")
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


def load_checkpoint(model: str | Path, *, expect_scheme: str | None = None) -> Checkpoint:
    """Load a checkpoint file or a run dir's last checkpoint."""
    path = resolve_checkpoint_path(model)
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
