"""Ablation of the training methods: each alone and all together vs the plain recipe, on every
dataset setting, at full and reduced labels, over several seeds -> ``docs/ablation.md``.

    endofuse ablate --out docs/ablation.md            # the whole grid (resumes)
    endofuse ablate --settings hk --fractions 0.1 --seeds 1 --epochs 3   # a quick look

Every run lands in ``runs/ablation/<setting>/<labels>/<variant>/seed<k>`` and is skipped when
its ``results.json`` exists, so an interrupted grid picks up where it stopped. The recipe is the
CPU-scaled one: frozen backbone (pooled features at the config's resolution, cached once),
the same epochs for every run; only the method switches differ between rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training import train
from training.config import load_config

CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Setting:
    title: str
    config: Path
    overrides: dict[str, Any]


SETTINGS = {
    "hk": Setting("HyperKvasir-LGI (image only)", CONFIGS / "hyperkvasir-lgi-v1.yaml", {}),
    "ham": Setting("HAM10000, image + tabular", CONFIGS / "ham10000.yaml", {}),
    "ham-image": Setting("HAM10000, image only", CONFIGS / "ham10000.yaml", {"use_tabular": False}),
}

# arXiv 2509.18284's parts of the base recipe, switched off together for one row.
NO_BASE = {
    "train.p_image_only": 0.0,
    "train.p_tabular_only": 0.0,
    "train.p_partial_fields": 0.0,
    "train.contrastive_weight": 0.0,
}
ALL_FOUR = {
    "methods.pretrain.enabled": True,
    "methods.shift.enabled": True,
    "methods.negatives.enabled": True,
    "methods.curriculum.enabled": True,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    # CLIMD starts class-balanced: this row separates its curriculum from plain rebalancing.
    "plain, class-balanced sampling": {"train.class_balance": 0.5},
    "- modality dropout & fused contrastive": NO_BASE,
    "+ MICS pretraining": {"methods.pretrain.enabled": True},
    "+ distribution shift": {"methods.shift.enabled": True},
    "+ CM-CGNS negatives": {"methods.negatives.enabled": True},
    "+ CLIMD curriculum": {"methods.curriculum.enabled": True},
    "+ all four": ALL_FOUR,
}
CONCLUSIONS = "## Conclusions"
METRICS = (("macro_f1", "macro-F1"), ("balanced_accuracy", "bal. acc."), ("ece_15", "ECE"))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def run_one(
    key: str, fraction: float, variant: str, seed: int, epochs: int, threads: int, cache: dict
) -> dict[str, Any]:
    setting = SETTINGS[key]
    run_dir = Path("runs/ablation") / key / f"labels-{fraction:g}" / slug(variant) / f"seed{seed}"
    done = run_dir / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = {
        **setting.overrides,
        "model.finetune_from_block": None,
        "train.epochs": epochs,
        "train.seed": seed,
        "train.label_fraction": fraction,
        "train.threads": threads,
        **VARIANTS[variant],
    }
    cfg = load_config(setting.config, overrides)
    data_key = (cfg.name, cfg.use_tabular)
    if data_key not in cache:
        cache.clear()  # one dataset in memory at a time
        cache[data_key] = train.load_data(cfg)
    train.prepare_run_dir(cfg, run_dir)
    started = time.time()
    report = train.fit(cfg, cache[data_key], run_dir)
    report["wall_seconds"] = round(time.time() - started, 1)
    done.write_text(json.dumps(report, indent=2))
    return report


def cell(values: list[float], digits: int = 3) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table(key: str, fraction: float, runs: dict[str, list[dict]]) -> list[str]:
    tabular = SETTINGS[key].overrides.get("use_tabular", True) and key != "hk"
    head = [name for _, name in METRICS] + (["bal. acc., no tabular"] if tabular else [])
    lines = [
        f"| variant | {' | '.join(head)} | Δ bal. acc. | train s |",
        "|---|" + "---|" * (len(head) + 2),
    ]
    plain = np.mean([r["test"]["all"]["balanced_accuracy"] for r in runs["plain"]])
    for variant, reports in runs.items():
        cells = [cell([r["test"]["all"][m] for r in reports]) for m, _ in METRICS]
        if tabular:
            cells.append(cell([r["test"]["image_only"]["balanced_accuracy"] for r in reports]))
        seconds = np.mean([r["wall_seconds"] for r in reports])
        bal = np.mean([r["test"]["all"]["balanced_accuracy"] for r in reports])
        delta = "" if variant == "plain" else f"{bal - plain:+.3f}"
        lines.append(f"| {variant} | {' | '.join(cells)} | {delta} | {seconds:.0f} |")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for k, _ in results))
    fractions = list(dict.fromkeys(f for _, f in results))
    fig, axes = plt.subplots(
        len(keys), len(fractions), figsize=(5.5 * len(fractions), 3.2 * len(keys)), squeeze=False
    )
    for (key, fraction), runs in results.items():
        ax = axes[keys.index(key)][fractions.index(fraction)]
        names = list(runs)
        bal = [[r["test"]["all"]["balanced_accuracy"] for r in runs[n]] for n in names]
        means, stds = [float(np.mean(b)) for b in bal], [float(np.std(b)) for b in bal]
        ax.barh(range(len(names)), means, xerr=stds, color="#4c72b0")
        ax.axvline(means[0], color="k", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), names if fractions.index(fraction) == 0 else [])
        ax.invert_yaxis()
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        ax.set_xlim(max(0.0, lo - 0.05), min(1.0, max(means) + 0.05))
        ax.set_title(f"{SETTINGS[key].title}, {fraction:.0%} labels", fontsize=9)
        ax.set_xlabel("test balanced accuracy (all inputs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    settings: list[str],
    fractions: list[float],
    seeds: int,
    epochs: int,
    threads: int,
    out: Path | None,
    command: str,
) -> None:
    cache: dict = {}
    results: dict[tuple[str, float], dict[str, list[dict]]] = {}
    total = len(settings) * len(fractions) * len(VARIANTS) * seeds
    done = 0
    for key in settings:
        for fraction in fractions:
            runs = results.setdefault((key, fraction), {})
            for variant in VARIANTS:
                for seed in range(seeds):
                    done += 1
                    print(f"[ablation {done}/{total}] {key} labels={fraction:g} {variant} s{seed}")
                    report = run_one(key, fraction, variant, seed, epochs, threads, cache)
                    runs.setdefault(variant, []).append(report)
    lines = [
        "# Ablation: the training methods on the real data",
        "",
        f"Command: `{command}`",
        "",
        f"CPU-scaled recipe, identical for every row: frozen EfficientNet-Lite0 (pooled features "
        f"at each config's resolution), fusion model trained {epochs} epochs, {seeds} seeds "
        "(the seed also draws the labelled subset), per-pattern temperatures fitted on val. "
        "Test split, all inputs present, mean ± std over seeds; Δ is the change in mean balanced "
        "accuracy against plain. `train s` is wall time per run (pretraining included).",
        "",
    ]
    for (key, fraction), runs in results.items():
        lines += [
            f"## {SETTINGS[key].title}, {fraction:.0%} labels",
            "",
            *table(key, fraction, runs),
        ]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written by people, not by this command: keep it across reruns.
        if out.is_file() and CONCLUSIONS in out.read_text():
            text += "\n" + CONCLUSIONS + out.read_text().split(CONCLUSIONS, 1)[1]
        out.write_text(text)
        plot(results, out.with_suffix(".png"))
