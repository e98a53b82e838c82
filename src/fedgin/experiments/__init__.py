"""The comparison grid (scenarios x methods x seeds), its report and overlays, run reports and the demo."""

from .demo import run_demo
from .experiment import parse_method, run_experiment, write_results
from .grid_report import write_experiment_report
from .layout import OVERLAY_DIR, overlay_paths, run_dir
from .overlays import draw_overlays
from .recorded import run_recorded_experiment
from .redraw import redraw_report
from .run_report import write_run_report

__all__ = [
    "OVERLAY_DIR",
    "draw_overlays",
    "overlay_paths",
    "parse_method",
    "redraw_report",
    "run_demo",
    "run_dir",
    "run_experiment",
    "run_recorded_experiment",
    "write_experiment_report",
    "write_results",
    "write_run_report",
]
