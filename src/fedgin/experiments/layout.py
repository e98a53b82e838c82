"""Where things live in an experiment dir: one run dir per (scenario, method, seed), and the
overlay PNGs. Shared by the grid, its report and the overlays, so none imports another for it."""

from __future__ import annotations

from pathlib import Path

OVERLAY_DIR = "overlays"


def run_dir(out: Path, scenario: str, method: str, seed: int) -> Path:
    """``out/runs/<scenario>/<method>/seed<seed>``: the run dir of one (scenario, method, seed)."""
    return out / "runs" / scenario / method / f"seed{seed}"


def overlay_paths(out: Path, scenario: str) -> list[Path]:
    """The overlay PNGs of ``scenario`` under an experiment dir, by name."""
    return sorted((Path(out) / OVERLAY_DIR).glob(f"{scenario}_*.png"))
