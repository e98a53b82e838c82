"""What a user sees by default: fedgin's own lines. Third-party chatter that fedgin's calls trigger
but no user can act on is kept out, unless ``--debug`` (``FEDGIN_DEBUG=1``, which the processes
fedgin starts, Ray's workers included, inherit) asks for everything."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

DEBUG_ENV = "FEDGIN_DEBUG"


def debugging() -> bool:
    """``--debug`` (or ``FEDGIN_DEBUG`` set to anything but ``0``): show everything."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def set_debugging(on: bool) -> None:
    """Record ``--debug`` for this process and every process it starts."""
    if on:
        os.environ[DEBUG_ENV] = "1"


@contextmanager
def ignoring(category: type[Warning], message: str) -> Iterator[None]:
    """Within the block, drop warnings of ``category`` whose text matches the regex ``message``
    (all of them are shown when :func:`debugging`)."""
    with warnings.catch_warnings():
        if not debugging():
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
