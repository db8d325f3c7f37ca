"""Tiny real-data training configs: a few images per class and split, one epoch at 64 px,
each recipe as shipped apart from that. Shared by the training tests; imports nothing of the
service, so the training tests also run where only torch is installed (a GPU machine)."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from tests.data_paths import require_data

# Every seed method at once, each at its smallest setting.
ALL_METHODS = {
    "pretrain": {"enabled": True, "epochs": 1},
    "shift": {"enabled": True},
    "negatives": {"enabled": True, "clusters": 3},
    "curriculum": {"enabled": True},
}


def subset_csv(src_root: Path, csv_name: str, label_col: str, out: Path, per_class: dict) -> None:
    with (src_root / csv_name).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked, taken = [], {}
    for row in rows:
        key = (row[label_col], row["split"])
        if taken.get(key, 0) < per_class[row["split"]]:
            taken[key] = taken.get(key, 0) + 1
            picked.append({**row, "path": str(src_root / row["path"])})
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(picked[0]))
        writer.writeheader()
        writer.writerows(picked)


def smoke_config(tmp: Path, name: str) -> Path:
    counts = {"train": 6, "val": 3, "test": 2}
    if name == "hk":
        src = require_data("hyperkvasir-lgi")
        subset_csv(src, "labels.csv", "class", tmp / "hk.csv", counts)
        raw = yaml.safe_load((Path("training/configs/hyperkvasir-lgi-v1.yaml")).read_text())
        raw["model"].update(finetune_from_block=14)  # exercise the fine-tuned tail path
    elif name == "hk2":
        # The shipped endoscopy recipe as it is: whole backbone, capture augmentation,
        # field-of-view preprocessing (version 2).
        src = require_data("hyperkvasir-lgi")
        subset_csv(src, "labels.csv", "class", tmp / "hk2.csv", counts)
        raw = yaml.safe_load((Path("training/configs/hyperkvasir-lgi.yaml")).read_text())
        assert raw["model"]["finetune_from_block"] == 0 and raw["image"]["preprocessing"] == 2
    elif name == "ham2":
        # The full fine-tune with tabular fields, dermoscopy augmentation and calibration
        # that may add class biases: biases must reach the graph and the served answer.
        src = require_data("ham10000")
        subset_csv(src, "metadata.csv", "dx", tmp / "ham2.csv", counts)
        raw = yaml.safe_load((Path("training/configs/ham10000-v2.yaml")).read_text())
        raw["model"].update(layers=1)
    else:
        src = require_data("ham10000")
        subset_csv(src, "metadata.csv", "dx", tmp / f"{name}.csv", counts)
        raw = yaml.safe_load((Path("training/configs/ham10000.yaml")).read_text())
        raw["model"].update(finetune_from_block=None, layers=1)  # frozen pooled-feature path
    if name == "methods":
        # Every training option at once, on the fine-tuned tail: the export contract must not
        # change whatever the options.
        raw["model"].update(finetune_from_block=14)
        raw["train"].update(label_fraction=0.5)
        raw["methods"] = ALL_METHODS
    raw["name"] = f"smoke-{name}"
    raw["dataset"].update(root=str(tmp), csv=f"{name}.csv")
    raw["image"].update(height=64, width=64, views=["orig", "hflip"])
    raw["train"].update(epochs=1, batch_size=16)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
