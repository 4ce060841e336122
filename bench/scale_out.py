"""Scale-out: label processes sharing one run, and the Dask task runner against threads.

    .venv/bin/python bench/scale_out.py                    # both parts, ~15 min on 2 cores
    .venv/bin/python bench/scale_out.py --part processes   # 1, 2, 4 processes on one PostgreSQL
    .venv/bin/python bench/scale_out.py --part dask        # thread vs Dask 1 / 2 workers
    .venv/bin/python bench/scale_out.py --images 24        # a smoke run

Part ``processes`` (the reliability issue's figure):
A held-out shapes-vqa set (seed 11) is prepared and its features cached once; then, for
each worker count, a fresh database on a PostgreSQL server started here and that many
``evocomp label --in-process`` processes started together on the *same* selection (params.yaml's
label settings, one torch thread each). They share the run through the store's claims.
Reported per worker count: the wall time from the first start to the last exit, the labels
done, and ``searches_per_sample`` (claims granted / samples, from the store: 1.0 means no
sample was searched twice). On the 2-core machine the wall time stops improving at 2
processes; the figure that must hold at every count is searches per sample = 1.0.

Part ``dask`` (the scale-out issue's figure): the same samples labelled by the Prefect flow,
each into a fresh SQLite store, with a `prefect server` started here: the thread runner with
2 workers (``thread_s``); a Dask LocalCluster of 1 and of 2 worker processes, one per run
(``dask_1_s``, ``dask_2_s``: cluster start and worker warm-up included); and an existing
cluster started as separate ``dask scheduler`` / ``dask worker --nworkers 2`` processes, the
way a team runs it, labelled twice (``dask_existing_cold_s`` pays each worker's imports and
model load, ``dask_existing_warm_s`` finds them loaded); and ``evocomp label --task-runner
dask --dask-workers 2`` with no server configured (``dask_2_temporary_server_s``: the
workers share the flow's temporary server, whose start is included). ``fixed_s`` and
``per_sample_s``
split the warm external-cluster time into a per-run and a per-sample part from two sizes,
to size a cluster. Writes ``metrics/bench_scale_out.json`` (both parts' keys).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sqlalchemy as sa  # noqa: E402
import yaml  # noqa: E402
from _common import command_line, describe_machine, machine_info  # noqa: E402

from evocomp.config import load_params  # noqa: E402
from evocomp.data.prepared import load_prepared, write_prepared  # noqa: E402
from evocomp.data.readers import read_dataset  # noqa: E402
from evocomp.data.synth import write_dataset  # noqa: E402
from evocomp.features.compute import ensure_features  # noqa: E402
from evocomp.files import write_json_atomic  # noqa: E402
from evocomp.mllm.loader import load_mllm  # noqa: E402
from tests.pg import find_pg_bin, running_postgres  # noqa: E402

EVOCOMP = str(Path(sys.executable).parent / "evocomp")


def run_workers(tmp: Path, model: Path, url: str, n: int) -> dict:
    """``n`` label processes on the same selection; wall time, labels, searches per sample."""
    cmd = [EVOCOMP, "label", "--in-process", "--data", str(tmp / "prepared"), "--model", str(model),
           "--features", str(tmp / "features"), "--db-url", url, "--params", str(tmp / "params.yaml")]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*cmd, "--out", str(tmp / f"l{i}.parquet"), "--metrics", str(tmp / f"m{i}.json")],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(n)
    ]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"a label process failed ({p.returncode}):\n{err[-2000:]}")
    wall = time.perf_counter() - t0
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        done = conn.execute(sa.text("SELECT count(*) FROM labels WHERE status = 'done'")).scalar()
        granted = conn.execute(sa.text("SELECT coalesce(sum(searches), 0) FROM claims")).scalar()
    engine.dispose()
    return {
        "wall_s": round(wall, 2),
        "done": int(done),
        "searches_per_sample": round(granted / done, 4),
    }


def dask_part(tmp: Path, model: Path, label, n_samples: int) -> dict:
    """Thread vs Dask (LocalCluster 1 / 2 workers, an existing 2-worker cluster) on the samples."""
    from tests.servers import dask_cluster, prefect_server

    counter = iter(range(10**6))
    (tmp / "prefect").mkdir()
    out: dict = {}
    with prefect_server(tmp / "prefect") as url:
        os.environ["PREFECT_API_URL"] = url  # before flows.label imports prefect; workers inherit
        import flows.label as fl

        def flow(ids=None, **kw) -> float:
            i = next(counter)
            t0 = time.perf_counter()
            summary = fl.run_label(
                data=str(tmp / "prepared"), model=str(model), features_dir=str(tmp / "features"),
                db_url=f"sqlite:///{tmp / f'd{i}.db'}", labels_out=str(tmp / f"d{i}.parquet"),
                metrics_out=str(tmp / f"d{i}.json"), ids=ids, **kw,
            )  # fmt: skip
            assert summary["done"] == summary["selected"], summary
            return round(time.perf_counter() - t0, 2)

        out["thread_s"] = flow(params=label.model_copy(update={"workers": 2}))
        print(f"thread runner, 2 workers: {out['thread_s']} s", flush=True)
        out["dask_1_s"] = flow(params=label, runner="dask", dask_workers=1)
        print(f"Dask LocalCluster, 1 worker: {out['dask_1_s']} s", flush=True)
        out["dask_2_s"] = flow(params=label, runner="dask", dask_workers=2)
        print(f"Dask LocalCluster, 2 workers: {out['dask_2_s']} s", flush=True)
        # `evocomp label` with no Prefect server configured: the workers share the flow's
        # temporary server (its start is included)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env["PREFECT_HOME"] = str(tmp / "prefect-temporary")
        cmd = [EVOCOMP, "label", "--prefect", "--task-runner", "dask", "--dask-workers", "2",
               "--data", str(tmp / "prepared"), "--model", str(model), "--features",
               str(tmp / "features"), "--db-url", f"sqlite:///{tmp / 'cli.db'}", "--params",
               str(tmp / "params.yaml"), "--out", str(tmp / "cli.parquet"), "--metrics",
               str(tmp / "cli.json")]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)
        out["dask_2_temporary_server_s"] = round(time.perf_counter() - t0, 2)
        print(f"the same from the CLI, no server configured: {out['dask_2_temporary_server_s']} s")
        two = label.model_copy(update={"workers": 2})
        with dask_cluster(tmp, workers=2) as address:
            out["dask_existing_cold_s"] = flow(params=two, runner="dask", dask_address=address)
            out["dask_existing_warm_s"] = flow(params=two, runner="dask", dask_address=address)
            ids = [s.id for s in load_prepared(tmp / "prepared")][: n_samples // 4]
            quarter = flow(params=two, runner="dask", dask_address=address, ids=ids)
        print(f"existing 2-worker cluster: {out['dask_existing_cold_s']} s cold, "
              f"{out['dask_existing_warm_s']} s warm, {quarter} s warm on {len(ids)}", flush=True)  # fmt: skip
    per_sample = (out["dask_existing_warm_s"] - quarter) / (n_samples - len(ids))
    out |= {
        "dask_2_vs_1": round(out["dask_1_s"] / out["dask_2_s"], 3),
        "dask_2_vs_thread": round(out["dask_2_s"] / out["thread_s"], 3),
        "existing_warm_vs_thread": round(out["dask_existing_warm_s"] / out["thread_s"], 3),
        "per_sample_s": round(per_sample, 4),
        "fixed_s": round(out["dask_existing_warm_s"] - per_sample * n_samples, 2),
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("processes", "dask", "all"), default="all")
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="processes part")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "mllm")
    ap.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_scale_out.json")
    args = ap.parse_args(argv)
    bin_dir = find_pg_bin()
    if args.part != "dask" and bin_dir is None:
        sys.exit("no PostgreSQL binaries found (apt-get install postgresql)")
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="evocomp-bench-scale-"))
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}  # the other part's
    try:
        write_dataset(tmp / "raw", n=args.images, seed=11)
        write_prepared(read_dataset(tmp / "raw"), tmp / "prepared", "bench")
        samples = load_prepared(tmp / "prepared")
        ensure_features(load_mllm(args.model), samples, tmp / "features")
        label = load_params(REPO / "params.yaml").label
        (tmp / "params.yaml").write_text(yaml.safe_dump({"label": label.model_dump(mode="json")}))
        info = machine_info("cpu")
        print(describe_machine(info), flush=True)
        common = {"samples": len(samples), "command": command_line(argv, __file__), "machine": info}
        if args.part in ("processes", "all"):
            results = {}
            with running_postgres(bin_dir) as server:
                for n in args.workers:
                    url = server.create_database(f"scale_{n}")
                    results[str(n)] = run_workers(tmp, args.model, url, n)
                    print(f"{n} processes: {results[str(n)]}", flush=True)
            report |= {"processes": results} | {f"processes_{k}": v for k, v in common.items()}
        if args.part in ("dask", "all"):
            report |= dask_part(tmp, args.model, label, len(samples))
            report |= {f"dask_{k}": v for k, v in common.items()} | {"samples": len(samples)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["wall_seconds_" + args.part] = round(time.perf_counter() - t_start, 1)
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
