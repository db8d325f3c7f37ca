"""What decision support costs in throughput: each default model version served with its
decision parameters (prediction sets, referral, and the OOD flag from the graph's
``ood_distance`` columns) and as it was before them (no ``decision`` block, the graph without
the distances), in one server, same frames, same load generator, in paired intervals that
alternate between the two copies. Beside throughput, the server process's CPU time per
answered request (on a CPU-bound server throughput is cores / CPU per request); on this
2-vCPU machine both spread by ±10 % from one interval to the next. Two things keep that
honest: a third copy, identical to the first, measured the same way (what the harness shows
when there is nothing to find), and lone requests alternating between the copies, whose
paired latencies resolve a fraction of a millisecond through HTTP (in process:
``bench/decision_cost.py``).

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
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.loadgen import multipart_request, read_response, run_load  # noqa: E402
from bench.precision import model_frames  # noqa: E402
from bench.serving import (  # noqa: E402
    data_dir,
    default_version,
    free_port,
    publish,
    start_server,
)


def without_decision(src: Path, dst: Path, identical: bool = False) -> None:
    """A copy of a model version as it was before decision support: no decision block, and
    no ``ood_distance`` output in the graph. With ``identical``, the same version under the
    other name (the control)."""
    dst.mkdir(parents=True)
    manifest = json.loads((src / "manifest.json").read_text())
    if not identical:
        manifest.pop("decision", None)
        manifest.pop("ood_embedding", None)
    manifest.pop("files", None)
    manifest["name"] = dst.parent.name
    model = onnx.load(str(src / "model.onnx"))
    if not identical and any(o.name == "ood_distance" for o in model.graph.output):
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


def loaded_row(name: str, against: str, port: int, pid: int, bodies: dict[str, list[bytes]],
               c: int, args: argparse.Namespace) -> str:  # fmt: skip
    """Throughput and server CPU of the two copies in ``bodies`` (with decision support
    first) at concurrency ``c``, in paired, alternating short intervals (ABBA...): the
    machine's drift from one minute to the next falls on both copies alike."""
    first, other = bodies
    done = {n: 0.0 for n in bodies}
    changes, cpu_changes = [], []
    cpu = {n: 0.0 for n in bodies}
    for rep in range(args.repeats):
        order = [first, other] if rep % 2 == 0 else [other, first]
        pair, cpu_pair = {}, {}
        for n in order:
            before = cpu_seconds(pid)
            r = asyncio.run(run_load("127.0.0.1", port, bodies[n], c, args.seconds))
            cpu_pair[n] = (cpu_seconds(pid) - before) / r.answered
            assert set(r.statuses) == {200}, r.statuses
            pair[n] = r.throughput
            done[n] += r.throughput
            cpu[n] += cpu_pair[n] / args.repeats
        changes.append(pair[first] / pair[other] - 1)
        cpu_changes.append(cpu_pair[first] / cpu_pair[other] - 1)
    full, rest = done[first] / args.repeats, done[other] / args.repeats
    return (
        f"| {name} | {against} | {c} | {full:.1f} | {rest:.1f} | "
        f"{100 * (full / rest - 1):+.1f} % | {100 * float(np.median(changes)):+.1f} % | "
        f"{100 * min(changes):+.1f} to {100 * max(changes):+.1f} % "
        f"| {1000 * cpu[first]:.2f} | {1000 * cpu[other]:.2f} "
        f"| {100 * float(np.median(cpu_changes)):+.1f} % "
        f"({100 * min(cpu_changes):+.1f} to {100 * max(cpu_changes):+.1f} %) |"
    )


async def _alternating(port: int, bodies: dict[str, list[bytes]], turns: int) -> dict[str, Any]:
    """One request at a time, the copies in turn (ABBA...), each on its own kept-alive
    connection: seconds per answer of each copy, warm-up turns left out."""
    conns = {n: await asyncio.open_connection("127.0.0.1", port) for n in bodies}
    seconds: dict[str, list[float]] = {n: [] for n in bodies}
    try:
        for turn in range(turns + 20):
            for n in list(bodies) if turn % 2 == 0 else list(reversed(bodies)):
                reader, writer = conns[n]
                start = time.perf_counter()
                writer.write(bodies[n][turn % len(bodies[n])])
                await writer.drain()
                status, _ = await read_response(reader)
                assert status == 200, status
                if turn >= 20:
                    seconds[n].append(time.perf_counter() - start)
    finally:
        for _, writer in conns.values():
            writer.close()
    return {n: np.array(v) for n, v in seconds.items()}


def alternating_row(
    name: str, against: str, port: int, bodies: dict[str, list[bytes]], turns: int
) -> str:
    """What a request costs with decision support, through HTTP with nothing else in flight:
    the paired difference of latencies. Thousands of pairs resolve a fraction of a
    millisecond, which loaded intervals on a shared machine cannot."""
    ms = {n: 1000 * v for n, v in asyncio.run(_alternating(port, bodies, turns)).items()}
    with_, without = ms.values()
    diff = with_ - without
    low, high = np.percentile(
        [np.random.default_rng(k).choice(diff, len(diff)).mean() for k in range(1000)], [2.5, 97.5]
    )
    return (
        f"| {name} | {against} | {with_.mean():.2f} | {without.mean():.2f} | {diff.mean():+.3f} "
        f"({low:+.3f} to {high:+.3f}) | {100 * diff.mean() / without.mean():+.2f} % |"
    )


# The second copy of each comparison: as before decision support, and an identical copy,
# whose difference is what the harness shows when there is nothing to find.
AGAINST = {"plain": "without decision support", "twin": "control: an identical copy"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=6, help="Pairs of intervals per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--turns", type=int, default=1000, help="Pairs of lone requests")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = data_dir()
    pairs = {name: default_version(name) for name in ("hyperkvasir-lgi", "ham10000")}
    root = Path(tempfile.mkdtemp(prefix="endofuse-decision-"))
    names = []
    for name, version in pairs.items():
        src = REPO / "models" / name / version
        shutil.copytree(src, root / name / version)
        for suffix in AGAINST:
            without_decision(src, root / f"{name}-{suffix}" / version, suffix == "twin")
        names += [name, *(f"{name}-{suffix}" for suffix in AGAINST)]
    port = free_port()
    # One layout for every copy (the batch profile is noisy and could give them different
    # limits): what is compared is the decision support alone.
    proc = start_server(
        root, ",".join(names), port, spinning=False,
        ENDOFUSE_PROFILE_BATCHES="false", ENDOFUSE_MAX_BATCH_SIZE="1",
    )  # fmt: skip
    rows, lone = [], []
    try:
        for name in pairs:
            images = model_frames(data, name)
            copies = [name, *(f"{name}-{suffix}" for suffix in AGAINST)]
            requests = {
                n: [multipart_request("127.0.0.1", port, f"/models/{n}/predict", i) for i in images]
                for n in copies
            }
            for c in args.concurrency:
                for suffix, against in AGAINST.items():
                    bodies = {n: requests[n] for n in (name, f"{name}-{suffix}")}
                    rows.append(loaded_row(name, against, port, proc.pid, bodies, c, args))
                    print(rows[-1], flush=True)
            for suffix, against in AGAINST.items():
                bodies = {n: requests[n] for n in (name, f"{name}-{suffix}")}
                lone.append(alternating_row(name, against, port, bodies, args.turns))
                print(lone[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    report(args, rows, lone)


def report(args: argparse.Namespace, rows: list[str], lone: list[str]) -> None:
    """Print the two tables, and with ``--out`` write them into that document."""
    publish(
        args.out,
        "Cost of decision support",
        [
            "One server, each model's default version loaded three times with the same engine "
            "layout (batch profile off, batch limit 1, as the profile chooses on this CPU): "
            "with decision support, without it, and an identical copy with it (the control: "
            "its difference is the harness's own). 40 images as multipart (hyperkvasir-lgi: "
            "the full-resolution frames; ham10000: dermoscopy images of the test split); per "
            f"model, concurrency and comparison, {args.repeats} pairs of {args.seconds:g} s "
            "intervals, the two copies alternating (ABBA...). Change: of the mean req/s, and "
            "the median and range of the paired changes. Server CPU: the server process's "
            "user + system CPU time (all threads) per answered request over each interval, "
            "mean over intervals; its change is the median (range) of the paired changes, "
            "positive = the copy with decision support costs more.",
            "",
            "| model | against | concurrency | with decision support, req/s | other copy, "
            "req/s | change | median paired change | range | server CPU ms/request, with | "
            "other copy | CPU change |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"One request at a time, {args.turns} pairs per comparison, the copies in turn "
            "(ABBA...), each on its own kept-alive connection: latency in ms, mean; the "
            "difference with its 95 % bootstrap interval, and as a share of the other copy's "
            "latency (with nothing else in flight, the server's time on a request).",
            "",
            "| model | against | with decision support, ms | other copy, ms | difference, ms "
            "| share |",
            "|---|---|---|---|---|---|",
            *lone,
        ],
        "bench/decision_overhead.py",
    )


if __name__ == "__main__":
    main()
