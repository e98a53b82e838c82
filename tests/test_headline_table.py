"""The README's headline table is drawn from an experiment's results.json."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "headline_table.py"
spec = importlib.util.spec_from_file_location("headline_table", SCRIPT)
headline_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(headline_table)


def _stat(mean, sd=0.0, seeds=2):
    return {"mean": {"dice": {"mean": mean, "sd": sd, "seeds": seeds}}}


def test_one_row_per_method_with_mean_and_sd_per_scenario_and_modality():
    results = {"scenarios": ["complete"], "methods": ["fedavg", "fedgin"], "seeds": 2,
               "table": {"complete": {"fedavg": {"CT": _stat(0.81234, 0.0123), "MRI": _stat(0.7)},
                                      "fedgin": {"CT": _stat(None), "MRI": _stat(0.75, 0.01)}}}}
    lines = headline_table.headline(results).splitlines()
    assert lines[0] == "| method | complete: CT | complete: MRI |"
    assert lines[2] == "| fedavg | 0.812 ± 0.012 | 0.700 ± 0.000 |"
    assert lines[3] == "| fedgin | - | 0.750 ± 0.010 |"
    results["seeds"] = 1  # one seed has no sd
    assert headline_table.headline(results).splitlines()[2] == "| fedavg | 0.812 | 0.700 |"
