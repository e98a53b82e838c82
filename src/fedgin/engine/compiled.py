"""``torch.compile`` for the trainer's step: when it is used, where its cache lives, the fallback.

The trainer's forward pass and loss (the U-Net, the partial-label Dice + CE, the views'
consistency) run as one compiled graph; the backward pass is compiled with it (AOTAutograd). On
2 CPU cores the trainer runs 1.47x as many slices per second as eagerly
(``docs/results/train_throughput.json``).

- **When.** On by default (``TrainConfig.compile``); off with ``--no-compile``, ``"compile": false``
  in a config, or ``FEDGIN_COMPILE=0`` in the environment (the test suite sets it: hundreds of
  short runs in many shapes would each pay a compilation). Where compilation is impossible (no C++
  compiler for the CPU, no Triton for CUDA, a Python that ``torch.compile`` does not support, or
  a compiler error), training runs eagerly and says so in one log line.
- **Cost.** The first compilation of a shape takes about 40 s on 2 cores; inductor keeps the
  result on disk (:func:`compile_cache_dir`), so a later process with the same model, batch and
  crop loads it in about 3 s, and a later federated round in the same process costs nothing.
  Shapes are static (``dynamic=False``): the training batch never changes within a run.
- **Inference: opt-in** (``predict --compile``, ``evaluate --compile``); validation stays eager.
  Compiled inference of the quick U-Net ran 0.068 s per batch of 32 slices against 0.067 s eager
  and costs 2.2 s to load from a warm cache (``docs/results/compile_inference.json``): on a CPU it
  does not pay for a volume or a test set. Batches are padded to one size.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

#: environment switch: ``0`` (or false/no/off) turns compilation off for every run in the process
COMPILE_ENV = "FEDGIN_COMPILE"
#: inductor's own setting for its on-disk cache; fedgin only gives it a default
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

logger = logging.getLogger("fedgin.compile")

_OFF = {"0", "false", "no", "off"}


def compile_cache_dir() -> Path:
    """Inductor's on-disk cache: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``compile/`` in fedgin's
    cache folder (``$FEDGIN_CACHE_DIR``, else ``~/.cache/fedgin``: it outlives ``/tmp``, inductor's
    own default)."""
    from ..data.cache import default_cache_dir

    env = os.environ.get(INDUCTOR_CACHE_ENV)
    return Path(env) if env else default_cache_dir() / "compile"


def _turned_off(requested: bool) -> bool:
    """Compilation was turned off by the user: not requested, or ``FEDGIN_COMPILE=0``."""
    return not requested or os.environ.get(COMPILE_ENV, "").strip().lower() in _OFF


def why_eager(requested: bool, device: torch.device) -> str | None:
    """Why the step will run eagerly, or None when it will be compiled."""
    if _turned_off(requested):
        return "compilation is turned off (--no-compile or FEDGIN_COMPILE=0)"
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]}"
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as exc:  # noqa: BLE001 - any failure to find one means the same
            return f"no C++ compiler for torch.compile on the CPU ({exc})"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed (torch.compile on CUDA needs it)"
    else:
        return f"torch.compile is not used on {device.type}"
    return None


#: the log lines said in this process (each is said once)
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.warning("fedgin: %s", message)


class CompiledOrEager:
    """``fn`` compiled (static shapes, inductor) on its first call, or eager.

    A compilation error (``torch._dynamo`` raises one of its ``TorchDynamoException`` errors, which
    wrap inductor's and the C++ compiler's) logs one line and makes ``fn`` eager for the rest of
    the process; the failed call is then made eagerly, so the caller sees no difference. Compiled
    graphs are shared process-wide (one per function), so a federated client's new trainer of
    each round reuses the previous round's.
    """

    #: fn -> its compiled form, or None once compiling it failed
    _compiled: dict[Callable, Callable | None] = {}

    def __init__(self, fn: Callable, *, compiled: bool, what: str = "the training step"):
        self.fn, self.what, self._wanted = fn, what, compiled
        if compiled and fn not in self._compiled:
            os.environ.setdefault(INDUCTOR_CACHE_ENV, str(compile_cache_dir()))
            # a module inductor imports on the first call still uses a deprecated torch.jit API
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                                    category=DeprecationWarning)
            self._compiled[fn] = torch.compile(fn, dynamic=False)

    @property
    def compiled(self) -> bool:
        return self._compiled.get(self.fn) is not None if self._wanted else False

    def __call__(self, *args, **kwargs):
        compiled = self._compiled.get(self.fn) if self._wanted else None
        if compiled is None:
            return self.fn(*args, **kwargs)
        import torch._inductor.config as inductor_config

        # what torch.use_deterministic_algorithms would have set (fedgin's seeding sets torch's
        # flag alone, so that an eager process never imports inductor: trainer.set_deterministic)
        inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            cause = getattr(exc, "inner_exception", None) or exc  # the backend's own error, if wrapped
            text = str(cause).strip()
            first = text.splitlines()[0][:300] if text else ""
            _say_once(f"torch.compile failed for {self.what} ({type(cause).__name__}: {first}); running it eagerly")
            self._compiled[self.fn] = None
            return self.fn(*args, **kwargs)


def compiled_or_eager(fn: Callable, requested: bool, device: torch.device,
                      what: str = "the training step") -> CompiledOrEager:
    """``fn`` compiled when :func:`why_eager` finds nothing against it; otherwise eager, with the
    reason in one log line per process (none when compilation was turned off: that was asked for)."""
    reason = why_eager(requested, device)
    if reason is not None and not _turned_off(requested):
        _say_once(f"{reason}; running {what} eagerly")
    return CompiledOrEager(fn, compiled=reason is None, what=what)
