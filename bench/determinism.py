"""Same inputs, same labels: one label set, labelled every way a team might run it.

    .venv/bin/python bench/determinism.py                  # 120 images, ~6 min on 2 cores
    .venv/bin/python bench/determinism.py --images 12      # a smoke run

A held-out shapes-vqa set (seed 7) is labelled with params.yaml's label settings by the
committed reference model, each variant into a fresh SQLite store, and every label set is
named by :func:`evocomp.labelset.label_set_hash` (what its labels decide: kept tokens and
soft labels). Variants:

- ``thread_1`` / ``thread_2``: the Prefect flow on a thread pool of 1 / 2 workers;
- ``batch_1`` / ``batch_32``: 2 workers, 1 / 32 samples per task;
- ``dask_2``: a Dask LocalCluster of 2 worker processes (a `prefect server` started here);
- ``in_process``: ``evocomp label --in-process``;
- ``loaded``: ``thread_2`` while two busy-loop processes compete for the 2 cores;
- ``resumed``: ``evocomp label`` killed with SIGKILL mid-run, then run again;
- ``features_threads_1`` / ``features_threads_2`` / ``features_batch_7``: the features
  recomputed with 1 / 2 torch threads and a vision batch of 7 (float noise of their own);
- ``noise_1e-7`` / ``noise_1e-6``: the features perturbed by that relative Gaussian noise,
  the nearest vocabulary words recomputed from them -- another CPU, simulated (the measured
  cross-machine difference is ~1e-8 relative; 1e-6 is a hundred times that).

``identical`` is true when every hash of the first eleven (the ways a team runs it on its
machines) equals the first; the noise variants are reported apart (``simulated_noise``:
their hash and how many labels moved), and repeated with the tolerance grids switched off
(raw float comparisons; ties still by the salted hash): ``raw_vs_grid`` counts the samples
whose kept set moved either way. Writes ``metrics/bench_determinism.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.servers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from _common import command_line, describe_machine, machine_info  # noqa: E402

from evocomp.config import load_params  # noqa: E402
from evocomp.data.prepared import load_prepared, write_prepared  # noqa: E402
from evocomp.data.readers import read_dataset  # noqa: E402
from evocomp.data.synth import write_dataset  # noqa: E402
from evocomp.features.cache import FeatureStore  # noqa: E402
from evocomp.features.compute import compute  # noqa: E402
from evocomp.features.grouping import nearest_vocab  # noqa: E402
from evocomp.files import write_json_atomic  # noqa: E402
from evocomp.labelset import label_set_hash, load_label_set  # noqa: E402
from evocomp.mllm.loader import load_mllm  # noqa: E402
from tests.servers import prefect_server  # noqa: E402

EVOCOMP = str(Path(sys.executable).parent / "evocomp")


def features(mllm, samples, root: Path, threads: int, batch: int, noise: float = 0.0) -> Path:
    """The samples' features under ``root`` computed with ``threads`` torch threads and vision
    batches of ``batch``; with ``noise``, the tokens and scores perturbed by that relative
    Gaussian noise and the nearest words recomputed from the perturbed tokens."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        store, gen, vocab = (
            FeatureStore(root, mllm.model_id),
            torch.Generator().manual_seed(0),
            None,
        )
        for start in range(0, len(samples), batch):
            out = compute(mllm, samples[start : start + batch])
            if noise:
                vocab = mllm.vocab_embeddings() if vocab is None else vocab

                def jitter(x: torch.Tensor) -> torch.Tensor:
                    return x * (1 + noise * torch.randn(x.shape, generator=gen))

                out = {
                    sid: replace(f, tokens=(t := jitter(f.tokens)), nearest=nearest_vocab(t, vocab),
                                 cls_attn=jitter(f.cls_attn), text_attn=jitter(f.text_attn))
                    for sid, f in out.items()
                }  # fmt: skip
            store.put(out)
    finally:
        torch.set_num_threads(before)
    return root


class Grids:
    """Switch the tolerance grids off (raw float comparisons) inside the block."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        import evocomp.baselines as baselines
        import evocomp.labeling.sample as sample
        import evocomp.search.scoring as scoring

        self.saved = (scoring.loss_on_grid, sample.loss_on_grid, baselines.scores_on_grid)
        if not self.on:
            scoring.loss_on_grid = sample.loss_on_grid = float
            baselines.scores_on_grid = lambda t: t.detach().double()

    def __exit__(self, *exc):
        import evocomp.baselines as baselines
        import evocomp.labeling.sample as sample
        import evocomp.search.scoring as scoring

        scoring.loss_on_grid, sample.loss_on_grid, baselines.scores_on_grid = self.saved


def run(args) -> dict:
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="evocomp-bench-determinism-"))
    model = args.model
    write_dataset(tmp / "raw", n=args.images, seed=7)
    write_prepared(read_dataset(tmp / "raw"), tmp / "prepared", "bench")
    samples = load_prepared(tmp / "prepared")
    label = load_params(REPO / "params.yaml").label
    (tmp / "params.yaml").write_text(yaml.safe_dump({"label": label.model_dump(mode="json")}))
    info = machine_info("cpu")
    print(describe_machine(info), flush=True)
    print(f"{len(samples)} samples; label settings of params.yaml ({label.mode} mode)", flush=True)
    mllm = load_mllm(model)
    feats = {"base": features(mllm, samples, tmp / "f-base", torch.get_num_threads(), 64)}
    counter = iter(range(10**6))

    def flow(features_dir: Path, **kw) -> Path:
        import flows.label as fl

        i = next(counter)
        out = tmp / f"labels-{i}.parquet"
        fl.run_label(data=str(tmp / "prepared"), model=str(model), params=label.model_copy(update=kw.pop("params", {})),
                     features_dir=str(features_dir), db_url=f"sqlite:///{tmp / f'store-{i}.db'}",
                     labels_out=str(out), metrics_out=str(tmp / f"m-{i}.json"), **kw)  # fmt: skip
        return out

    def cli(features_dir: Path, kill_after: int | None = None) -> Path:
        i = next(counter)
        out, db = tmp / f"labels-{i}.parquet", tmp / f"store-{i}.db"
        cmd = [EVOCOMP, "label", "--in-process", "--data", str(tmp / "prepared"), "--model", str(model),
               "--features", str(features_dir), "--db-url", f"sqlite:///{db}", "--params",
               str(tmp / "params.yaml"), "--out", str(out), "--metrics", str(tmp / f"m-{i}.json")]  # fmt: skip
        if kill_after:
            proc = subprocess.Popen(
                cmd,
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            while proc.poll() is None and stored(db) < kill_after:
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"  killed after {stored(db)} labels", flush=True)
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        return out

    hashes, kept, seconds = {}, {}, {}

    def record(name: str, make) -> None:
        t0 = time.perf_counter()
        path = make()
        seconds[name] = round(time.perf_counter() - t0, 1)
        df = load_label_set(path)
        hashes[name], kept[name] = (
            label_set_hash(df),
            dict(zip(df["sample_id"], map(tuple, df["kept"]), strict=True)),
        )
        print(f"{name:<20} {hashes[name]}  ({seconds[name]} s)", flush=True)

    with prefect_server(tmp) as url:
        os.environ["PREFECT_API_URL"] = url  # before flows.label imports prefect
        base = feats["base"]
        record("thread_1", lambda: flow(base, params={"workers": 1}))
        record("thread_2", lambda: flow(base, params={"workers": 2}))
        record("batch_1", lambda: flow(base, params={"workers": 2}, batch_size=1))
        record("batch_32", lambda: flow(base, params={"workers": 2}, batch_size=32))
        record("dask_2", lambda: flow(base, runner="dask", dask_workers=2))
        record("in_process", lambda: cli(base))
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        try:
            record("loaded", lambda: flow(base, params={"workers": 2}))
        finally:
            for p in busy:
                p.kill()
        record("resumed", lambda: cli(base, kill_after=max(2, len(samples) // 3)))
        for name, threads, batch in (("features_threads_1", 1, 64), ("features_threads_2", 2, 64),
                                     ("features_batch_7", torch.get_num_threads(), 7)):  # fmt: skip
            f = features(mllm, samples, tmp / f"f-{name}", threads, batch)
            record(name, lambda f=f: flow(f, params={"workers": 2}))
        raw_vs_grid, simulated = {}, {}
        for noise in (1e-7, 1e-6):
            f = features(
                mllm, samples, tmp / f"f-noise-{noise}", torch.get_num_threads(), 64, noise
            )
            record(f"noise_{noise:.0e}", lambda f=f: flow(f, params={"workers": 2}))
            simulated[f"{noise:.0e}"] = hashes.pop(f"noise_{noise:.0e}")
            moved = {}
            for grids in (False, True):
                with Grids(grids):
                    a = load_label_set(flow(base, in_process=True))
                    b = load_label_set(flow(f, in_process=True))
                ka = dict(zip(a["sample_id"], map(tuple, a["kept"]), strict=True))
                kb = dict(zip(b["sample_id"], map(tuple, b["kept"]), strict=True))
                moved["grid" if grids else "raw"] = sum(ka[s] != kb[s] for s in ka)
            raw_vs_grid[f"{noise:.0e}"] = moved
            print(f"  labels moved by {noise:.0e} noise: {moved}", flush=True)

    first = next(iter(hashes.values()))
    ref = kept["thread_1"]
    report = {
        "hashes": hashes,  # the ways a team runs it on its machines
        "identical": all(h == first for h in hashes.values()),
        "differing_samples": {k: sum(ref[s] != v[s] for s in ref) for k, v in kept.items()},
        # another CPU, simulated: the measured cross-machine noise is ~1e-8 relative
        "simulated_noise": {
            n: {
                "hash": h,
                "identical": h == first,
                "differing_samples": sum(ref[s] != kept[f"noise_{n}"][s] for s in ref),
            }
            for n, h in simulated.items()
        },  # fmt: skip
        "raw_vs_grid": raw_vs_grid,
        "samples": len(samples),
        "label_params": label.model_dump(mode="json"),
        "seconds": seconds,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "machine": info,
        "command": command_line(None, __file__),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    return report


def stored(db: Path) -> int:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(db, timeout=1)) as conn:
            return conn.execute("SELECT count(*) FROM labels WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=120, help="held-out images (one question each)")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "mllm")
    ap.add_argument("--out", type=Path, default=REPO / "metrics" / "bench_determinism.json")
    args = ap.parse_args(argv)
    report = run(args)
    write_json_atomic(args.out, report)
    verdict = "identical" if report["identical"] else "NOT identical"
    print(f"\n{len(report['hashes'])} variants: label sets {verdict}")
    for noise, row in report["simulated_noise"].items():
        print(f"features with {noise} relative noise: {row['differing_samples']} labels moved")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
