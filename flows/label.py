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
import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.futures import wait
from prefect.states import Crashed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from sqlalchemy.exc import InterfaceError, OperationalError

from evocomp import store as db
from evocomp.config import LabelParams
from evocomp.errors import StoreError
from evocomp.labeling import steps
from evocomp.labeling.run import InProcess, LabelJob, label
from evocomp.labeling.steps import Batch
from evocomp.labeling.worker import dead_here, worker_id

RETRYABLE = (OperationalError, InterfaceError, StoreError, OSError)  # I/O that can heal
TICK_S = 5.0  # while label batches run, the flow reads progress from the store this often
STALE_S = 60.0  # a flow run whose heartbeat (every STALE_S / 4) is older than this has died


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
    prompt_template: str | None = None,
):
    """Label the selected samples with the genetic search; the run summary
    (:func:`evocomp.labeling.run.label`).

    The flow run ends Completed when every selected sample is labelled, Failed (with the
    count and the first reason in its message) when some could not be; the summary is
    the state's data either way.
    """
    job = _job(**locals())
    flow_run_id = str(FlowRunContext.get().flow_run.id)
    log = get_run_logger()
    with FlowRecord(job.db_url or db.default_db_url(), flow_run_id, log) as record:
        summary = label(job, PrefectSteps(), log, on_open=record.opened)
        summary["flow_run_id"] = flow_run_id
        record.state = "failed" if summary["failed"] else "completed"
    if summary["failed"]:
        first = summary["failures"][0]
        why = (first["error"] or "").splitlines()[0]
        return Failed(
            message=f"{summary['failed']} of {summary['selected']} samples failed "
            f"(first: {first['sample_id']}: {why}); the others are labelled",
            data=summary,
        )
    return summary


class FlowRecord:
    """This flow run in the store's ``flow_runs``, kept alive by a heartbeat; on opening a
    label run, its earlier flow runs that died (process gone, heartbeat stale) are marked
    Crashed in Prefect and in the store."""

    def __init__(self, db_url: str, flow_run_id: str, log):
        self.db_url, self.flow_run_id, self.log = db_url, flow_run_id, log
        self.state, self.stop = "failed", threading.Event()  # until the label run returns
        self.thread: threading.Thread | None = None

    def opened(self, run_id: int) -> None:
        engine = db.get_engine(self.db_url)
        now = time.time()
        for other, holder, beat in db.running_flow_runs(engine, run_id):
            if other != self.flow_run_id and (dead_here(holder) or beat < now - STALE_S):
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(
                        other,
                        Crashed(message=f"its process ({holder}) stopped without finishing; "
                                        f"found by flow run {self.flow_run_id}"),
                        force=True,
                    )  # fmt: skip
                db.finish_flow_run(engine, other, "crashed")
                self.log.warning(f"flow run {other} of label run {run_id} had crashed: marked")
        db.register_flow_run(engine, self.flow_run_id, run_id, worker_id())
        self.thread = threading.Thread(target=self._beat, name="flow-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(STALE_S / 4):
            with contextlib.suppress(Exception):  # a missed beat only ages the record
                db.beat_flow_run(db.get_engine(self.db_url), self.flow_run_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            db.finish_flow_run(db.get_engine(self.db_url), self.flow_run_id, self.state)


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


def api_url() -> str | None:
    """The Prefect server this process reports to, if one is configured (env or profile)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def workers_share_the_server(local_dask: bool):
    """With no Prefect server configured, a local Dask cluster's workers report to the flow's
    temporary server instead of each starting one of their own.

    (Each worker process would otherwise start a temporary server: on 2 cores, 240 samples
    on 2 workers took 74.5 s that way and 36.5 s with one shared server, bench/scale_out.py.)
    The temporary server is Prefect's own ``SubprocessASGIServer``, the one the flow's
    client starts without ``PREFECT_API_URL``; its URL reaches the workers through Dask's
    nanny environment.
    """
    if not local_dask or api_url():
        yield
        return
    import dask
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()  # the flow's client uses this same instance
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with dask.config.set({"distributed.nanny.pre-spawn-environ.PREFECT_API_URL": server.api_url}):
        yield


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
    flow = label_dataset.with_options(task_runner=chosen)
    with workers_share_the_server(runner == "dask" and not dask_address):
        state = flow(**kwargs | {"params": params}, return_state=True)
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BaseException):  # the flow itself raised: not a sample's failure
        raise summary
    return summary
