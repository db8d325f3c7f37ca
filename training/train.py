"""Train a fused classifier: reads top to bottom, config -> data -> features -> model -> loop
-> calibration. Interrupt it and run the same command again: it resumes from the last epoch."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from service.preprocess import ImageSpec
from training.backbone import load_pretrained
from training.calibrate import fit_per_pattern, softmax, temperatures_for
from training.config import Config, load_config
from training.data import Table, fit_schema, load_split, read_rows
from training.features import FeatureSet, cached_features
from training.metrics import summarize
from training.model import BackboneTail, FusionModel, contrastive_loss
from training.patterns import (
    PATTERN_NAMES,
    apply_eval_pattern,
    eval_patterns,
    modality_dropout,
    pattern_ids,
)

CACHE_DIR = Path(os.environ.get("ENDOFUSE_CACHE_DIR", ".cache/features"))


@torch.no_grad()
def predict_logits(
    model: FusionModel, feats: FeatureSet, table: Table, pattern: str, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Logits for view 0 of every row under one pattern; also returns the pattern ids."""
    model.eval()
    has_tab = model.tabular is not None
    image_mask, tab_mask = apply_eval_pattern(pattern, table.mask if has_tab else None, len(table))
    source = feats.mid[0] if model.tail is not None else feats.pooled[0]
    out = []
    for s in range(0, len(table), batch):
        x = torch.from_numpy(np.asarray(source[s : s + batch], np.float32))
        values = torch.from_numpy(table.tabular[s : s + batch]) if has_tab else None
        mask = torch.from_numpy(tab_mask[s : s + batch]) if has_tab else None
        out.append(model(x, values, mask, torch.from_numpy(image_mask[s : s + batch])).numpy())
    return np.concatenate(out), pattern_ids(image_mask, tab_mask)


def collect_logits(
    model: FusionModel, feats: FeatureSet, table: Table
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Logits and pattern ids per evaluation pattern: computed once, scored many ways."""
    return {
        pattern: predict_logits(model, feats, table, pattern)
        for pattern in eval_patterns(model.tabular is not None)
    }


def score(
    logits: dict[str, tuple[np.ndarray, np.ndarray]],
    table: Table,
    temps: dict[str, float] | None = None,
) -> dict[str, Any]:
    results = {}
    for pattern, (lg, pids) in logits.items():
        t = temperatures_for(pids, temps) if temps else 1.0
        results[pattern] = summarize(softmax(lg, t), table.labels, table.label_names)
    return results


def evaluate(
    model: FusionModel, feats: FeatureSet, table: Table, temps: dict[str, float] | None = None
) -> dict[str, Any]:
    return score(collect_logits(model, feats, table), table, temps)


def selection_score(results: dict[str, Any], metric: str) -> float:
    used = [p for p in ("all", "image_only", "partial") if p in results]
    return float(np.mean([results[p][metric] for p in used]))


def sample_order(labels: np.ndarray, balance: float, rng: np.random.Generator) -> np.ndarray:
    """An epoch's sample order; ``balance`` interpolates natural (0) to class-balanced (1)."""
    if balance <= 0:
        return rng.permutation(len(labels))
    counts = np.bincount(labels)
    weights = counts[labels].astype(np.float64) ** -balance
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


def train_step(
    model: FusionModel, cfg: Config, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    pooled = model.image_features(batch["image"])
    ones = torch.ones(len(pooled), 1)
    full = model.encode(pooled, batch["values"], batch["mask"], ones)
    dropped = model.encode(pooled, batch["values"], batch["dropped_mask"], batch["image_mask"])
    y = batch["labels"]
    tc = cfg.train
    loss_fused = F.cross_entropy(model.head(dropped["fused"]), y)
    loss_uni = F.cross_entropy(model.image_head(full["image"]), y)
    if model.tabular_head is not None:
        loss_uni = loss_uni + F.cross_entropy(model.tabular_head(full["tabular"]), y)
    z_fused = model.projector(dropped["fused"])
    loss_con = contrastive_loss(z_fused, model.projector(full["image"]), tc.contrastive_temperature)
    if "tabular" in full:
        loss_con = loss_con + contrastive_loss(
            z_fused, model.projector(full["tabular"]), tc.contrastive_temperature
        )
    loss = loss_fused + tc.unimodal_loss_weight * loss_uni + tc.contrastive_weight * loss_con
    return loss, {
        "fused": loss_fused.item(),
        "unimodal": loss_uni.item(),
        "contrastive": loss_con.item(),
    }


def make_batch(
    idx: np.ndarray,
    views: np.ndarray,
    feats: FeatureSet,
    table: Table,
    model: FusionModel,
    cfg: Config,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    source = feats.mid if model.tail is not None else feats.pooled
    image = torch.from_numpy(np.asarray(source[views, idx], np.float32))
    has_tab = model.tabular is not None
    tab_mask = table.mask[idx] if has_tab else None
    image_mask, dropped = modality_dropout(
        tab_mask,
        len(idx),
        rng,
        cfg.train.p_image_only,
        cfg.train.p_tabular_only,
        cfg.train.p_partial_fields,
    )
    return {
        "image": image,
        "labels": torch.from_numpy(table.labels[idx]),
        "values": torch.from_numpy(table.tabular[idx]) if has_tab else None,
        "mask": torch.from_numpy(tab_mask) if has_tab else None,
        "dropped_mask": torch.from_numpy(dropped) if has_tab else None,
        "image_mask": torch.from_numpy(image_mask),
    }


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def build_model(cfg: Config, n_classes: int, schema: Any) -> FusionModel:
    tail = None
    if cfg.model.finetune_from_block is not None:
        tail = BackboneTail(load_pretrained(), cfg.model.finetune_from_block)
    return FusionModel(n_classes, schema, cfg.model, tail)


def set_tail_mode(model: FusionModel) -> None:
    # Fine-tune the tail's weights but keep its BatchNorm statistics from ImageNet: batches of
    # a few dozen images estimate them worse than the pretrained running averages.
    if model.tail is not None:
        for m in model.tail.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


def main(config_path: Path, run_dir: Path | None = None, overrides: dict | None = None) -> Path:
    cfg = load_config(config_path, overrides)
    run_dir = run_dir or Path("runs") / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        raise SystemExit(f"{run_dir} holds a run with a different config; use another --run-dir")
    cfg.save(saved)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    rng = np.random.default_rng(tc.seed)

    # --- data: splits, schema from the training split, cached backbone features
    rows = read_rows(cfg.dataset)
    schema = fit_schema(cfg.dataset, rows) if cfg.use_tabular else None
    tables = {s: load_split(cfg.dataset, s, schema, rows) for s in ("train", "val", "test")}
    spec = ImageSpec(cfg.image.height, cfg.image.width, cfg.image.mask_regions)
    backbone = load_pretrained()
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
    del backbone
    n_classes = len(tables["train"].label_names)
    (run_dir / "schema.json").write_text(json.dumps(schema.to_manifest() if schema else None))

    # --- model and optimiser
    model = build_model(cfg, n_classes, schema)
    tail_params = list(model.tail.parameters()) if model.tail is not None else []
    tail_ids = {id(p) for p in tail_params}
    head_params = [p for p in model.parameters() if id(p) not in tail_ids]
    optimizer = torch.optim.AdamW(
        [{"params": head_params, "lr": tc.lr}, {"params": tail_params, "lr": tc.backbone_lr}],
        weight_decay=tc.weight_decay,
    )
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = math.ceil(len(tables["train"]) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    start_epoch, best, history = 0, -1.0, []
    last = run_dir / "ckpt_last.pt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        rng = np.random.default_rng([tc.seed, start_epoch])
        print(f"resuming {run_dir} at epoch {start_epoch + 1}/{tc.epochs}")

    # --- training loop
    started = time.time()
    train, n_views = tables["train"], feats["train"].pooled.shape[0]
    metric = tc.select_metric
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        set_tail_mode(model)
        order = sample_order(train.labels, tc.class_balance, rng)
        views = rng.integers(0, n_views, len(order))
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step")
        for step in bar:
            sl = slice(step * tc.batch_size, (step + 1) * tc.batch_size)
            factor = lr_factor(epoch * steps_per_epoch + step, total_steps, steps_per_epoch)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            batch = make_batch(order[sl], views[sl], feats["train"], train, model, cfg, rng)
            loss, parts = train_step(model, cfg, batch)
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
            torch.save({"model": model.state_dict(), "epoch": epoch + 1}, run_dir / "ckpt_best.pt")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "best": best,
                "history": history,
            },
            last,
        )
        (run_dir / "history.json").write_text(json.dumps(history, indent=2))

    # --- calibration: one temperature per missingness pattern, fitted on validation
    model.load_state_dict(torch.load(run_dir / "ckpt_best.pt", weights_only=False)["model"])
    val_logits = collect_logits(model, feats["val"], tables["val"])
    test_logits = collect_logits(model, feats["test"], tables["test"])
    temps = fit_per_pattern(
        np.concatenate([lg for lg, _ in val_logits.values()]),
        np.concatenate([tables["val"].labels for _ in val_logits]),
        np.concatenate([pid for _, pid in val_logits.values()]),
    )
    if schema is None:
        temps = {name: temps["all"] for name in PATTERN_NAMES}
    report = {
        "temperatures": temps,
        "val_uncalibrated": score(val_logits, tables["val"]),
        "val": score(val_logits, tables["val"], temps),
        "test_uncalibrated": score(test_logits, tables["test"]),
        "test": score(test_logits, tables["test"], temps),
        "best_epoch": torch.load(run_dir / "ckpt_best.pt", weights_only=False)["epoch"],
        "train_seconds_this_session": round(time.time() - started, 1),
        "device": f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    (run_dir / "calibration.json").write_text(json.dumps(temps, indent=2))
    (run_dir / "results.json").write_text(json.dumps(report, indent=2))
    for pattern, r in report["test"].items():
        print(
            f"test [{pattern}] acc {r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} "
            f"bal-acc {r['balanced_accuracy']:.4f} ECE {r['ece_15']:.4f}"
        )
    return run_dir
