"""The ML core: network, losses, metrics, inference, post-processing, checkpoints, the trainer and run dirs."""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .inference import predict_labels, predict_preprocessed_labels, predict_probs
from .losses import PartialLabelDiceCELoss, view_consistency
from .metrics import case_metrics, dice_score, hd95_mm, mean_sd, outcome_counts
from .model import ModelConfig, build_model
from .postprocess import PostprocessPlan, decide_plan, keep_largest_components
from .runs import train_non_federated
from .trainer import EpochResult, Trainer, resolve_device, seed_everything

__all__ = [
    "Checkpoint",
    "EpochResult",
    "ModelConfig",
    "PartialLabelDiceCELoss",
    "PostprocessPlan",
    "Trainer",
    "build_model",
    "case_metrics",
    "decide_plan",
    "dice_score",
    "hd95_mm",
    "keep_largest_components",
    "load_checkpoint",
    "mean_sd",
    "outcome_counts",
    "predict_labels",
    "predict_preprocessed_labels",
    "predict_probs",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "train_non_federated",
    "view_consistency",
]
