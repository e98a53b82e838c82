"""Robustness is reported, not only means: per organ and modality the share of cases that fail
(Dice < 0.5, Dice < 0.7, HD95 > 50 mm or missed), in summary.json, summary.md and the grid report."""

from __future__ import annotations

from fedgin.data.labels import get_scheme
from fedgin.engine.metrics import outcome_counts
from fedgin.evaluation.scoring import summarise, summary_markdown
from fedgin.experiments.experiment import aggregate
from fedgin.experiments.grid_report import _failure_table

SCHEME = get_scheme("abdomen5")


def m(dice, hd95, missed=False, fp=False):
    return {"dice": dice, "hd95": hd95, "missed": missed, "false_positive": fp}


NOT_ANNOTATED = {"dice": None, "hd95": None, "missed": None, "false_positive": None}
CASES = [
    m(0.95, 4.0),         # good
    m(0.6, 80.0),         # a far blob kept: Dice above 0.5, HD95 fails
    m(0.3, 20.0),         # poor overlap
    m(0.0, None, True),   # missed: fails every test
    m(0.0, None, False, True),  # a false positive where the reference has none: not "present"
    m(None, None),        # absent from both
    NOT_ANNOTATED,
]


def test_outcome_counts_count_failures_among_the_cases_that_hold_the_organ():
    counts = outcome_counts(CASES)
    assert counts == {"missed": 1, "false_positives": 1, "annotated": 6, "present": 4,
                      "dice_below_0.5": 2, "dice_below_0.7": 3, "hd95_above_50mm": 2}


def test_summary_json_and_markdown_carry_the_shares():
    records = [{"case": f"c{i}", "modality": "MRI", "metrics": {o: (c if o == "spleen" else m(0.9, 3.0))
                                                                 for o in SCHEME.organs}}
               for i, c in enumerate(CASES)]
    summary = {"by_modality": summarise(records, SCHEME)}
    spleen = summary["by_modality"]["MRI"]["spleen"]
    assert spleen["failure_share"] == {"dice_below_0.5": 0.5, "dice_below_0.7": 0.75, "hd95_above_50mm": 0.5}
    assert summary["by_modality"]["MRI"]["liver"]["failure_share"]["dice_below_0.5"] == 0.0
    md = summary_markdown(summary, SCHEME)
    assert "| Dice < 0.5 | HD95 > 50 mm |" in md
    assert "| spleen |" in md and "2 / 4 (50%) | 2 / 4 (50%) |" in md


def test_the_grid_report_shows_failure_shares_per_organ_over_seeds():
    rows = [{"scenario": "complete", "method": "fedgin", "seed": seed, "modality": "MRI", "case": f"c{i}",
             "organ": "spleen", **c} for seed in (0, 1) for i, c in enumerate(CASES)]
    table = aggregate(rows)
    outcomes = table["complete"]["fedgin"]["MRI"]["spleen"]["outcomes"]
    assert outcomes["present"] == 8 and outcomes["hd95_above_50mm"] == 4
    lines = _failure_table(table["complete"], ["fedgin"], "MRI", SCHEME)
    assert any(line.startswith("| fedgin |") and "50% / 50%" in line for line in lines)
