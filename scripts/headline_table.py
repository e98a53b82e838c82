"""Print the README's headline table (mean test Dice over liver, kidneys and spleen per scenario and
modality, mean ± sd over seeds) from an experiment's ``results.json``.

Usage: ``python scripts/headline_table.py docs/results/abdomen-ct-mr/results.json``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODALITIES = ("CT", "MRI")


def cell(stat: dict | None, seeds: int) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.3f}" if seeds < 2 else f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def headline(results: dict) -> str:
    scenarios, seeds = results["scenarios"], results["seeds"]
    head = ["method"] + [f"{s}: {m}" for s in scenarios for m in MODALITIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in results["methods"]:
        cells = [cell(results["table"][s].get(method, {}).get(m, {}).get("mean", {}).get("dice"), seeds)
                 for s in scenarios for m in MODALITIES]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    print(headline(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
