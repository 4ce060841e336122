"""A label run: which samples are left, how they are batched, and the loop over the steps.

    evocomp label                      # the steps as Prefect tasks (flows/label.py)
    evocomp label --in-process         # the same steps as plain calls (:class:`InProcess`)

:func:`label` is the one body both paths run over the steps of
:mod:`evocomp.labeling.steps`; a :class:`Steps` object says how each runs. Samples the
run has already labelled are skipped *before any model work*.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from evocomp import store as db
from evocomp.config import LabelParams
from evocomp.data.samples import Sample
from evocomp.features.cache import FeatureStore
from evocomp.labeling.progress import Meter
from evocomp.labeling.sample import check_warm_start
from evocomp.labeling.selection import select_samples
from evocomp.labeling.steps import (
    Batch,
    close_run,
    code_version,
    compute_features,
    label_batch,
    open_run,
    reason,
)
from evocomp.labeling.worker import model_ref
from evocomp.search import run_spec

FEATURE_TASK = 512  # samples per features step: few steps, spread over the workers
# Label batches: about TASKS_PER_WORKER per worker, at most MAX_BATCH samples each. Prefect
# costs ~25-40 ms of CPU per task, so one sample per task (~30 ms of search on the reference
# model) would double the run; four tasks per worker keep the tail within a quarter of a
# worker's share, and a retried batch redoes at most MAX_BATCH samples.
TASKS_PER_WORKER = 4
MAX_BATCH = 128
HELD_POLL_S = 5.0  # how often samples held by another worker are looked at again


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
    prompt_template: str | None = None  # mllm.prompt_template (None: the checkpoint's own)

    def samples(self) -> list[Sample]:
        p = self.params
        return select_samples(
            self.data, self.splits or p.splits, p.max_samples, self.ids, self.shard
        )


def pending(job: LabelJob) -> list[Sample]:
    """The job's samples its run has not labelled yet (read-only, no model loaded)."""
    ref = model_ref(job.model, job.device, job.dtype, job.prompt_template)
    db_url = job.db_url or db.default_db_url()
    db.upgrade(db_url)
    if job.params.warm_start is not None:  # a missing or foreign compressor: now, not per sample
        check_warm_start(job.params.warm_start, ref.model_id)
    p_hash = db.params_hash(run_spec(job.params.search()))
    done = db.labelled_sample_ids(db.get_engine(db_url), ref.model_id, p_hash)
    return [s for s in job.samples() if s.id not in done]


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


def label(job: LabelJob, steps: Steps, log, on_open: Callable[[int], None] | None = None) -> dict:
    """Label the job's samples with ``steps``; return the run summary.

    ``summary["failed"]`` counts the selected samples that failed; ``summary["failures"]``
    lists them with their reasons. ``on_open(run_id)`` is called once the label run is open
    (the flow records itself there).
    """
    t0, params = time.monotonic(), job.params
    db_url = job.db_url or db.default_db_url()
    features_dir = str(Path(job.features_dir).resolve())
    samples = job.samples()
    ref, search = model_ref(job.model, job.device, job.dtype, job.prompt_template), params.search()
    run_id, done = steps.call(
        open_run, db_url, str(job.data), Batch(samples), ref.model_id, search, code_version()
    )
    if on_open is not None:
        on_open(run_id)
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
    status: dict[str, str] = {}  # done | failed | skipped | held, per runnable sample
    args = (ref, search, features_dir, db_url, run_id, params.lease_seconds)
    left = runnable
    while left:
        batches = plan_batches(left, params.workers, job.batch_size or steps.batch_size)
        for item in steps.map(label_batch, batches, *args):
            if item is None:  # a tick: count what the run's workers have stored so far
                stored = db.count_labels(engine, run_id) - labelled_before
                meter.update(max(meter.done, len(bad) + stored))
                continue
            batch, out = item
            if isinstance(out, BaseException):  # the step itself failed, after its retries
                for s in batch:
                    db.write_failure(engine, run_id, s.id, reason(out))
                out = dict.fromkeys((s.id for s in batch), "failed")
            status |= out
            meter.update(max(meter.done, len(bad) + sum(v != "held" for v in status.values())))
        # Samples another worker of this run holds: wait for its label or for its lease to
        # lapse (a killed worker), then claim them again.
        left = [s for s in left if status[s.id] == "held"]
        if left:
            log.info(f"{len(left)} samples are being searched by other workers; waiting")
            time.sleep(min(HELD_POLL_S, params.lease_seconds / 2))
    summary = steps.call(
        close_run, db_url, run_id, ref.model_id, Batch(s.id for s in samples),
        job.labels_out, job.metrics_out, job.fitness_out,
    )  # fmt: skip
    summary |= {
        "skipped": len(samples) - len(todo),
        "searched": sum(v in ("done", "failed") for v in status.values()),
        "labelled_elsewhere": sum(v == "skipped" for v in status.values()),
        "seconds": time.monotonic() - t0,
    }
    for f in summary["failures"]:
        log.warning(f"sample {f['sample_id']} failed: {f['error']}")
    log.info(
        f"run {run_id}: {summary['done']}/{summary['selected']} labelled, {summary['failed']} "
        f"failed, {summary['searched']} searched in {summary['seconds']:.1f} s"
    )
    return summary
