"""``endofuse`` commands that build, measure and document model versions: train, export,
quantize, recalibrate, evaluate, decide, validate, write cards. Each imports its training
module when run, so the service itself never loads torch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

models = typer.Typer()


def _training() -> None:
    """Training commands need the 'train' extra; the service itself never loads torch."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise typer.BadParameter("training needs the 'train' extra: pip install 'endofuse[train]'")


@contextmanager
def _new_version() -> Iterator[None]:
    """A version that exists already is refused in one line, before any work is lost."""
    try:
        yield
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@models.command()
def train(
    config: Path = typer.Option(..., "--config", exists=True, help="Training YAML"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Default: runs/<name>"),
    stop_after: int | None = typer.Option(
        None, "--stop-after", help="Stop after this many epochs in all; rerun to resume"
    ),
    device: str = typer.Option(
        "cpu", "--device", help="cpu, cuda (a CUDA GPU, else an error) or auto (the GPU if any)"
    ),
) -> None:
    """Train a model (resumes an interrupted run in the same run directory, on either
    device; a resumed run ends exactly where an uninterrupted one would)."""
    _training()
    from training.train import main

    main(config, run_dir, stop_after=stop_after, device=device)


@models.command()
def export(
    run_dir: Path = typer.Argument(..., exists=True),
    models_dir: Path = typer.Option(Path("models"), "--models-dir"),
    version: str = typer.Option("1", "--version"),
    label_rule: str = typer.Option(
        "argmax",
        "--label-rule",
        help="Which class a response names: argmax, or balanced (probability over the "
        "class's training share: the Bayes rule for balanced accuracy)",
    ),
) -> None:
    """Export a trained run to models/<name>/<version>/ (ONNX + manifest), with parity check."""
    _training()
    from training.export import main

    with _new_version():
        main(run_dir, models_dir, version, label_rule)


@models.command()
def ablate(
    settings: str = typer.Option("hk,ham,ham-image", help="Comma list: hk, ham, ham-image"),
    fractions: str = typer.Option("1.0,0.1", help="Shares of training labels used"),
    seeds: int = typer.Option(3),
    epochs: int = typer.Option(15),
    threads: int = typer.Option(0, help="torch threads per run (0 = default)"),
    out: Path | None = typer.Option(Path("docs/ablation.md"), "--out"),
) -> None:
    """Run the methods ablation grid (resumable) and write its table and plot."""
    _training()
    import shlex
    import sys

    from training.ablate import main

    main(
        [s.strip() for s in settings.split(",") if s.strip()],
        [float(f) for f in fractions.split(",")],
        seeds,
        epochs,
        threads,
        out,
        "endofuse " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )


@models.command()
def evaluate(
    model_dir: Path = typer.Argument(..., exists=True),
    split: str = typer.Option("test", "--split"),
    out: Path | None = typer.Option(None, "--out", help="Report directory"),
    audit: bool = typer.Option(True, "--audit/--no-audit", help="Capture-shift audit"),
    service: str | None = typer.Option(
        None, "--service", help="Score the audit through a running service at this URL"
    ),
    baseline: Path | None = typer.Option(
        None, "--baseline", exists=True, help="results.json of another version, side by side"
    ),
    audit_frames: int | None = typer.Option(
        None, "--audit-frames", help="Audit a stratified subset of this many frames (default all)"
    ),
    group_column: str | None = typer.Option(
        None,
        "--group-column",
        help="CSV column whose equal values are one lesion (the ECE floor draws one label per "
        "lesion); default: the training config's dataset.group_column",
    ),
) -> None:
    """Evaluate an exported model (ONNX Runtime) on a data split, per missingness pattern,
    with its capture-shift audit."""
    from training.evaluate import main

    main(model_dir, split, out, audit, service, baseline, audit_frames, group_column)


@models.command()
def quantize(
    model_dir: Path = typer.Argument(..., exists=True, help="An fp32 version, e.g. models/m/2"),
    version: str = typer.Option(..., "--version", help="Version of the int8 variant"),
    calibration: int = typer.Option(256, help="Training frames the ranges are calibrated on"),
    probe: int = typer.Option(
        256, help="Val frames each layer's cost in int8 is measured on, no labels (0: none)"
    ),
    target_kl: float = typer.Option(
        0.005, help="Put layers back in float until int8's KL to fp32 on them is at most this"
    ),
    rounding_frames: int = typer.Option(
        64, help="Calibration frames the int8 weights' rounding is learned on (0: nearest)"
    ),
    float_layer: list[str] | None = typer.Option(
        None,
        "--float-layer",
        help="Keep this convolution in float instead of measuring which (repeatable; e.g. "
        "another variant's quantization.kept_in_float)",
    ),
    weight_bits: int = typer.Option(
        8, help="8, or 7: no 16-bit sum can saturate on CPUs without VNNI (exact integers there)"
    ),
) -> None:
    """Write a static int8 variant of a model version (precision: int8 in its manifest), and
    fit its decision parameters on its own outputs."""
    _training()
    from training import quantize

    with _new_version():
        dst = quantize.main(
            model_dir, version, calibration, probe, target_kl, rounding_frames,
            float_layer or None, weight_bits=weight_bits,
        )  # fmt: skip
    typer.echo(f"wrote {dst}")


@models.command()
def recalibrate(
    model_dir: Path = typer.Argument(..., exists=True, help="A version, e.g. models/m/2"),
    version: str = typer.Option(..., "--version", help="Version of the recalibrated copy"),
    group_column: str | None = typer.Option(
        None, "--group-column", help="Rows sharing this column stay in one fold (a lesion)"
    ),
) -> None:
    """Write a copy of a version with its calibration refitted (val, or train + val where
    cross-validated val NLL says so), then fit its decision parameters."""
    _training()
    from training import recalibrate

    with _new_version():
        dst = recalibrate.main(model_dir, version, group_column)
    typer.echo(f"wrote {dst}")


@models.command()
def reprocess(
    model_dir: Path = typer.Argument(..., exists=True, help="A version, e.g. models/m/7"),
    version: str = typer.Option(..., "--version", help="Version of the copy"),
    preprocessing: int = typer.Option(
        ..., "--preprocessing", help="Preprocessing version the copy reads its images with"
    ),
) -> None:
    """Write a copy of a version that reads its images with another preprocessing version
    (same graph and calibration; refused where that changes more than 2 % of val inputs),
    then fit its decision parameters on val read the new way."""
    _training()
    from training import reprocess

    with _new_version():
        try:
            dst = reprocess.main(model_dir, version, preprocessing)
        except ValueError as exc:  # the same preprocessing, or one the model never saw
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    typer.echo(f"wrote {dst}")


@models.command("ood-distance")
def ood_distance(
    model_dir: Path = typer.Argument(..., exists=True),
    feature: list[str] | None = typer.Option(
        None,
        "--feature",
        help="Feature tensor, repeatable (default: the final pooling and, where the graph has "
        "it, the middle stage)",
    ),
    fit_frames: int = typer.Option(3000, help="Train frames the prototypes are fitted on"),
    replace: bool = typer.Option(False, help="Refit a graph that has a distance already"),
    prototypes: int = typer.Option(  # = training.ood_embed.PROTOTYPES, kept out of import
        4, min=1, max=64, help="k-means prototypes per class (1: the class mean)"
    ),
) -> None:
    """Add Mahalanobis-distance outputs to a model's graph (probabilities unchanged), then
    refit its decision parameters with them."""
    _training()
    from training import conformal, ood_embed

    info = ood_embed.main(model_dir, feature or None, fit_frames, replace, prototypes)
    layers = ", ".join(f["tensor"] for f in info["features"])
    typer.echo(f"added '{info['output']}' from {layers} ({info['fitted_on']})")
    conformal.main(model_dir)


@models.command()
def decision(
    model_dir: Path = typer.Argument(..., exists=True),
    out: Path | None = typer.Option(None, "--out", help="Report directory"),
    class_confidence: float = typer.Option(
        0.8,
        "--class-confidence",
        min=0.0,
        max=0.999,
        help="Probability over the val draw that each class reaches the coverage level "
        "(0: the plain split-conformal rank, right on average)",
    ),
) -> None:
    """Fit conformal prediction sets on val into the model's manifest; measure them on test."""
    from training.conformal import main

    report = main(model_dir, out, class_confidence=class_confidence or None)
    for pattern, levels in report["test"].items():
        for level, r in levels.items():
            print(
                f"{report['model']} [{pattern}] coverage {level}: got {r['coverage']:.3f}, "
                f"mean set size {r['mean_set_size']:.2f}, referred {r['referral_rate']:.3f}"
            )


@models.command()
def validate(
    model_dir: Path = typer.Argument(..., exists=True),
    cases: Path = typer.Option(
        ...,
        "--cases",
        exists=True,
        dir_okay=False,
        help="CSV of the site's cases: path (relative to the CSV), label, any tabular fields",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Report directory (default: validation-<name>-<version> beside the CSV)"
    ),
    service: str | None = typer.Option(
        None, "--service", help="Answer each case through a running service at this URL"
    ),
    coverage: float | None = typer.Option(None, "--coverage", help="Default: the service's"),
    sets: str = typer.Option("class", "--sets", help="class or marginal"),
    label_column: str = typer.Option("label", "--label-column"),
    group_column: str | None = typer.Option(
        None, "--group-column", help="CSV column whose equal values are one lesion"
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="ENDOFUSE_API_KEY", help="Sent to --service as X-API-Key"
    ),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests in flight"),
) -> None:
    """Score a version on a site's own labelled cases, as the service answers them, beside its
    test figures: what differs beyond sampling (coverage, calibration, flags, accuracy)."""
    import httpx

    from service.errors import ServiceError
    from training.data import DatasetError
    from training.validate import main

    try:
        main(
            model_dir, cases, out, service, coverage, sets, label_column, group_column, api_key,
            concurrency,
        )  # fmt: skip
    except (DatasetError, ServiceError, httpx.HTTPError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@models.command()
def card(
    model_dirs: list[Path] = typer.Argument(..., exists=True),
    out: Path | None = typer.Option(None, "--out", help="Card file (one model directory only)"),
) -> None:
    """Write each version's model card from its manifest and recorded reports (no model is
    run): docs/models/<name>/<version>/card.md for a bundled version."""
    from training.card import main

    if out is not None and len(model_dirs) > 1:
        raise typer.BadParameter("--out takes one model directory")
    for model_dir in model_dirs:
        typer.echo(main(model_dir, out))
