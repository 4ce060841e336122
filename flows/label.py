"""The label flow: the steps of a label run (:mod:`evocomp.labeling.steps`) as Prefect tasks.

    evocomp label --split test                                 # ephemeral Prefect, thread pool
    evocomp label --task-runner dask --dask-address tcp://HOST:8786
    evocomp label --in-process                                 # the same steps, no Prefect

What Prefect adds around the library's steps: retries of the steps that do I/O (the
store, the feature cache) when the I/O fails, the task runner chosen once for the flow
(a bounded thread pool or Dask) which bounds how many label batches run at once, and
the record of every run and task in the Prefect server.
"""

from __future__ import annotations

import evocomp.prefect_env  # noqa: F401  (before prefect is imported)

# isort: split
import logging
from collections.abc import Iterator

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from sqlalchemy.exc import InterfaceError, OperationalError

from evocomp.config import LabelParams
from evocomp.errors import StoreError
from evocomp.labeling import steps
from evocomp.labeling.run import InProcess, LabelJob, label
from evocomp.labeling.steps import Batch

RETRYABLE = (OperationalError, InterfaceError, StoreError, OSError)  # I/O that can heal
TICK_S = 5.0  # while label batches run, the flow reads progress from the store this often


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
TASKS = {
    steps.open_run: io_task(steps.open_run),
    steps.compute_features: io_task(steps.compute_features),
    steps.label_batch: io_task(steps.label_batch, task_run_name="label-{batch[0].id:.12}"),
    steps.close_run: io_task(steps.close_run),
}


class PrefectSteps:
    """The steps as Prefect tasks on the flow's task runner (``max_workers`` bounds them)."""

    batch_size = None  # evocomp.labeling.run.plan_batches: about four batches per worker

    def call(self, step, *args):
        return TASKS[step](*args)

    def map(self, step, batches: list[Batch], *args) -> Iterator[tuple | None]:
        futures = TASKS[step].map(batches, *map(unmapped, args))
        batch_of = dict(zip(futures, batches, strict=True))
        pending = list(futures)
        while pending:
            done, not_done = wait(pending, timeout=TICK_S)
            pending = list(not_done)
            if not done:
                yield None  # nothing finished in TICK_S: let the caller show progress
            for future in done:
                try:
                    out = future.result(raise_on_failure=False)
                except Exception as err:  # noqa: BLE001 - e.g. a Dask worker lost for good
                    out = err
                yield batch_of[future], out


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
    """Label the selected samples with the genetic search; return the run summary
    (:func:`evocomp.labeling.run.label`)."""
    job = _job(**locals())
    summary = label(job, PrefectSteps(), get_run_logger())
    return summary | {"flow_run_id": str(FlowRunContext.get().flow_run.id)}


def _job(**kwargs) -> LabelJob:
    """A :class:`LabelJob` from the flow's keyword arguments (lists become tuples)."""
    kwargs["params"] = kwargs.get("params") or LabelParams()
    for key in ("splits", "ids", "shard"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return LabelJob(**kwargs)


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
    if in_process:
        log = logging.getLogger("evocomp.label")
        return label(_job(**kwargs), InProcess(), log)
    params = kwargs.get("params") or LabelParams()
    if runner == "dask" and dask_workers:  # batches are planned per worker
        params = params.model_copy(update={"workers": dask_workers})
    chosen = task_runner(runner, params.workers, dask_address, dask_workers)
    return label_dataset.with_options(task_runner=chosen)(**kwargs | {"params": params})
