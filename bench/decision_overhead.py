"""What decision support costs in throughput: each default model version served with its
decision parameters (prediction sets, referral, and the OOD flag from the graph's
``ood_distance`` columns) and as it was before them (no ``decision`` block, the graph without
the distances), in one server, same frames, same load generator, in paired intervals that
alternate between the two copies. Beside throughput, the server process's CPU time per
answered request (on a CPU-bound server throughput is cores / CPU per request); on this
2-vCPU machine both spread by ±10 % from one interval to the next, so a cost of 1-3 % is
resolved only in process (``bench/decision_cost.py``).

    python bench/decision_overhead.py --out docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.loadgen import multipart_request, run_load  # noqa: E402
from bench.serving import data_dir, frames, free_port, publish, start_server  # noqa: E402


def without_decision(src: Path, dst: Path) -> None:
    """A copy of a model version as it was before decision support: no decision block, and
    no ``ood_distance`` output in the graph."""
    dst.mkdir(parents=True)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest.pop("decision", None)
    manifest.pop("ood_embedding", None)
    manifest.pop("files", None)
    manifest["name"] = dst.parent.name
    model = onnx.load(str(src / "model.onnx"))
    if any(o.name == "ood_distance" for o in model.graph.output):
        keep = [o for o in model.graph.output if o.name != "ood_distance"]
        del model.graph.output[:]
        model.graph.output.extend(keep)
        model = onnx.utils.Extractor(model).extract_model(
            [i.name for i in model.graph.input], [o.name for o in keep]
        )
        manifest["outputs"] = [o.name for o in keep]
    onnx.save(model, str(dst / "model.onnx"))
    (dst / "manifest.json").write_text(json.dumps(manifest))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=6, help="Pairs of intervals per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = data_dir()
    images = frames(data)
    pairs = {"hyperkvasir-lgi": "2", "ham10000": "2"}
    root = Path(tempfile.mkdtemp(prefix="endofuse-decision-"))
    names = []
    for name, version in pairs.items():
        shutil.copytree(REPO / "models" / name / version, root / name / version)
        without_decision(REPO / "models" / name / version, root / f"{name}-plain" / version)
        names += [name, f"{name}-plain"]
    port = free_port()
    # One layout for both copies (the batch profile is noisy and could give them different
    # limits): what is compared is the decision support alone.
    proc = start_server(
        root, ",".join(names), port, spinning=False,
        ENDOFUSE_PROFILE_BATCHES="false", ENDOFUSE_MAX_BATCH_SIZE="1",
    )  # fmt: skip
    rows = []
    try:
        for name in pairs:
            bodies = {
                n: [
                    multipart_request("127.0.0.1", port, f"/models/{n}/predict", im)
                    for im in images
                ]
                for n in (name, f"{name}-plain")
            }
            for c in args.concurrency:
                # Paired, alternating short intervals (ABBA...): the machine's drift from one
                # minute to the next falls on both copies alike.
                done = {n: 0.0 for n in bodies}
                changes, cpu_changes = [], []
                cpu = {n: 0.0 for n in bodies}
                for rep in range(args.repeats):
                    order = list(bodies) if rep % 2 == 0 else list(reversed(bodies))
                    pair, cpu_pair = {}, {}
                    for n in order:
                        before = cpu_seconds(proc.pid)
                        r = asyncio.run(run_load("127.0.0.1", port, bodies[n], c, args.seconds))
                        cpu_pair[n] = (cpu_seconds(proc.pid) - before) / r.answered
                        assert set(r.statuses) == {200}, r.statuses
                        pair[n] = r.throughput
                        done[n] += r.throughput
                        cpu[n] += cpu_pair[n] / args.repeats
                    changes.append(pair[name] / pair[f"{name}-plain"] - 1)
                    cpu_changes.append(cpu_pair[name] / cpu_pair[f"{name}-plain"] - 1)
                full, plain = done[name] / args.repeats, done[f"{name}-plain"] / args.repeats
                change = 100 * (full / plain - 1)
                rows.append(
                    f"| {name} | {c} | {full:.1f} | {plain:.1f} | {change:+.1f} % "
                    f"| {100 * float(np.median(changes)):+.1f} % | "
                    f"{100 * min(changes):+.1f} to {100 * max(changes):+.1f} % "
                    f"| {1000 * cpu[name]:.2f} | {1000 * cpu[f'{name}-plain']:.2f} "
                    f"| {100 * float(np.median(cpu_changes)):+.1f} % "
                    f"({100 * min(cpu_changes):+.1f} to {100 * max(cpu_changes):+.1f} %) |"
                )
                print(rows[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    publish(
        args.out,
        "Cost of decision support",
        [
            "One server, both versions of each model loaded with the same engine layout (batch "
            "profile off, batch limit 1, as the profile chooses on this CPU), the 40 "
            f"full-resolution frames as multipart; per model and concurrency, {args.repeats} "
            f"pairs of {args.seconds:g} s intervals, the two copies alternating (ABBA...). "
            "Change: of the mean req/s, and the median and range of the paired changes. "
            "Server CPU: the server process's user + system CPU time (all threads) per "
            "answered request over each interval, mean over intervals; its change is the "
            "median (range) of the paired changes, positive = decision support costs more.",
            "",
            "| model | concurrency | with decision support, req/s | without, req/s | "
            "change | median paired change | range | server CPU ms/request, with | "
            "without | CPU change |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ],
        "bench/decision_overhead.py",
    )


if __name__ == "__main__":
    main()
