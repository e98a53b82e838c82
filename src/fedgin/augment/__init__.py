"""Image augmentations applied to training batches: GIN, its IPA extension, the standard
intensity augmentation every method gets, and random intensity curves."""

from .curve import RandomCurve
from .gin import GIN, GINDraw
from .intensity import RandomIntensity
from .ipa import IPA

__all__ = ["GIN", "GINDraw", "IPA", "RandomCurve", "RandomIntensity"]
