"""Image augmentations applied to training batches: GIN, its IPA extension, and the standard
intensity augmentation every method gets."""

from .gin import GIN, GINDraw
from .intensity import RandomIntensity
from .ipa import IPA

__all__ = ["GIN", "GINDraw", "IPA", "RandomIntensity"]
