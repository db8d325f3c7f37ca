"""Train a fused classifier: reads top to bottom, config -> data -> features -> model -> loop
-> calibration. Interrupt it and run the same command again: it resumes from the last epoch."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from service.tabular import TabularSchema
from training.augment import make_augment
from training.backbone import load_pretrained
from training.calibrate import fit_calibration, fit_per_pattern
from training.config import Config, load_config
from training.curriculum import curriculum_order, difficulty, progress, sample_order
from training.data import Table, fit_schema, load_split, read_rows
from training.device import cpu_state, cpu_tree, describe, resolve
from training.features import FeatureSet, cached_features
from training.images import AugmentedImages, pixel_set
from training.model import BackboneTail, FusionModel, set_tail_mode
from training.objectives import Auxiliary, build_auxiliary, make_batch, train_step
from training.patterns import PATTERN_NAMES
from training.pretrain import pretrain, pretrain_pixels
from training.scoring import (
    collect_logits,
    evaluate,
    score,
    selection_score,
    true_class_probabilities,
)

CACHE_DIR = Path(os.environ.get("ENDOFUSE_CACHE_DIR", ".cache/features"))


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def build_model(cfg: Config, n_classes: int, schema: Any) -> FusionModel:
    tail = None
    if cfg.model.finetune_from_block is not None:
        tail = BackboneTail(
            load_pretrained(variant=cfg.model.backbone), cfg.model.finetune_from_block
        )
    return FusionModel(n_classes, schema, cfg.model, tail)


@dataclass
class Data:
    """Everything a run reads from disk: splits, tabular schema, cached backbone features."""

    schema: TabularSchema | None
    tables: dict[str, Table]
    feats: dict[str, FeatureSet | AugmentedImages]


def load_data(cfg: Config) -> Data:
    rows = read_rows(cfg.dataset)
    schema = fit_schema(cfg.dataset, rows) if cfg.use_tabular else None
    tables = {s: load_split(cfg.dataset, s, schema, rows) for s in ("train", "val", "test")}
    spec = cfg.image.spec()
    if cfg.model.finetune_from_block == 0:
        # Full fine-tune: pixels, not cached features; training frames augmented every step.
        augment = (
            make_augment(cfg.image.augment_recipe, cfg.image.augment_params)
            if cfg.image.augment
            else None
        )
        feats = {
            "train": AugmentedImages.load(tables["train"].paths, spec, augment),
            **{s: pixel_set(tables[s].paths, spec, f"decode {s}") for s in ("val", "test")},
        }
        return Data(schema, tables, feats)
    backbone = load_pretrained(variant=cfg.model.backbone)
    feats = {
        s: cached_features(
            backbone,
            t.paths,
            spec,
            cfg.image.views if s == "train" else ("orig",),
            cfg.model.finetune_from_block,
            CACHE_DIR / cfg.name,
            f"features {s}",
        )
        for s, t in tables.items()
    }
    return Data(schema, tables, feats)


def labelled_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified share of the training rows whose labels are used (at least 2 per class)."""
    if fraction >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, 7919])
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = min(len(rows), max(2, round(fraction * len(rows))))
        keep.append(rng.choice(rows, size=n, replace=False))
    return np.sort(np.concatenate(keep))


def epoch_order(
    cfg: Config,
    model: FusionModel,
    data: Data,
    labelled: np.ndarray,
    epoch: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Training rows for one epoch: natural/balanced sampling, or the CLIMD curriculum."""
    labels = data.tables["train"].labels[labelled]
    cc = cfg.methods.curriculum
    if not cc.enabled:
        return labelled[sample_order(labels, cfg.train.class_balance, rng)]
    p_fused, p_uni = true_class_probabilities(
        model, data.feats["train"], data.tables["train"], labelled
    )
    d = difficulty(p_fused, p_uni, cc.complementarity_weight)
    t = progress(epoch, cfg.train.epochs, cc.full_at)
    return labelled[curriculum_order(labels, d, t, cc.start_fraction, rng)]


def fit(
    cfg: Config,
    data: Data,
    run_dir: Path,
    stop_after: int | None = None,
    device: str = "cpu",
) -> dict[str, Any] | None:
    """Train (resuming from ``run_dir`` if it holds a checkpoint), calibrate, report.
    ``stop_after`` ends the session after that many epochs in all, the label-free stage's
    included (None: train to the end). ``device``: cpu, cuda or auto; not part of the
    config, since a run may resume on another device."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    rng = np.random.default_rng(tc.seed)
    tables, feats = data.tables, data.feats
    train = tables["train"]
    n_classes = len(train.label_names)
    schema = data.schema
    (run_dir / "schema.json").write_text(json.dumps(schema.to_manifest() if schema else None))
    labelled = labelled_rows(train.labels, tc.label_fraction, tc.seed)

    # --- model, training-only parts and optimiser
    dev = resolve(device)
    model = build_model(cfg, n_classes, schema).to(dev)
    aux: Auxiliary = build_auxiliary(cfg, model)
    tail_params = list(model.tail.parameters()) if model.tail is not None else []
    tail_ids = {id(p) for p in tail_params}
    head_params = [p for p in model.parameters() if id(p) not in tail_ids] + aux.parameters()
    optimizer = torch.optim.AdamW(
        [{"params": head_params, "lr": tc.lr}, {"params": tail_params, "lr": tc.backbone_lr}],
        weight_decay=tc.weight_decay,
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = math.ceil(len(labelled) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    start_epoch, best, history = 0, -1.0, []
    started = time.time()
    last = run_dir / "ckpt_last.pt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        print(f"resuming {run_dir} at epoch {start_epoch + 1}/{tc.epochs}")
    elif tc.init_from:
        warm = torch.load(
            Path(tc.init_from) / "ckpt_best.pt", map_location="cpu", weights_only=False
        )
        model.load_state_dict(warm["model"])
        print(f"starting from {tc.init_from} (its epoch {warm['epoch']})")
    elif cfg.methods.pretrain.enabled:
        # --- label-free stage over every training image, labelled or not
        stage = pretrain_pixels if isinstance(feats["train"], AugmentedImages) else pretrain
        losses = stage(
            model, cfg, feats["train"], train, rng, run_dir / "ckpt_pretrain.pt", stop_after
        )
        if losses is None:
            return None  # checkpointed mid-stage; the same call resumes there
        (run_dir / "pretrain.json").write_text(json.dumps(losses, indent=2))

    # --- training loop
    n_views = feats["train"].n_views
    metric = tc.select_metric
    # ``stop_after`` counts the label-free stage's epochs first, then the fine-tune's.
    before = cfg.methods.pretrain.epochs if cfg.methods.pretrain.enabled and not tc.init_from else 0
    for epoch in range(start_epoch, tc.epochs):
        if stop_after is not None and before + epoch >= stop_after:
            return None  # checkpointed; the same call resumes here
        # Every epoch's randomness comes from (seed, epoch) alone: a resumed run draws exactly
        # what an uninterrupted one would have.
        rng = np.random.default_rng([tc.seed, epoch])
        torch.manual_seed(tc.seed * 100_003 + epoch)
        order = epoch_order(cfg, model, data, labelled, epoch, rng)
        model.train()
        set_tail_mode(model)
        views = rng.integers(0, n_views, len(order))
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step")
        for step in bar:
            sl = slice(step * tc.batch_size, (step + 1) * tc.batch_size)
            factor = lr_factor(epoch * steps_per_epoch + step, total_steps, steps_per_epoch)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            batch = make_batch(order[sl], views[sl], feats["train"], train, model, cfg, rng)
            loss, parts = train_step(model, cfg, batch, aux)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
        val = evaluate(model, feats["val"], tables["val"])
        val_score = selection_score(val, metric)
        history.append(
            {
                "epoch": epoch + 1,
                f"val_{metric}": val_score,
                "val": {
                    p: {k: r[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "ece_15")}
                    for p, r in val.items()
                },
            }
        )
        print(f"epoch {epoch + 1}: val {metric} {val_score:.4f}")
        if val_score > best:
            best = val_score
            torch.save({"model": cpu_state(model), "epoch": epoch + 1}, run_dir / "ckpt_best.pt")
        torch.save(
            {
                "model": cpu_state(model),
                "optimizer": cpu_tree(optimizer.state_dict()),
                "epoch": epoch,
                "best": best,
                "history": history,
            },
            last,
        )
        (run_dir / "history.json").write_text(json.dumps(history, indent=2))

    # --- calibration per missingness pattern, fitted on val (or train + val, where val says)
    best_state = torch.load(run_dir / "ckpt_best.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(best_state["model"])
    val_logits = collect_logits(model, feats["val"], tables["val"])
    test_logits = collect_logits(model, feats["test"], tables["test"])
    fit_args = stacked(val_logits, tables["val"])
    if tc.calibration == "auto":
        groups = tables["val"].groups
        params = fit_calibration(
            *fit_args,
            groups=None if groups is None else np.tile(groups, len(val_logits)),
            train=training_rows(model, feats["train"], tables["train"], labelled),
        )
    else:
        params = {
            name: {"temperature": t, "bias": [0.0] * n_classes, "method": "TS"}
            for name, t in fit_per_pattern(*fit_args).items()
        }
    if schema is None:
        params = {name: params["all"] for name in PATTERN_NAMES}
    temps = {name: p["temperature"] for name, p in params.items()}
    biases = {name: p["bias"] for name, p in params.items()}
    report = {
        "temperatures": temps,
        "biases": biases,
        "calibration_methods": {name: p["method"] for name, p in params.items()},
        "calibration_data": {name: p.get("data", "val") for name, p in params.items()},
        "calibration_cv_nll": {name: p.get("cv_nll", {}) for name, p in params.items()},
        "val_uncalibrated": score(val_logits, tables["val"]),
        "val": score(val_logits, tables["val"], temps, biases),
        "test_uncalibrated": score(test_logits, tables["test"]),
        "test": score(test_logits, tables["test"], temps, biases),
        "best_epoch": best_state["epoch"],
        "labelled_rows": len(labelled),
        "train_seconds_this_session": round(time.time() - started, 1),
        "device": describe(dev),
        "torch": torch.__version__,
    }
    (run_dir / "calibration.json").write_text(json.dumps(params, indent=2))
    (run_dir / "results.json").write_text(json.dumps(report, indent=2))
    return report


def training_rows(
    model: FusionModel, feats: FeatureSet | AugmentedImages, table: Table, labelled: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(logits, labels, pattern ids) of the training frames as the service would see them
    (no augmentation), every pattern: candidates for the calibration fit, which keeps them
    only where val says they help. None when part of the labels is withheld from training
    (they are not to be read here either)."""
    if len(labelled) != len(table):
        return None
    if isinstance(feats, AugmentedImages):
        plain = feats.plain(np.arange(len(table)))[None]
        feats = FeatureSet(pooled=np.zeros((1, len(table), 0), np.float32), mid=plain)
    return stacked(collect_logits(model, feats, table), table)


def stacked(
    logits: dict[str, tuple[np.ndarray, np.ndarray]], table: Table
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``collect_logits``'s patterns as one set of rows: (logits, labels, pattern ids)."""
    return (
        np.concatenate([lg for lg, _ in logits.values()]),
        np.concatenate([table.labels for _ in logits]),
        np.concatenate([pid for _, pid in logits.values()]),
    )


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        raise SystemExit(f"{run_dir} holds a run with a different config; use another --run-dir")
    cfg.save(saved)


def main(
    config_path: Path,
    run_dir: Path | None = None,
    overrides: dict | None = None,
    stop_after: int | None = None,
    device: str = "cpu",
) -> Path:
    resolve(device)  # a missing GPU is refused before the run directory or any decoding
    cfg = load_config(config_path, overrides)
    run_dir = run_dir or Path("runs") / cfg.name
    prepare_run_dir(cfg, run_dir)
    report = fit(cfg, load_data(cfg), run_dir, stop_after, device)
    if report is None:
        print(f"stopped after epoch {stop_after}; the same command resumes {run_dir}")
        return run_dir
    for pattern, r in report["test"].items():
        print(
            f"test [{pattern}] acc {r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} "
            f"bal-acc {r['balanced_accuracy']:.4f} ECE {r['ece_15']:.4f}"
        )
    return run_dir
