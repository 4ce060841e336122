"""Scale-out: 1, 2 and 4 `evocomp label` processes sharing one run in one PostgreSQL.

    .venv/bin/python bench/scale_out.py                    # 480 images, ~4 min on 2 cores
    .venv/bin/python bench/scale_out.py --images 24        # a smoke run

A held-out shapes-vqa set (seed 11) is prepared and its features cached once; then, for
each worker count, a fresh database on a PostgreSQL server started here and that many
``evocomp label --in-process`` processes started together on the *same* selection (params.yaml's
label settings, one torch thread each). They share the run through the store's claims.
Reported per worker count: the wall time from the first start to the last exit, the labels
done, and ``searches_per_sample`` (claims granted / samples, from the store: 1.0 means no
sample was searched twice). On the 2-core machine the wall time stops improving at 2
processes; the figure that must hold at every count is searches per sample = 1.0.
Writes ``metrics/bench_scale_out.json`` (key ``processes``).
"""

from __future__ import annotations

import argparse
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
from evocomp.mllm.hf_llava import HFLlava  # noqa: E402
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "mllm")
    ap.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_scale_out.json")
    args = ap.parse_args(argv)
    bin_dir = find_pg_bin()
    if bin_dir is None:
        sys.exit("no PostgreSQL binaries found (apt-get install postgresql)")
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="evocomp-bench-scale-"))
    try:
        write_dataset(tmp / "raw", n=args.images, seed=11)
        write_prepared(read_dataset(tmp / "raw"), tmp / "prepared", "bench")
        samples = load_prepared(tmp / "prepared")
        ensure_features(HFLlava(args.model), samples, tmp / "features")
        label = load_params(REPO / "params.yaml").label
        (tmp / "params.yaml").write_text(yaml.safe_dump({"label": label.model_dump(mode="json")}))
        info = machine_info("cpu")
        print(describe_machine(info), flush=True)
        results = {}
        with running_postgres(bin_dir) as server:
            for n in args.workers:
                url = server.create_database(f"scale_{n}")
                results[str(n)] = run_workers(tmp, args.model, url, n)
                print(f"{n} processes: {results[str(n)]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = {}
    if args.out.is_file():  # keep the other parts of the file (bench/scale_out.py --dask ...)
        import json

        previous = json.loads(args.out.read_text())
    report = previous | {
        "processes": results,
        "processes_samples": len(samples),
        "processes_command": command_line(argv, __file__),
        "processes_machine": info,
        "processes_wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
