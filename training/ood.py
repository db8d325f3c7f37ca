"""Out-of-distribution flag: choose its signals and fit its threshold on val, measure it on
inputs the model was never meant for. Torch-free.

The signals are the graph's feature distances where it has them (each layer kept only if
capture changes leave it in range), else the energy of the logits. The threshold is fitted
per missingness pattern so that 95 % of in-distribution inputs pass, with probability 0.8
over the val draw. Measured as AUROC
(in-distribution test inputs against each out-of-distribution set; 1.0 = always told apart)
and as the share of inputs flagged: the other bundled dataset's images, natural photographs
(the sample images inside matplotlib, several crops each), blank, solid and noise images, and
the test split under heavy capture shift. Also the bookkeeping of the graph's distance layers
across refits (which were taken out, and why).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.decision import is_uniform, ood_score, ood_signals, signal_column
from service.manifest import load_manifest
from service.preprocess import decode_image
from training import audit, ood_embed
from training.config import load_config
from training.data import DatasetSpec, load_split, read_rows
from training.decision_plots import roc_points
from training.evaluate import run_session
from training.metrics import auroc
from training.ranks import confident_rank, conformal_rank, exceed_tail

PASS_RATE = 0.95
# P(the served threshold lets PASS_RATE of new in-distribution inputs through) over the val
# draw, as the class-conditional sets' CLASS_CONFIDENCE: at the plain rank a given val draw
# falls short about half the time, and a clinic would see more false flags than stated.
PASS_CONFIDENCE = 0.8


# A distance layer that flags more than twice the nominal share of val frames once they are
# re-captured (letterbox, JPEG) reads the capture, not the content: it is left out.
SHIFT_TOLERANCE = 2 * (1 - PASS_RATE)


def pass_threshold(
    scores: np.ndarray, rate: float = PASS_RATE, confidence: float | None = None
) -> float:
    """The split-conformal quantile: the ceil((n + 1) rate)-th smallest val score, so that a
    new in-distribution input passes with probability at least ``rate`` on average over val
    draws (the plain sample quantile falls short by up to 1/n). With ``confidence``, the rank
    is raised until ``rate`` passes with that probability over the draw, at most to the
    largest val score."""
    n = len(scores)
    k = min(conformal_rank(n, rate), n)
    if confidence:
        k = max(k, min(confident_rank(n, rate, confidence), n))
    return float(np.sort(scores)[k - 1])


def choose_signals(
    val_rows: np.ndarray,
    shifted_rows: np.ndarray | None,
    n_labels: int,
    dims: list[int] | None = None,
) -> tuple[list[str], dict[str, float]]:
    """The signals the score combines, and each distance's share of capture-shifted val
    frames above its own val 95 % quantile.

    Where the graph has feature distances the energy of the logits is not used: on the
    bundled models it added no separation from the other modality over the pooled distance,
    and on ham10000/2 lowered it (docs/training.md, "Out of distribution"). Each distance
    layer is kept when capture changes that carry no diagnosis leave it in range; if none
    is (a model that reads the capture), the energy score stands in, as without distances.

    With the layers' widths ``dims``, only the narrowest layer that passes is used: the
    distance reads a D x D matrix for every image, and at D = 1,280 (the final pooling)
    that is 6.5 MB and about 3 % of a batch-1 CPU inference (``bench/ood_cost.py``), while
    on hyperkvasir-lgi/2 the 112 channels of stage 5 alone told every out-of-distribution
    set apart as well (docs/training.md)."""
    val = ood_signals(val_rows, n_labels)
    distances = [k for k in val if k.startswith("distance")]
    if not distances:
        return ["energy"], {}
    rates: dict[str, float] = {}
    kept = distances
    if shifted_rows is not None:
        shifted = ood_signals(shifted_rows, n_labels)
        rates = {k: float(np.mean(shifted[k] > pass_threshold(val[k]))) for k in distances}
        kept = [k for k in distances if rates[k] <= SHIFT_TOLERANCE]
    if not kept:
        return ["energy"], rates
    if dims:
        kept = [min(kept, key=lambda k: dims[signal_column(k)])]
    return kept, rates


def fit_thresholds(
    val_logits: dict[str, np.ndarray],
    n_labels: int,
    shifted_rows: np.ndarray | None = None,
    layer_names: list[str] | None = None,
    layer_dims: list[int] | None = None,
    prototypes: int = 1,
) -> dict[str, Any]:
    """Per pattern, the score threshold that lets 95 % of new in-distribution inputs pass,
    with probability ``PASS_CONFIDENCE`` over the val draw. With the graph's distances
    (on patterns that carry an image), each chosen signal (``choose_signals``, judged on
    ``shifted_rows``: image-only val frames under heavy capture shift) is first scaled by
    its val median and 95 % quantile, and the score is the largest (``ood_score``). Layers
    the score does not read are listed under ``unused`` (``training.conformal.main`` takes them
    out of the graph)."""
    block: dict[str, Any] = {
        "score": "energy",
        "pass_rate": PASS_RATE,
        "pass_confidence": PASS_CONFIDENCE,
        "thresholds": {},
    }
    image_pattern = "image_only" if "image_only" in val_logits else "all"
    chosen, rates = choose_signals(val_logits[image_pattern], shifted_rows, n_labels, layer_dims)
    scale: dict[str, dict[str, list[float]]] = {}
    for pattern, rows in val_logits.items():
        signals = ood_signals(rows, n_labels)
        if chosen != ["energy"] and pattern != "tabular_only":
            scale[pattern] = {
                k: [float(np.median(signals[k])), float(np.quantile(signals[k], PASS_RATE))]
                for k in chosen
            }
        score = ood_score(signals, scale.get(pattern))
        block["thresholds"][pattern] = pass_threshold(score, confidence=PASS_CONFIDENCE)
    names = layer_names or []

    def layer(key: str) -> str:
        j = signal_column(key)
        return names[j] if j < len(names) else key

    if scale:
        block["score"] = (
            "largest scaled Mahalanobis distance of image features ("
            + ", ".join(layer(k) for k in chosen)
            + "), scaled on val"
            + (f", to the nearest of {prototypes} prototypes per class" if prototypes > 1 else "")
        )
        block["scale"] = scale
        block["signals"] = chosen
        columns = [k for k in ood_signals(val_logits[image_pattern], n_labels) if k != "energy"]
        block["unused"] = {
            layer(k): "moves under capture change"
            if rates.get(k, 0.0) > SHIFT_TOLERANCE
            else "a narrower layer passes the capture test"
            for k in columns
            if k not in chosen
        }
    elif rates:
        block["score"] = "energy (every feature distance moved under capture change)"
    if rates:
        block["capture_shift_flagged"] = {layer(k): round(v, 4) for k, v in rates.items()}
    return block


def separation(inside: np.ndarray, outside: np.ndarray) -> float:
    """AUROC: P(score of an outside input > score of an inside one), ties counted half."""
    positive = np.r_[np.zeros(len(inside), bool), np.ones(len(outside), bool)]
    return auroc(np.concatenate([inside, outside]), positive)


def against_val(
    val_rows: np.ndarray,
    n_labels: int,
    threshold: float,
    scale: dict[str, tuple[float, float]] | None,
    flagged: int,
    n_in: int,
) -> dict[str, Any]:
    """How many val inputs lie above the threshold, and the probability that ``flagged`` or
    more of ``n_in`` in-distribution inputs would be flagged were they drawn as val was (a
    test share above the nominal 5 % is a fact about the test draw when that is large)."""
    above = int(np.sum(ood_score(ood_signals(val_rows, n_labels), scale) > threshold))
    n = len(val_rows)
    return {
        "val_above": above,
        "n_val": n,
        "p_as_many_flagged": exceed_tail(n, n - above, n_in, flagged),
    }


def flagged_by_label(
    val_out: dict[str, tuple[np.ndarray, np.ndarray]],
    manifest: Any,
    params: Any,
    uniform: np.ndarray,
) -> dict[str, dict[str, list[int]]]:
    """Per pattern and per label the response would name, how many val inputs (all in
    distribution) the served flag marks: [flagged, n]. A flag on an answer of a label whose
    own val cases are often flagged says less than one on a label the flag seldom marks
    (on ham10000/2's test split, 30 % of vasc lesions against 2 % of nv), and a clinician
    seeing the flag should know which. Val, not test: these are served parameters."""
    out: dict[str, dict[str, list[int]]] = {}
    for pattern, (probs, rows) in val_out.items():
        scale = params.ood_scale.get(pattern) if params.ood_scale else None
        score = ood_score(ood_signals(rows, len(manifest.labels)), scale)
        flagged = score > params.ood_thresholds[pattern]
        if pattern != "tabular_only":  # the service flags a flat image whatever its score
            flagged |= uniform
        named = manifest.label_rule.pick(probs)
        out[pattern] = {
            label: [int(flagged[named == k].sum()), int((named == k).sum())]
            for k, label in enumerate(manifest.labels)
        }
    return out


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def synthetic_inputs(seed: int = 0) -> dict[str, list[bytes]]:
    rng = np.random.default_rng(seed)
    solid = [
        Image.new("RGB", (320, 256), tuple(int(c) for c in rng.integers(0, 256, 3)))
        for _ in range(20)
    ]
    noise = [
        Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)) for _ in range(20)
    ]
    blank = [Image.new("RGB", (320, 256), (v, v, v)) for v in (0, 128, 255)]
    return {
        "solid colours": [_jpeg(i) for i in solid],
        "noise": [_jpeg(i) for i in noise],
        "blank (black, grey, white)": [_jpeg(i) for i in blank],
    }


def natural_photographs() -> list[bytes]:
    """The photographs matplotlib ships, each as several crops and scales."""
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "sample_data"
    out = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        path = root / name
        if not path.is_file():
            continue
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        w, h = rgb.size
        for scale in (1.0, 0.8, 0.6):
            for fx, fy in ((0.5, 0.5), (0.3, 0.3), (0.7, 0.7)):
                cw, ch = int(w * scale), int(h * scale)
                x0, y0 = int((w - cw) * fx), int((h - ch) * fy)
                out.append(_jpeg(rgb.crop((x0, y0, x0 + cw, y0 + ch))))
    return out


def other_dataset_images(spec: DatasetSpec, n: int = 300) -> list[bytes]:
    table = load_split(spec, "test", None, read_rows(spec))
    pick = np.linspace(0, len(table) - 1, min(n, len(table))).astype(int)
    return [table.paths[i].read_bytes() for i in pick]


def logits_of(session: Any, manifest: Any, frames: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Image-only requests (no tabular fields), as a client posting just a picture sends: the
    logits rows (with the graph's distance, if any) and which inputs are one flat colour."""
    images = np.stack([decode_image(f, manifest.image, 100_000_000) for f in frames])
    n_fields = len(manifest.tabular.fields) if manifest.tabular else 0
    zeros = np.zeros((len(frames), n_fields), np.float32)
    ones = np.ones((len(frames), 1), np.float32)
    rows = run_session(session, images, zeros, zeros, ones, with_distance=True)[1]
    return rows, np.array([is_uniform(im) for im in images])


def study(
    session: Any, manifest: Any, in_logits: np.ndarray, in_uniform: np.ndarray,
    outside: dict[str, list[bytes]], threshold: float,
    scale: dict[str, tuple[float, float]] | None = None,
    in_labels: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """AUROC and share flagged per set, scored as the service scores: a flat-colour image
    is flagged whatever its score (ranked above every other input). With ``in_labels``, the
    in-distribution inputs flagged per true class ([flagged, n])."""
    n_labels = len(manifest.labels)

    def scores(rows: np.ndarray, uniform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = ood_score(ood_signals(rows, n_labels), scale)
        return np.where(uniform, np.inf, s), (s > threshold) | uniform

    inside, in_flagged = scores(in_logits, in_uniform)
    out: dict[str, Any] = {
        "in_distribution_flagged": float(in_flagged.mean()),
        "n_in": len(inside),
        "sets": {},
        "roc": {},
    }
    if in_labels is not None:
        # A class whose own images are flagged more often is referred more often for no
        # fault of the input: the share per true class shows it.
        out["in_distribution_flagged_by_class"] = {
            label: [int(in_flagged[in_labels == k].sum()), int((in_labels == k).sum())]
            for k, label in enumerate(manifest.labels)
        }
    for name, frames in outside.items():
        s, flagged = scores(*logits_of(session, manifest, frames))
        out["sets"][name] = {
            "n": len(frames),
            "auroc": separation(inside, s),
            "flagged": float(flagged.mean()),
        }
        out["roc"][name] = roc_points(inside, s)
    return out


def removed_earlier(
    manifest: Any, ood_block: dict[str, Any], layers: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """A refit of a graph an earlier fit pruned: the layers it took out, and why, stay on
    record beside this fit's (None when nothing was taken out)."""
    earlier = manifest.raw.get("decision", {}).get("ood", {})
    present = {f["tensor"] for f in layers}
    gone = {k: v for k, v in earlier.get("unused", {}).items() if k not in present}
    if not gone:
        return None
    now = ood_block.get("capture_shift_flagged", {})
    rates = earlier.get("capture_shift_flagged", {})
    return {
        # in the first fit's order, this fit's rates where it measured them
        "capture_shift_flagged": {
            k: now.get(k, v) for k, v in rates.items() if k in gone or k in now
        }
        | now,
        "unused": gone | ood_block.get("unused", {}),
    }


def prune_layers(model_dir: Path, unused: list[str]) -> None:
    """Refit ``model_dir``'s distances without the layers ``unused`` (the others come out
    the same: the same train frames, the same fit)."""
    embedding = load_manifest(model_dir / "manifest.json").raw["ood_embedding"]
    keep = [f["tensor"] for f in embedding["features"] if f["tensor"] not in unused]
    ood_embed.main(
        model_dir, keep, embedding["fitted_on"]["n"], True, ood_embed.prototypes_of(embedding)
    )


HEAVY_SHIFT = ("letterbox 1920x1080 (16:9)", "JPEG quality 40")


def heavily_shifted(frames: list[bytes]) -> list[bytes]:
    """Frames re-captured under a capture change that carries no diagnosis: letterboxed to
    16:9 and re-encoded at JPEG quality 40 (``training.audit``)."""
    out = []
    for i, frame in enumerate(frames):
        for change in HEAVY_SHIFT:
            frame = audit.recapture(frame, change, i)
        out.append(frame)
    return out


def shifted_val_rows(
    manifest: Any, session: Any, val_table: Any, val_out: dict[str, Any], n: int = 200
) -> np.ndarray | None:
    """Logits rows of ``n`` val frames under heavy capture shift, posted as pictures alone;
    None where the graph has no feature distance (nothing to choose among)."""
    rows = next(iter(val_out.values()))[1]
    if rows.shape[1] <= len(manifest.labels):
        return None
    pick = np.linspace(0, len(val_table) - 1, min(n, len(val_table))).astype(int)
    frames = heavily_shifted([val_table.paths[i].read_bytes() for i in pick])
    return logits_of(session, manifest, frames)[0]


def ood_inputs(manifest: Any, test_table: Any) -> dict[str, list[bytes]]:
    other = "ham10000" if manifest.name.startswith("hyperkvasir") else "hyperkvasir-lgi"
    spec = load_config(Path(__file__).parent / "configs" / f"{other}.yaml").dataset
    heavy = heavily_shifted([p.read_bytes() for p in test_table.paths[:100]])
    return {
        f"{other} images (the other bundled dataset)": other_dataset_images(spec),
        "natural photographs": natural_photographs(),
        **synthetic_inputs(),
        "own test frames, 16:9 letterbox + JPEG 40 (should pass)": heavy,
    }
