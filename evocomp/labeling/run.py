"""A label run, step by step: open it, compute missing features, label batches, close it.

    evocomp label                      # the steps as Prefect tasks (flows/label.py)
    evocomp label --in-process         # the same steps as plain calls (:class:`InProcess`)

:func:`label` is the one body both paths run. Each step is a plain function of picklable
arguments (a sample batch, a :class:`~evocomp.labeling.worker.ModelRef`, a store URL),
so it can run in this thread, a pool thread or a Dask worker process; a
:class:`Steps` object says how: :class:`InProcess` calls them, the flow submits them as
Prefect tasks. Samples the run has already labelled are skipped *before any model work*;
a sample that cannot be labelled is stored as failed with its reason and never stops
the run.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from evocomp import store as db
from evocomp.config import LabelParams, SearchParams
from evocomp.data.samples import Sample, to_row
from evocomp.features.cache import FeatureStore
from evocomp.features.compute import compute
from evocomp.files import write_json_atomic, write_text_atomic
from evocomp.labeling.progress import Meter
from evocomp.labeling.report import fitness_curve, label_metrics
from evocomp.labeling.sample import label_and_store
from evocomp.labeling.selection import select_samples
from evocomp.labeling.worker import ModelRef, model_ref, worker_features, worker_mllm
from evocomp.search import run_spec

FEATURE_BATCH = 64  # samples per vision-tower pass
FEATURE_TASK = 512  # samples per features step: few steps, spread over the workers
# Label batches: about TASKS_PER_WORKER per worker, at most MAX_BATCH samples each. Prefect
# costs ~25-40 ms of CPU per task, so one sample per task (~30 ms of search on the reference
# model) would double the run; four tasks per worker keep the tail within a quarter of a
# worker's share, and a retried batch redoes at most MAX_BATCH samples.
TASKS_PER_WORKER = 4
MAX_BATCH = 128


class Batch:
    """A list passed to a step as one value: Prefect and Dask do not walk into it.

    (Prefect visits every field of every sample of a plain list argument, ~2 ms per sample;
    ``prefect.utilities.annotations.quote`` avoids that but does not survive Dask.)
    """

    __slots__ = ("items",)

    def __init__(self, items: Iterable):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i):
        return self.items[i]


@dataclass(frozen=True)
class LabelJob:
    """What to label, with what, and where the results go (the flow's parameters)."""

    data: str = "data/prepared"
    model: str = "models/mllm"
    params: LabelParams = field(default_factory=LabelParams)
    splits: tuple[str, ...] | None = None  # None: params.splits
    features_dir: str = "data/features"
    db_url: str | None = None  # None: EVOCOMP_DB_URL or data/evocomp.db
    shard: tuple[int, int] | None = None
    ids: tuple[str, ...] | None = None
    labels_out: str = "data/labels/labels.parquet"
    metrics_out: str = "metrics/labels.json"
    fitness_out: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int | None = None  # samples per label batch (None: plan_batches decides)

    def samples(self) -> list[Sample]:
        p = self.params
        return select_samples(
            self.data, self.splits or p.splits, p.max_samples, self.ids, self.shard
        )


def pending(job: LabelJob) -> list[Sample]:
    """The job's samples its run has not labelled yet (read-only, no model loaded)."""
    ref = model_ref(job.model, job.device, job.dtype)
    db_url = job.db_url or db.default_db_url()
    db.upgrade(db_url)
    p_hash = db.params_hash(run_spec(job.params.search()))
    done = db.labelled_sample_ids(db.get_engine(db_url), ref.model_id, p_hash)
    return [s for s in job.samples() if s.id not in done]


def reason(err: BaseException) -> str:
    """``Type: message`` of a failure, as the store records it."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    return f"{type(err).__name__}: {text}"


def code_version() -> str:
    """The package version, plus the git commit when the code is in a checkout."""
    import evocomp

    git = ["git", "rev-parse", "--short", "HEAD"]
    try:
        sha = subprocess.run(
            git, capture_output=True, text=True, timeout=5, cwd=Path(evocomp.__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{evocomp.__version__}+g{sha}" if sha else evocomp.__version__


def register_samples(engine, name: str, source: str, samples: Iterable[Sample]) -> int:
    """Upsert a dataset and its samples into the store (labels reference them); its id."""
    dataset_id = db.ensure_dataset(engine, name[:255], source[:1024])
    db.upsert_samples(engine, dataset_id, [to_row(s) for s in samples])
    return dataset_id


# ---- the steps ------------------------------------------------------------------------------
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
    register_samples(engine, name, name, samples)
    spec = run_spec(search)
    run_id = db.get_or_create_run(engine, model_id, spec, version)
    return run_id, db.labelled_sample_ids(engine, model_id, db.params_hash(spec))


def compute_features(
    samples: Batch, model: ModelRef, root: str, db_url: str, run_id: int
) -> dict[str, str]:
    """Compute and cache these samples' features; a sample that fails (a corrupt image) is
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
                failures[s.id] = reason(err)
        if good:
            fs.put(good)
    for sid, why in failures.items():
        db.write_failure(db.get_engine(db_url), run_id, sid, why)
    return failures


def label_batch(
    batch: Batch, model: ModelRef, params: SearchParams, features_dir: str, db_url: str, run_id: int
) -> dict[str, str]:
    """Search and store each sample of a batch; ``{sample id: done|failed}``."""
    mllm, engine = worker_mllm(model), db.get_engine(db_url)
    status = {}
    for s in batch:
        try:
            feats = worker_features(features_dir, model.model_id, s.id)
        except (KeyError, ValueError) as err:  # missing or unusable (NaN) features
            db.write_failure(engine, run_id, s.id, reason(err))
            status[s.id] = "failed"
            continue
        status[s.id] = label_and_store(mllm, s, feats, params, engine, run_id)
    return status


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
    write_json_atomic(metrics_out, label_metrics(labels_out, run["failed"]))
    if fitness_out:
        write_text_atomic(fitness_out, fitness_curve(engine, run_id))
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


def plan_batches(samples: list[Sample], workers: int, batch_size: int | None) -> list[Batch]:
    """Label batches: ``batch_size`` each, or about TASKS_PER_WORKER per worker (<= MAX_BATCH)."""
    size = batch_size or min(
        MAX_BATCH, max(1, math.ceil(len(samples) / (workers * TASKS_PER_WORKER)))
    )
    return [Batch(samples[i : i + size]) for i in range(0, len(samples), size)]


# ---- how the steps run ----------------------------------------------------------------------
Done = tuple[Batch, Any]  # a finished batch and its result (or the exception it raised)


class Steps(Protocol):
    """Runs the steps of :func:`label`: in this process, or as Prefect tasks."""

    batch_size: int | None  # samples per label batch when the job sets none (None: plan)

    def call(self, step: Callable, *args) -> Any:
        """Run one step and return its result (exceptions propagate)."""

    def map(self, step: Callable, batches: list[Batch], *args) -> Iterator[Done | None]:
        """Run ``step(batch, *args)`` for every batch; yield ``(batch, result or exception)``
        as each finishes, and None now and then while none has (a progress tick)."""


class InProcess:
    """The steps as plain calls, one after another, in this thread."""

    batch_size = 1  # no per-task cost to spread: one sample per batch, progress per sample

    def call(self, step, *args):
        return step(*args)

    def map(self, step, batches, *args):
        for batch in batches:
            yield batch, step(batch, *args)


def label(job: LabelJob, steps: Steps, log) -> dict:
    """Label the job's samples with ``steps``; return the run summary.

    ``summary["failed"]`` counts the selected samples that failed; ``summary["failures"]``
    lists them with their reasons.
    """
    t0, params = time.monotonic(), job.params
    db_url = job.db_url or db.default_db_url()
    features_dir = str(Path(job.features_dir).resolve())
    samples = job.samples()
    ref, search = model_ref(job.model, job.device, job.dtype), params.search()
    run_id, done = steps.call(
        open_run, db_url, str(job.data), Batch(samples), ref.model_id, search, code_version()
    )
    todo = [s for s in samples if s.id not in done]
    log.info(
        f"run {run_id} ({ref.model_id}): {len(samples)} samples selected, "
        f"{len(samples) - len(todo)} already labelled, {len(todo)} to search"
    )
    # Features where the compute is (the workers), before any search needs them.
    missing = set(FeatureStore(features_dir, ref.model_id).missing(s.id for s in todo))
    need = [s for s in todo if s.id in missing]
    chunks = [Batch(need[i : i + FEATURE_TASK]) for i in range(0, len(need), FEATURE_TASK)]
    bad: dict[str, str] = {}
    for _, out in filter(
        None, steps.map(compute_features, chunks, ref, features_dir, db_url, run_id)
    ):
        if isinstance(out, BaseException):
            raise out  # features that cannot be written (after retries) stop the run
        bad |= out
    meter = Meter(len(todo), log)
    meter.add(len(bad))
    runnable = [s for s in todo if s.id not in bad]
    engine, labelled_before = db.get_engine(db_url), len(done)
    finished = len(bad)
    batches = plan_batches(runnable, params.workers, job.batch_size or steps.batch_size)
    for item in steps.map(label_batch, batches, ref, search, features_dir, db_url, run_id):
        if item is None:  # a tick: count what the workers have stored so far
            stored = db.count_labels(engine, run_id) - labelled_before
            meter.update(max(meter.done, len(bad) + stored))
            continue
        batch, out = item
        if isinstance(out, BaseException):  # the step itself failed, after its retries
            for s in batch:
                db.write_failure(engine, run_id, s.id, reason(out))
        finished += len(batch)
        meter.update(max(meter.done, finished))
    summary = steps.call(
        close_run, db_url, run_id, ref.model_id, Batch(s.id for s in samples),
        job.labels_out, job.metrics_out, job.fitness_out,
    )  # fmt: skip
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
