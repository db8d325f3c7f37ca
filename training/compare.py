"""Train named variants of one config and tabulate their val and test metrics per pattern.

    python -m training.compare --config training/configs/ham10000.yaml \\
        --variant fused: --variant image-only:use_tabular=false \\
        --variant mlp:model.fusion=mlp --out docs/comparisons/ham10000.md

Each variant is ``name:key=value,key=value`` (dotted keys into the YAML). Runs land in
``runs/compare/<config name>/<variant>`` and resume like any training run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from training import train

METRICS = ("balanced_accuracy", "macro_f1", "accuracy", "ece_15")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, assignments = text.partition(":")
    overrides = {}
    for item in filter(None, assignments.split(",")):
        key, _, raw = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(raw)
    return name, overrides


def table(results: dict[str, dict], split: str) -> list[str]:
    lines = [
        f"| variant | pattern | {' | '.join(METRICS)} |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for name, report in results.items():
        for pattern, r in report[split].items():
            cells = " | ".join(f"{r[m]:.4f}" for m in METRICS)
            lines.append(f"| {name} | {pattern} | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (as endofuse train)")
    args = parser.parse_args()
    name = yaml.safe_load(args.config.read_text())["name"]
    results = {}
    for spec in args.variant:
        variant, overrides = parse_variant(spec)
        run_dir = Path("runs/compare") / name / variant
        train.main(args.config, run_dir, overrides, device=args.device)
        results[variant] = json.loads((run_dir / "results.json").read_text())
    command = (
        "python -m training.compare --config "
        + str(args.config)
        + " "
        + " ".join(f"--variant '{v}'" for v in args.variant)
    )
    lines = [
        f"# {name}: variant comparison",
        "",
        f"Command: `{command}`",
        "",
        "Selection happens on **val**; test is reported once, for the record.",
        "",
        "## val (calibrated)",
        "",
        *table(results, "val"),
        "",
        "## test (calibrated)",
        "",
        *table(results, "test"),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
