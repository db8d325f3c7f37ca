"""Local validation (`endofuse validate`): a site's own labelled cases, answered as the service
answers them and judged against the version's test figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from service.cli import app
from tests.conftest import REPO, require_data
from training.ranks import binomial_at_most

HK = REPO / "models" / "hyperkvasir-lgi" / "2"


def write_cases(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def split_rows(dataset: str, split: str, label: str) -> list[dict[str, str]]:
    root = require_data(dataset)
    table = next(root.glob("*.csv"))
    with table.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    return [r | {"path": str(root / r["path"]), "label": r[label]} for r in rows]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["validate", *map(str, args)])
    return result.exit_code, result.output


def test_binomial_at_most_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats", reason="scipy is the reference")
    for n, k, p in ((100, 85, 0.9), (298, 250, 0.9), (1500, 1300, 0.95), (40, 0, 0.1)):
        assert binomial_at_most(n, k, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9)


def test_the_test_split_as_a_site_gives_the_recorded_figures(tmp_path: Path) -> None:
    """The version's own test split posted as a site's cases: the figures its evaluation and
    decision reports recorded, and nothing found to differ beyond sampling."""
    rows = [
        {"path": r["path"], "label": r["class"]}
        for r in split_rows("hyperkvasir-lgi", "test", "class")
    ]
    cases = write_cases(tmp_path / "cases.csv", rows)
    code, output = run(HK, "--cases", cases, "--out", tmp_path / "out")
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "validation.json").read_text())
    docs = REPO / "docs" / "models" / "hyperkvasir-lgi" / "2"
    recorded = json.loads((docs / "results.json").read_text())["patterns"]["all"]
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert report["figures"][key] == pytest.approx(recorded[key], abs=1e-12), key
    assert report["figures"]["ece_15"] == pytest.approx(recorded["ece_15"], abs=1e-6)
    decision = json.loads((docs / "decision.json").read_text())
    assert report["sets"]["coverage"] == pytest.approx(decision["test"]["all"]["0.9"]["coverage"])
    ood = decision["ood"]
    assert report["ood"]["patterns"]["all"]["flagged"] == round(
        ood["in_distribution_flagged"] * ood["n_in"]
    )
    assert report["ood"]["patterns"]["all"]["p_more"] == pytest.approx(ood["p_as_many_flagged"])
    assert report["findings"]["differs"] == []
    with (tmp_path / "out" / "validation-cases.csv").open(newline="") as fh:
        listed = list(csv.DictReader(fh))
    order = [
        (r["flagged"] != "true", r["covered"] != "false", r["named"] == r["label"]) for r in listed
    ]
    assert len(listed) == len(rows) and order == sorted(order)
    assert (
        sum(r["flagged"] == "true" for r in listed) == report["ood"]["patterns"]["all"]["flagged"]
    )
    wrong = sum(r["named"] != r["label"] for r in listed)
    assert wrong == round((1 - report["figures"]["accuracy"]) * len(rows))
    assert {"validation.md", "validation.png"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_images_of_another_kind_differ_beyond_sampling(tmp_path: Path) -> None:
    """Dermoscopy images posted to the endoscopy model as polyps: the report says the sets
    do not hold, the flag fires far above its val rate, and accuracy is lower."""
    root = require_data("ham10000")
    rows = [
        {"path": str(p), "label": "polyp"}
        for p in sorted((root / "images" / "nv").glob("*.jpg"))[:30]
    ]
    code, output = run(HK, "--cases", write_cases(tmp_path / "cases.csv", rows))
    assert code == 0, output
    report = json.loads((tmp_path / "validation-hyperkvasir-lgi-2" / "validation.json").read_text())
    differs = " ".join(report["findings"]["differs"])
    assert "Prediction sets at 90.0 %" in differs and "do not hold" in differs
    assert "Out-of-distribution flag (all): 30 of 30" in differs
    assert "lower beyond sampling" in differs
    text = (tmp_path / "validation-hyperkvasir-lgi-2" / "validation.md").read_text()
    assert "| polyp | 30 |" in text
    # The case list: one row per image, the flagged ones (here all) first.
    with (tmp_path / "validation-hyperkvasir-lgi-2" / "validation-cases.csv").open() as fh:
        listed = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in listed) == sorted(r["path"] for r in rows)
    assert all(r["flagged"] == "true" and r["label"] == "polyp" for r in listed)


def letterboxed(rows: list[dict[str, str]], folder: Path) -> list[dict[str, str]]:
    """Frames re-captured as another site's card would: 16:9, black bars, JPEG 80."""
    folder.mkdir()
    out = []
    for i, row in enumerate(rows):
        with Image.open(row["path"]) as im:
            frame = im.convert("RGB")
        scale = min(1280 / frame.width, 720 / frame.height)
        frame = frame.resize((round(frame.width * scale), round(frame.height * scale)))
        canvas = Image.new("RGB", (1280, 720))
        canvas.paste(frame, ((1280 - frame.width) // 2, (720 - frame.height) // 2))
        canvas.save(folder / f"{i}.jpg", quality=80)
        out.append({"path": f"{folder.name}/{i}.jpg", "label": row["label"]})
    return out


def test_the_service_answers_as_the_process_does(tmp_path: Path) -> None:
    """The same cases scored in process and through a running service (its real HTTP
    stack, API keys on): the same labels, sets and flags, the same figures."""
    from service.api import create_app
    from service.api.auth import create_key
    from service.registry import Registry
    from tests.conftest import make_settings
    from tests.http_server import running

    rows = split_rows("hyperkvasir-lgi", "test", "class")[::10]
    rows = letterboxed(
        [{"path": r["path"], "label": r["class"]} for r in rows], tmp_path / "frames"
    )
    cases = write_cases(tmp_path / "cases.csv", rows)
    key = create_key(tmp_path / "keys.json", "validation", ["predict"])
    # A queue of one: the client's twelve requests at once meet 503s and must wait them out.
    settings = make_settings(
        REPO / "models",
        models=["hyperkvasir-lgi"],
        warmup_runs=0,
        api_keys_file=tmp_path / "keys.json",
        max_queue_size=1,
        engine_instances=1,
    )
    registry = Registry.load(
        REPO / "models", providers=["CPUExecutionProvider"], warmup_runs=0, only=["hyperkvasir-lgi"]
    )
    with running(create_app(settings, registry), settings) as (host, port):
        url = f"http://{host}:{port}"
        refused = run(HK, "--cases", cases, "--out", tmp_path / "no-key", "--service", url)
        code, output = run(
            HK, "--cases", cases, "--out", tmp_path / "http", "--service", url, "--api-key", key,
            "--concurrency", "12",
        )  # fmt: skip
        metrics = httpx.get(f"{url}/metrics").text
    assert refused[0] == 2 and "401" in refused[1], refused
    assert code == 0, output
    overloaded = [
        line for line in metrics.splitlines()
        if line.startswith("endofuse_requests_total") and 'outcome="overloaded"' in line
    ]  # fmt: skip
    assert overloaded and float(overloaded[0].split()[-1]) > 0, metrics
    assert run(HK, "--cases", cases, "--out", tmp_path / "local")[0] == 0
    http, local = (
        json.loads((tmp_path / d / "validation.json").read_text()) for d in ("http", "local")
    )
    assert http["n_answered"] == local["n_answered"] == len(rows)
    assert http["figures"]["confusion"] == local["figures"]["confusion"]
    assert http["sets"] == local["sets"] and http["ood"] == local["ood"]
    assert http["figures"]["ece_15"] == pytest.approx(local["figures"]["ece_15"], abs=1e-5)
    assert "running endofuse service" in http["scored_by"]
    # 16:9 frames: a shape the training frames did not have, said whatever the answers.
    assert local["capture"]["top_sizes"] == [["1280x720", len(rows)]]
    assert any("width/height ratio" in d for d in local["findings"]["differs"])


def test_bad_cases_are_refused_clearly(tmp_path: Path) -> None:
    frames = split_rows("hyperkvasir-lgi", "test", "class")[:6]
    good = [{"path": r["path"], "label": r["class"]} for r in frames]
    code, output = run(HK, "--cases", write_cases(tmp_path / "a.csv", [good[0] | {"label": "mel"}]))
    assert code == 2 and "labels ['mel'] are not among hyperkvasir-lgi/2's labels" in output
    missing = [good[0] | {"path": str(tmp_path / "gone.jpg")}]
    code, output = run(HK, "--cases", write_cases(tmp_path / "b.csv", missing))
    assert code == 2 and "1 image files not found" in output
    code, output = run(HK, "--cases", write_cases(tmp_path / "c.csv", good), "--coverage", "0.85")
    assert code == 2 and "coverage must be one of" in output
    code, output = run(
        HK, "--cases", write_cases(tmp_path / "d.csv", [{"file": "x", "label": "polyp"}])
    )
    assert code == 2 and "column 'path' is missing" in output
    # As a spreadsheet exports it: a byte-order mark and ";" between the columns.
    text = "path;label\n" + "".join(f"{r['path']};{r['label']}\n" for r in good)
    (tmp_path / "excel.csv").write_text(text, encoding="utf-8-sig")
    code, output = run(HK, "--cases", tmp_path / "excel.csv", "--out", tmp_path / "excel")
    assert code == 0, output
    assert json.loads((tmp_path / "excel" / "validation.json").read_text())["n_answered"] == 6
    # One unreadable file among readable ones: refused as the service refuses it, the rest scored.
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    mixed = [*good, {"path": "broken.jpg", "label": "polyp"}]
    code, output = run(
        HK, "--cases", write_cases(tmp_path / "e.csv", mixed), "--out", tmp_path / "e"
    )
    assert code == 0, output
    report = json.loads((tmp_path / "e" / "validation.json").read_text())
    assert report["n_answered"] == 6 and report["rejected"] == {"undecodable_image": 1}
    with (tmp_path / "e" / "validation-cases.csv").open(newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert len(listed) == 7 and listed[-1]["named"] == "undecodable_image"
    assert listed[-1]["path"].endswith("broken.jpg")
    assert "1 of 7 cases refused (undecodable_image: 1)" in report["findings"]["differs"][0]


def test_tabular_fields_set_each_case_pattern(tmp_path: Path) -> None:
    """A dermoscopy site recording age and sex but not the localization: partial fields;
    one that records none: image only. Cases of one lesion are drawn together."""
    rows = split_rows("ham10000", "test", "dx")[:40]
    some = [
        {
            "path": r["path"],
            "label": r["dx"],
            "age": r["age"],
            "sex": r["sex"],
            "lesion_id": r["lesion_id"],
        }
        for r in rows
    ]
    model = REPO / "models" / "ham10000" / "2"
    code, output = run(
        model,
        "--cases",
        write_cases(tmp_path / "a.csv", some),
        "--out",
        tmp_path / "a",
        "--group-column",
        "lesion_id",
    )
    assert code == 0, output
    report = json.loads((tmp_path / "a" / "validation.json").read_text())
    assert report["patterns"] == {"partial": 40} and report["reference"]["pattern"] == "partial"
    assert report["label_rule"] == "balanced"
    bare = [{"path": r["path"], "label": r["dx"]} for r in rows]
    code, output = run(
        model, "--cases", write_cases(tmp_path / "b.csv", bare), "--out", tmp_path / "b"
    )
    assert code == 0, output
    report = json.loads((tmp_path / "b" / "validation.json").read_text())
    assert report["patterns"] == {"image_only": 40}
    assert not any("fewer pixels" in d for d in report["findings"]["differs"])
    # The same lesions from a camera with half the resolution: said, whatever the answers.
    (tmp_path / "half").mkdir()
    for i, row in enumerate(bare):
        with Image.open(row["path"]) as im:
            im.resize((im.width // 2, im.height // 2)).save(tmp_path / "half" / f"{i}.jpg")
    half = [{"path": f"half/{i}.jpg", "label": r["label"]} for i, r in enumerate(bare)]
    code, output = run(
        model, "--cases", write_cases(tmp_path / "c.csv", half), "--out", tmp_path / "c"
    )
    assert code == 0, output
    report = json.loads((tmp_path / "c" / "validation.json").read_text())
    assert report["capture"]["smaller_share"] == 1.0
    assert any("fewer pixels" in d for d in report["findings"]["differs"])
    assert sum(map(sum, report["figures"]["confusion"])) == 40


def test_figures_compared_are_those_of_the_very_graph(tmp_path: Path) -> None:
    """A bundled version is compared with its evaluation report; a graph exported under the
    same name and version (another model file) with its own manifest's figures, and says so."""
    import shutil

    from service.manifest import load_manifest
    from training.validate_report import reference

    bundled = REPO / "models" / "ham10000" / "2"
    figures, source = reference(load_manifest(bundled / "manifest.json"))
    assert source == "test split (docs/models/ham10000/2/results.json)"
    report = json.loads((REPO / "docs/models/ham10000/2/results.json").read_text())
    assert figures == report["patterns"]

    raw = json.loads((bundled / "manifest.json").read_text())
    raw["files"]["model.onnx"]["sha256"] = "0" * 64  # another export under the same number
    scratch = tmp_path / "ham10000" / "2"
    scratch.mkdir(parents=True)
    (scratch / "manifest.json").write_text(json.dumps(raw))
    shutil.copy(bundled / "model.onnx", scratch / "model.onnx")
    figures, source = reference(load_manifest(scratch / "manifest.json"))
    assert source == "test split (manifest, not the bundled graph's report)"
    assert figures and figures != report["patterns"]
    assert figures == {k: v for k, v in raw["metrics"].items() if isinstance(v, dict)}
