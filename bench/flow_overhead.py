"""Prefect overhead of the label flow: the flow vs the same per-sample calls in a plain loop.

    .venv/bin/python bench/flow_overhead.py                      # 960 and 240 samples, 3 repeats
    .venv/bin/python bench/flow_overhead.py --batch-size 1       # one task per sample
    .venv/bin/python bench/flow_overhead.py --samples 16 --repeats 1   # a smoke run

Both sides label the same shapes-vqa samples with the paper's search settings
(population 48, 12 parents, 10 generations) into a fresh SQLite store each time, from
the same precomputed features, with the model already loaded, on one torch thread;
wall and CPU seconds (this process + the Prefect server) are both recorded, CPU time
being the steadier figure on a shared machine:

- direct: migrate the store, upsert the samples, open the run, ``label_and_store`` per
  sample in a loop, finish the run, export the Parquet label set -- in a pool thread,
  where the flow's tasks run too;
- in-process: ``evocomp label --in-process`` (the flow's own steps: sample selection, run
  summary, metrics; the same ``label_and_store`` loop), in a pool thread -- what the flow
  costs without Prefect;
- flow: ``label_dataset`` with ``ThreadPoolTaskRunner(max_workers=1)`` (like for like),
  its label tasks planned by ``evocomp.labeling.run.plan_batches`` (about four per worker,
  at most 128 samples each; ``--batch-size 1`` measures one task per sample), against the
  temporary Prefect server, already up (its one-off start is ``server_start_seconds``).

Each side runs at two sizes (``--samples`` and a quarter of it), interleaved, minimum
over repeats. ``overhead_fraction = (flow - direct) / direct`` in wall time at
``--samples`` (target < 0.10; ``overhead_fraction_cpu`` the same in CPU time;
``prefect_overhead_fraction`` the flow against the in-process loop); the two
sizes split the overhead into a cost per sample (the slope) and a cost per flow run (the
intercept: flow-run bookkeeping, up to 1 s of Prefect's heartbeat-thread join at exit).
The model is ``models/mllm`` when it exists, else the random tiny LLaVA the tests build
(said in the output). Writes ``metrics/bench_flow_overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402
from _common import command_line, describe_machine, machine_info  # noqa: E402

import flows.label as fl  # noqa: E402  (first: it applies the Prefect settings)
from evocomp import store as db  # noqa: E402
from evocomp.config import LabelParams  # noqa: E402
from evocomp.data.prepared import load_prepared, write_prepared  # noqa: E402
from evocomp.data.readers import read_dataset  # noqa: E402
from evocomp.data.synth import write_dataset  # noqa: E402
from evocomp.features.compute import ensure_features  # noqa: E402
from evocomp.files import write_json_atomic  # noqa: E402
from evocomp.labeling.sample import label_and_store  # noqa: E402
from evocomp.labeling.steps import register_samples  # noqa: E402
from evocomp.labeling.worker import model_ref, worker_features, worker_mllm  # noqa: E402
from evocomp.search import run_spec  # noqa: E402

PAPER = LabelParams(
    population=48, parents=12, generations=10, splits=("train", "val", "test"), workers=1
)


def pick_model(tmp: Path, model: Path | None) -> tuple[Path, str]:
    if model is not None:
        return model, str(model)
    if (REPO / "models/mllm/config.json").is_file():
        return REPO / "models/mllm", "models/mllm (the trained reference model)"
    from tests.conftest import make_tiny_llava

    path = make_tiny_llava(tmp / "tiny-llava")
    return path, "a random tiny LLaVA (tests/conftest.py; models/mllm does not exist yet)"


def direct(samples, ref, params, features: Path, db_url: str, out: Path) -> None:
    """The flow's work without Prefect: the same store calls and label_and_store per sample."""
    db.upgrade(db_url)
    engine = db.get_engine(db_url)
    register_samples(engine, "bench", "bench", samples)
    search = params.search()
    run_id = db.get_or_create_run(engine, ref.model_id, run_spec(search), "bench")
    mllm = worker_mllm(ref)
    for s in samples:
        feats = worker_features(str(features), ref.model_id, s.id)
        label_and_store(mllm, s, feats, search, engine, run_id)
    db.finish_run(engine, run_id, "done")
    db.export_labels(engine, out, model_id=ref.model_id)


def main(argv: list[str] | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="evocomp-bench-flow-"))
    threads = torch.get_num_threads()
    try:
        return run(tmp, argv)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, argv: list[str] | None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=960, help="the large size (the small: 1/4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="samples per task (default: auto)")
    ap.add_argument("--model", type=Path, help="checkpoint (default: models/mllm, else a tiny one)")
    ap.add_argument("--out", type=Path, default=REPO / "metrics/bench_flow_overhead.json")
    args = ap.parse_args(argv)

    model, model_note = pick_model(tmp, args.model)
    torch.set_num_threads(1)  # both sides alike (after pick_model: tests/conftest.py sets 2)
    write_dataset(tmp / "raw", n=args.samples, seed=7, questions_per_image=1)
    write_prepared(read_dataset(tmp / "raw"), tmp / "prepared", "bench")
    every = [s for split in PAPER.splits for s in load_prepared(tmp / "prepared", split)]
    sizes = {"small": max(1, args.samples // 4), "large": args.samples}
    ref = model_ref(model)
    with ThreadPoolExecutor(max_workers=1) as pool:  # shared by both sides, not timed
        pool.submit(ensure_features, worker_mllm(ref), every, tmp / "features").result()
    info = machine_info("cpu")
    print(describe_machine(info))
    print(f"model: {model_note}; {sizes} samples; paper search (48/12/10); one thread each side")

    counter = iter(range(10**6))

    def run_flow(n: int) -> None:
        i = next(counter)
        summary = fl.label_dataset.with_options(task_runner=fl.task_runner("thread", 1))(
            data=str(tmp / "prepared"), model=str(model), params=PAPER,
            ids=[s.id for s in every[:n]], features_dir=str(tmp / "features"),
            db_url=f"sqlite:///{tmp / f'{i}.db'}", labels_out=str(tmp / f"{i}.parquet"),
            metrics_out=str(tmp / f"{i}.json"), batch_size=args.batch_size,
        )  # fmt: skip
        assert summary["searched"] == n and summary["failed"] == 0, summary

    def run_loop(n: int) -> None:  # `evocomp label --in-process`: the flow's steps, no Prefect
        i = next(counter)
        kw = dict(data=str(tmp / "prepared"), model=str(model), params=PAPER,
                  ids=[s.id for s in every[:n]], features_dir=str(tmp / "features"),
                  db_url=f"sqlite:///{tmp / f'{i}.db'}", labels_out=str(tmp / f"{i}.parquet"),
                  metrics_out=str(tmp / f"{i}.json"))  # fmt: skip
        with ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(lambda: fl.run_label(in_process=True, **kw)).result()["done"] == n

    def run_direct(n: int) -> None:
        i = next(counter)
        db_url, out = f"sqlite:///{tmp / f'{i}.db'}", tmp / f"{i}.parquet"
        with ThreadPoolExecutor(max_workers=1) as pool:  # where the flow's tasks run, too
            pool.submit(direct, every[:n], ref, PAPER, tmp / "features", db_url, out).result()

    t0 = time.perf_counter()
    run_flow(1)
    server_start = time.perf_counter() - t0  # the temporary server's start + one tiny flow run
    fns = {f"{side}_{size}": partial(fn, n) for size, n in sizes.items()
           for side, fn in (("direct", run_direct), ("loop", run_loop), ("flow", run_flow))}  # fmt: skip
    wall, cpu = measure(fns, args.repeats)
    vs_direct = {
        "wall": split_overhead(wall, sizes, "direct"),
        "cpu": split_overhead(cpu, sizes, "direct"),
    }
    vs_loop = {
        "wall": split_overhead(wall, sizes, "loop"),
        "cpu": split_overhead(cpu, sizes, "loop"),
    }
    n = sizes["large"]
    result = {
        "overhead_fraction": vs_direct["wall"]["fraction_large"],
        "overhead_fraction_cpu": vs_direct["cpu"]["fraction_large"],
        "prefect_overhead_fraction": vs_loop["wall"]["fraction_large"],
        "prefect_overhead_fraction_cpu": vs_loop["cpu"]["fraction_large"],
        "overhead_seconds_per_sample": vs_direct["wall"]["per_sample"],
        "overhead_cpu_seconds_per_sample": vs_direct["cpu"]["per_sample"],
        "prefect_cpu_seconds_per_sample": vs_loop["cpu"]["per_sample"],
        "overhead_seconds_per_flow_run": vs_direct["wall"]["per_flow_run"],
        "prefect_seconds_per_flow_run": vs_loop["wall"]["per_flow_run"],
        "seconds_flow": round(min(wall["flow_large"]), 3),
        "seconds_direct": round(min(wall["direct_large"]), 3),
        "seconds_in_process": round(min(wall["loop_large"]), 3),
        "seconds_direct_per_sample": round(min(wall["direct_large"]) / n, 4),
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in wall.items()},
        "cpu_seconds_all": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "server_start_seconds": round(server_start, 2),
        "samples": n,
        "samples_small": sizes["small"],
        "batch_size": args.batch_size or "auto",
        "repeats": args.repeats,
        "model": model_note,
        "machine": info | {"load_average_1m_end": round(os.getloadavg()[0], 2)},
        "command": command_line(argv, __file__),
    }
    print("minimum over repeats, seconds (wall / CPU):")
    for size, k in sizes.items():
        cells = "  ".join(f"{side} {min(wall[f'{side}_{size}']):6.2f} / {min(cpu[f'{side}_{size}']):6.2f}"
                          for side in ("direct", "loop", "flow"))  # fmt: skip
        print(f"  {k:4d} samples: {cells}")
    for name, fit in (
        ("flow vs direct", vs_direct),
        ("flow vs in-process (Prefect alone)", vs_loop),
    ):
        w, c = fit["wall"], fit["cpu"]
        print(f"{name}: {w['fraction_large']:+.1%} wall, {c['fraction_large']:+.1%} CPU at {n} samples; "
              f"{c['per_sample'] * 1000:.1f} ms CPU per sample ({c['fraction_per_sample']:+.1%}) "
              f"+ {w['per_flow_run']:.2f} s wall per flow run")  # fmt: skip
    print(f"temporary Prefect server start: {server_start:.1f} s, once per process")
    print(f"overhead_fraction {result['overhead_fraction']:.3f} (target < 0.10)")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return result


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its children (the temporary Prefect server)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def measure(fns: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """Wall and CPU seconds of each callable, interleaved (order rotated every pass)."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(warmup + repeats):
        r = rep % len(names)
        for name in names[r:] + names[:r]:
            c0, t0 = cpu_seconds(), time.perf_counter()
            fns[name]()
            if rep >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)
    return wall, cpu


def split_overhead(times: dict, sizes: dict, base: str) -> dict:
    """Flow minus ``base`` = a + b * samples, from the two sizes (minimum over repeats)."""
    over = {s: min(times[f"flow_{s}"]) - min(times[f"{base}_{s}"]) for s in sizes}
    n_s, n_l = sizes["small"], sizes["large"]
    per_sample = (over["large"] - over["small"]) / max(n_l - n_s, 1)
    return {
        "fraction_large": round(over["large"] / min(times[f"{base}_large"]), 4),
        "per_sample": round(per_sample, 5),
        "per_flow_run": round(over["large"] - per_sample * n_l, 3),
        "fraction_per_sample": round(per_sample / (min(times[f"{base}_large"]) / n_l), 4),
    }


if __name__ == "__main__":
    main()
