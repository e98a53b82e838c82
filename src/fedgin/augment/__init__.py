"""Image augmentations applied to training batches: GIN and its IPA extension."""

from .gin import GIN, GINDraw
from .ipa import IPA

__all__ = ["GIN", "GINDraw", "IPA"]
