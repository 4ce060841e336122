"""The label flow: search every selected sample once, store it, export the label set.

    evocomp label --split test                                 # ephemeral Prefect, thread pool
    evocomp label --task-runner dask --dask-address tcp://HOST:8786
    evocomp label --in-process                                 # the same steps, no Prefect

Steps: migrate the store; select samples (splits, sample ids, shard); upsert them;
open the run of (model id, search-params hash); skip the samples that run has
already labelled *before any model work*; compute missing features; map label
tasks over the samples on the task runner chosen once for the flow, two per
worker in flight -- one sample per task at first, then micro-batches sized to
about 2 s of search (``batch_size`` fixes it); finish the run, export the Parquet
label set and ``metrics/labels.json``. A sample that cannot be labelled is stored
as failed with its reason and never stops the flow. Each worker process loads the
model once; tasks get a :class:`ModelRef` (content id + path), never the model.
"""

from __future__ import annotations

import evocomp.prefect_env  # noqa: F401  (before prefect is imported)

# isort: split
import hashlib
import inspect
import json
import logging
import math
import os
import queue
import statistics
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from sqlalchemy.exc import InterfaceError, OperationalError

from evocomp import store as db
from evocomp.config import LabelParams, SearchParams
from evocomp.datasets import DatasetError, Sample
from evocomp.features import FeatureStore, compute
from evocomp.labeling import label_and_store
from evocomp.mllm.base import ModelError
from evocomp.mllm.hf_llava import DTYPES, HFLlava, checkpoint_id
from evocomp.prepared import load_prepared
from evocomp.search import run_spec

RETRYABLE = (OperationalError, InterfaceError, db.StoreError, OSError)  # I/O that can heal
FEATURE_BATCH = 64  # samples per vision-tower pass
FEATURE_TASK = 512  # samples per features task: few tasks, spread over the workers
TASK_SECONDS = 2.0  # label tasks of about this long, when the batch size is automatic
MAX_BATCH = 128  # samples per label task, at most (a retry redoes at most this many)


def _on_io_error(task, task_run, state) -> bool:
    """Retry only I/O failures: a bad sample or a bad checkpoint would fail again."""
    return isinstance(state.result(raise_on_failure=False), RETRYABLE)


io_task = task(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2, 4, 8 s
    retry_jitter_factor=0.5,
    retry_condition_fn=_on_io_error,
    cache_policy=NO_CACHE,  # the store is the cache; a Prefect cache could outlive the store
)


class Batch:
    """A list passed to a task as one value: Prefect and Dask do not walk into it.

    (Prefect visits every field of every sample of a plain list argument, ~2 ms per sample;
    ``prefect.utilities.annotations.quote`` avoids that but does not survive Dask.)
    """

    __slots__ = ("items",)

    def __init__(self, items):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i):
        return self.items[i]


# ---- one model and one feature index per worker process ---------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the model: where it lives and its content id."""

    path: str
    device: str
    dtype: str
    model_id: str


def model_ref(path: str | Path, device: str = "cpu", dtype: str = "float32") -> ModelRef:
    """Check a checkpoint folder and compute its content id, without loading the model."""
    p = Path(path).resolve()
    if not (p / "config.json").is_file():
        raise ModelError(
            f"{path}: not a model checkpoint directory (no config.json); "
            "train one with `evocomp mllm train` or pass --model"
        )
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return ModelRef(str(p), device, dtype, checkpoint_id(p))


_models: dict[tuple[str, str, str], HFLlava] = {}
_features: dict[tuple[str, str], FeatureStore] = {}
_lock = threading.Lock()
model_loads = 0  # models this process loaded: a fully labelled selection loads none


def worker_mllm(ref: ModelRef) -> HFLlava:
    """This process's copy of the model, loaded on first use (other threads wait for it)."""
    global model_loads
    with _lock:
        key = (ref.path, ref.device, ref.dtype)
        if key not in _models:
            mllm = HFLlava(ref.path, device=ref.device, dtype=ref.dtype)
            if mllm.model_id != ref.model_id:
                raise ModelError(f"{ref.path} changed while labelling: now {mllm.model_id}")
            _models[key], model_loads = mllm, model_loads + 1
        return _models[key]


def worker_features(root: str, model_id: str, sample_id: str):
    """One sample's features from this process's index of the shards (re-read once if absent)."""
    for fresh in (False, True):
        with _lock:
            if fresh or (root, model_id) not in _features:
                _features[(root, model_id)] = FeatureStore(root, model_id)
                _features[(root, model_id)].missing(())  # read the index under the lock
            fs = _features[(root, model_id)]
        if fresh or sample_id in fs:
            return fs.get(sample_id)
    raise AssertionError("unreachable")


def _reason(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    return f"{type(err).__name__}: {text}"


# ---- which samples ----------------------------------------------------------------------------
def in_shard(sample_id: str, shard: tuple[int, int]) -> bool:
    """Whether a sample is in shard ``i`` of ``n``: a stable hash of its id, not its position."""
    i, n = shard
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:16], 16) % n == i


def select_samples(data, splits, max_samples=None, ids=None, shard=None) -> list[Sample]:
    """The prepared samples of ``splits`` (first ``max_samples`` each), or only ``ids``; one shard."""
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard {shard[0]}/{shard[1]}: expected i/n with 0 <= i < n")
    limit = None if ids is not None else max_samples  # requested ids may lie past the first N
    samples = [s for split in splits for s in load_prepared(data, split, limit)]
    if ids is not None:
        wanted = set(ids)
        samples = [s for s in samples if s.id in wanted]
        if ids and not samples:
            raise DatasetError(
                f"none of the {len(ids)} sample ids is in {data} ({', '.join(splits)})"
            )
    return [s for s in samples if in_shard(s.id, shard)] if shard else samples


def code_version() -> str:
    """The package version, plus the git commit when the code is in a checkout."""
    import evocomp

    ver = getattr(evocomp, "__version__", None)
    if ver is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("evocomp")
        except PackageNotFoundError:
            ver = "0+unknown"
    git = ["git", "rev-parse", "--short", "HEAD"]
    try:
        sha = subprocess.run(
            git, capture_output=True, text=True, timeout=5, cwd=Path(evocomp.__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{ver}+g{sha}" if sha else ver


# ---- tasks ------------------------------------------------------------------------------------
@io_task
def open_run(
    db_url: str, data: str, samples: Batch, model_id: str, search: SearchParams, version: str
) -> tuple[int, set[str]]:
    """Migrate the store, upsert the samples, open the run; return it and its labelled ids."""
    db.upgrade(db_url)
    engine = db.get_engine(db_url)
    try:  # the dataset is named by its source, as recorded by `evocomp prepare`
        name = str(json.loads((Path(data) / "manifest.json").read_text())["source"])
    except (OSError, ValueError, KeyError):
        name = str(Path(data).resolve())
    ds = db.ensure_dataset(engine, name[:255], name[:1024])
    cwd = Path.cwd().resolve()
    rows = [
        {
            "id": s.id,
            "split": s.split,
            "qtype": s.meta.get("qtype"),
            "question": s.question,
            "answer": s.answer,
            "meta": s.meta,
            "image": str(s.image.relative_to(cwd) if s.image.is_relative_to(cwd) else s.image),
        }
        for s in samples
    ]
    db.upsert_samples(engine, ds, rows)
    spec = run_spec(search)
    run_id = db.get_or_create_run(engine, model_id, spec, version)
    return run_id, db.labelled_sample_ids(engine, model_id, db.params_hash(spec))


@io_task
def compute_features(
    model: ModelRef, samples: Batch | list[Sample], root: str, db_url: str, run_id: int
) -> dict[str, str]:
    """Compute and store these samples' features; a sample that fails (a corrupt image) is
    stored as a failed label. Returns ``{sample id: reason}`` of those failures."""
    fs, failures = FeatureStore(root, model.model_id), {}
    for start in range(0, len(samples), FEATURE_BATCH):
        batch = samples[start : start + FEATURE_BATCH]
        try:
            fs.put(compute(worker_mllm(model), batch))  # one vision pass for the batch
            continue
        except (ValueError, RuntimeError):
            good = {}  # isolate the culprits, one sample at a time
        for s in batch:
            try:
                good |= compute(worker_mllm(model), [s])
                good[s.id].check(s.id)
            except (ValueError, RuntimeError) as err:
                good.pop(s.id, None)
                failures[s.id] = _reason(err)
        if good:
            fs.put(good)
    for sid, reason in failures.items():
        db.write_failure(db.get_engine(db_url), run_id, sid, reason)
    return failures


@io_task(task_run_name="label-{batch[0].id:.12}")
def label_batch(
    batch: Batch | list[Sample],
    model: ModelRef,
    params: SearchParams,
    features_dir: str,
    db_url: str,
    run_id: int,
) -> tuple[dict[str, str], float]:
    """Search and store each sample of a (small) batch.

    Returns ``({sample id: done|failed}, seconds)``; the flow sizes later batches from the time.
    """
    t0, mllm, engine = time.perf_counter(), worker_mllm(model), db.get_engine(db_url)
    status = {}
    for s in batch:
        try:
            feats = worker_features(features_dir, model.model_id, s.id)
        except (KeyError, ValueError) as err:  # missing or unusable (NaN) features
            db.write_failure(engine, run_id, s.id, _reason(err))
            status[s.id] = "failed"
            continue
        status[s.id] = label_and_store(mllm, s, feats, params, engine, run_id)
    return status, time.perf_counter() - t0


def label_metrics(labels: str | Path, failed: int) -> dict:
    """``metrics/labels.json`` (DESIGN.md) of an exported label set."""
    import pandas as pd

    def mean(xs) -> float | None:
        vals = [float(x) for x in xs if x is not None and math.isfinite(x)]
        return sum(vals) / len(vals) if vals else None

    df = pd.read_parquet(labels)
    heur = [json.loads(h) for h in df["heuristic_losses"]]
    best = [min((v for v in h.values() if v is not None), default=None) for h in heur]
    groups = [int(g) for g in df["n_groups"].dropna()]
    return {
        "samples": len(df),
        "failed": failed,
        "mean_label_loss": mean(df["loss"]),
        "mean_full_loss": mean(df["full_loss"]),
        "mean_heuristic_loss": {
            m: mean(h.get(m) for h in heur) for m in sorted(set().union(*heur))
        },
        "never_worse_than_best_heuristic": mean(
            float(loss <= b + 1e-6)
            for loss, b in zip(df["loss"], best, strict=True)
            if b is not None
        ),
        "mean_kept_fraction": mean(df["k"] / df["n_tokens"].where(df["n_tokens"] > 0)),
        "median_groups": float(statistics.median(groups)) if groups else None,
    }


def fitness_curve(engine, run_id: int) -> str:
    """CSV of the run's convergence: per generation, the mean over its labels of min/avg/max."""
    from sqlalchemy import func, select

    g = db.Generation
    stmt = (
        select(g.gen, func.avg(g.min), func.avg(g.avg), func.avg(g.max), func.count())
        .join(db.Label, g.label_id == db.Label.id)
        .where(db.Label.run_id == run_id, db.Label.status == "done")
        .group_by(g.gen)
        .order_by(g.gen)
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return "gen,min,avg,max,samples\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)


def _write_atomic(path: str | Path, text: str) -> None:
    """Temp file + rename: never a half-written metrics file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@io_task
def close_run(
    db_url: str, run_id: int, model_id: str, selected: Batch, labels_out: str,
    metrics_out: str, fitness_out: str | None = None,
) -> dict:  # fmt: skip
    """Finish the run, export the label set, its metrics and fitness curve; summarise the selection."""
    engine, wanted = db.get_engine(db_url), set(selected)
    run = db.run_summary(engine, run_id)
    failures = [f for f in run["failures"] if f["sample_id"] in wanted]
    run["status"] = "failed" if failures else "done"
    db.finish_run(engine, run_id, run["status"])
    exported = db.export_labels(engine, labels_out, model_id=model_id)
    metrics = label_metrics(labels_out, run["failed"])
    _write_atomic(metrics_out, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if fitness_out:
        _write_atomic(fitness_out, fitness_curve(engine, run_id))
    done = db.labelled_sample_ids(engine, model_id, run["params_hash"]) & wanted
    return {
        k: run.pop(k) for k in ("run_id", "model_id", "params_hash", "code_version", "status")
    } | {
        "selected": len(wanted),
        "done": len(done),
        "failed": len(failures),
        "failures": failures,
        "mean_loss": run["mean_loss"],
        "mean_full_loss": run["mean_full_loss"],
        "mean_heuristic_loss": run["mean_heuristic_loss"],
        "run": run,
        "exported": exported,
    }


# ---- progress ---------------------------------------------------------------------------------
_progress_hooks: list[Callable[[int, int], None]] = []


class progress_hook:  # noqa: N801 - used like a function in `with`
    """Within the block, call ``fn(done, total)`` as samples finish (the CLI's progress bar)."""

    def __init__(self, fn: Callable[[int, int], None]):
        self.fn = fn

    def __enter__(self):
        _progress_hooks.append(self.fn)

    def __exit__(self, *exc):
        _progress_hooks.remove(self.fn)


class _Meter:
    """Logs done/total, samples per minute and ETA, at most every ``every_s`` seconds."""

    def __init__(self, total: int, log, every_s: float = 10.0):
        self.total, self.log, self.every_s = total, log, every_s
        self.done, self.t0, self.last = 0, time.monotonic(), -math.inf

    def add(self, n: int) -> None:
        self.done += n
        for hook in list(_progress_hooks):
            hook(self.done, self.total)
        now = time.monotonic()
        if n and (now - self.last >= self.every_s or self.done == self.total):
            self.last, rate = now, self.done / max(now - self.t0, 1e-9) * 60
            eta = (self.total - self.done) / rate * 60
            self.log.info(
                f"labelled {self.done}/{self.total}: {rate:.1f} samples/min, ETA {eta:.0f} s"
            )


# ---- the flow ---------------------------------------------------------------------------------
def _slots(params: LabelParams) -> int:
    """Tasks that run at once: the thread pool's size, or a Dask cluster's threads."""
    ctx = FlowRunContext.get()
    client = getattr(ctx.task_runner, "_client", None) if ctx else None
    return max(params.workers, sum(client.nthreads().values()) if client is not None else 0)


def auto_batch_size(seconds: float, searched: int, remaining: int, slots: int) -> int:
    """Samples for the next task: ~TASK_SECONDS of search at the rate seen so far, at most
    MAX_BATCH, and no more than a slot's share of what is left (1 before any timing)."""
    if not searched:
        return 1
    per_sample = max(seconds / searched, 1e-3)
    share = -(-remaining // slots)  # ceil
    return max(1, min(MAX_BATCH, round(TASK_SECONDS / per_sample), share))


def _map_prefect(
    samples: list[Sample], batch_size: int | None, slots: int, args: tuple
) -> Iterator[tuple]:
    """Submit ``label_batch`` tasks, two per slot in flight; yield (batch, result or error).

    ``batch_size=None`` sizes batches from the latest task's time per sample: tasks of about
    TASK_SECONDS (Prefect costs ~25-40 ms of CPU per task), but small enough to keep every
    slot busy until the end.
    """
    finished: queue.Queue = queue.Queue()
    # The latest finished task's (seconds, samples): a running total would let the first
    # task's one-off costs (feature index, warm-up) keep later tasks small for long.
    todo, in_flight, last = deque(samples), {}, [0.0, 0]

    def submit_next() -> None:
        if todo:
            n = batch_size or auto_batch_size(last[0], last[1], len(todo), slots)
            batch = [todo.popleft() for _ in range(min(n, len(todo)))]
            future = label_batch.submit(Batch(batch), *args)
            in_flight[future] = batch
            future.add_done_callback(finished.put)

    for _ in range(slots):  # one sample each: the first timings size the rest
        submit_next()
    while in_flight:
        future = finished.get()
        batch = in_flight.pop(future)
        try:
            out = future.result(raise_on_failure=False)
        except Exception as err:  # noqa: BLE001 - e.g. a Dask worker lost for good
            out = err
        if not isinstance(out, BaseException):
            out, seconds = out
            last[0], last[1] = seconds, len(batch)
        while todo and len(in_flight) < 2 * slots:  # one running and one queued per slot
            submit_next()
        yield batch, out


def _label(*, prefect: bool, data, splits, model, params, features_dir, db_url, shard, ids,
           labels_out, metrics_out, fitness_out, device, dtype, batch_size) -> dict:  # fmt: skip
    """The flow's body; with ``prefect=False`` the same steps run as plain calls in a loop."""
    t0, params = time.monotonic(), params or LabelParams()
    log = get_run_logger() if prefect else logging.getLogger("evocomp.label")
    step = (lambda t: t) if prefect else (lambda t: t.fn)
    db_url, features_dir = db_url or db.default_db_url(), str(Path(features_dir).resolve())
    samples = select_samples(data, splits or params.splits, params.max_samples, ids, shard)
    ref, search = model_ref(model, device, dtype), params.search()
    args = (db_url, str(data), Batch(samples), ref.model_id, search, code_version())
    run_id, done = step(open_run)(*args)
    todo = [s for s in samples if s.id not in done]
    log.info(
        f"run {run_id} ({ref.model_id}): {len(samples)} samples selected, "
        f"{len(samples) - len(todo)} already labelled, {len(todo)} to search"
    )
    # Features where the compute is (the runner's workers), before any search needs them.
    missing = set(FeatureStore(features_dir, ref.model_id).missing(s.id for s in todo))
    need = [s for s in todo if s.id in missing]
    chunks = [need[i : i + FEATURE_TASK] for i in range(0, len(need), FEATURE_TASK)]
    fargs = (features_dir, db_url, run_id)
    if prefect:
        futures = [compute_features.submit(ref, Batch(c), *fargs) for c in chunks]
        bad = {k: v for f in futures for k, v in f.result().items()}
    else:
        bad = {k: v for c in chunks for k, v in compute_features.fn(ref, c, *fargs).items()}
    meter = _Meter(len(todo), log)
    meter.add(len(bad))
    runnable = [s for s in todo if s.id not in bad]
    args = (ref, search, features_dir, db_url, run_id)
    if prefect:
        results = _map_prefect(runnable, batch_size, _slots(params), args)
    else:
        results = (([s], label_batch.fn([s], *args)[0]) for s in runnable)
    for batch, out in results:
        if isinstance(out, BaseException):  # the task itself failed, after its retries
            for s in batch:
                db.write_failure(db.get_engine(db_url), run_id, s.id, _reason(out))
        meter.add(len(batch))
    selected = Batch(s.id for s in samples)
    summary = step(close_run)(
        db_url, run_id, ref.model_id, selected, labels_out, metrics_out, fitness_out
    )
    if prefect:
        summary["flow_run_id"] = str(FlowRunContext.get().flow_run.id)
    summary |= {
        "skipped": len(samples) - len(todo),
        "searched": len(runnable),
        "seconds": time.monotonic() - t0,
    }
    for f in summary["failures"]:
        log.warning(f"sample {f['sample_id']} failed: {f['error']}")
    log.info(
        f"run {run_id}: {summary['done']}/{summary['selected']} labelled, {summary['failed']} "
        f"failed, {summary['searched']} searched in {summary['seconds']:.1f} s"
    )
    return summary


@flow(name="label-dataset", task_runner=ThreadPoolTaskRunner(max_workers=2))
def label_dataset(
    data: str = "data/prepared",
    splits: list[str] | None = None,
    model: str = "models/mllm",
    params: LabelParams | None = None,
    features_dir: str = "data/features",
    db_url: str | None = None,
    shard: tuple[int, int] | None = None,
    ids: list[str] | None = None,
    labels_out: str = "data/labels/labels.parquet",
    metrics_out: str = "metrics/labels.json",
    fitness_out: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int | None = None,
) -> dict:
    """Label the selected samples with the genetic search; return the run summary.

    ``summary["failed"]`` counts the selected samples that failed; ``summary["failures"]``
    lists them with their reasons.
    """
    return _label(**locals(), prefect=True)  # every argument, by name


def task_runner(
    kind: str, workers: int, dask_address: str | None = None, dask_workers: int | None = None
):
    """The flow's task runner: a bounded thread pool, or Dask (a scheduler or a LocalCluster)."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind != "dask":
        raise ValueError(f"unknown task runner {kind!r}; expected thread or dask")
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    n = dask_workers or workers
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "dashboard_address": ":0"}
    )


def run_label(
    *,
    runner: str = "thread",
    dask_address: str | None = None,
    dask_workers: int | None = None,
    in_process: bool = False,
    **kwargs,
) -> dict:
    """Run the label flow on the chosen task runner, or (``in_process``) without Prefect."""
    params = kwargs.get("params") or LabelParams()
    if in_process:
        defaults = {k: p.default for k, p in inspect.signature(label_dataset.fn).parameters.items()}
        return _label(**(defaults | kwargs | {"params": params}), prefect=False)
    chosen = task_runner(runner, params.workers, dask_address, dask_workers)
    return label_dataset.with_options(task_runner=chosen)(**kwargs)
