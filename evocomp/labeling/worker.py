"""What a labelling worker process keeps: one loaded model, one feature index, its identity.

Tasks carry a :class:`ModelRef` (where the checkpoint is and its content id), never
the model: a thread pool shares one copy per process, a Dask worker process loads its
own once, on its first task. :func:`worker_id` names the process in the store's claims,
and :func:`leased` keeps a claim alive while its sample is searched.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from evocomp.errors import ModelError
from evocomp.features.cache import Features, FeatureStore
from evocomp.mllm.base import MLLM
from evocomp.mllm.checkpoint import DTYPES, check_checkpoint, checkpoint_id
from evocomp.mllm.loader import load_mllm


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the model: where it lives, its prompt, its content id."""

    path: str
    device: str
    dtype: str
    model_id: str
    prompt_template: str | None = None  # mllm.prompt_template (None: the checkpoint's own)


def model_ref(
    path: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    prompt_template: str | None = None,
) -> ModelRef:
    """Check a checkpoint folder and compute its content id, without loading the model."""
    p = Path(path).resolve()
    check_checkpoint(p)  # the family and the weights, before any worker loads it
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return ModelRef(str(p), device, dtype, checkpoint_id(p, prompt_template), prompt_template)


_models: dict[tuple[str, str, str, str | None], MLLM] = {}
_features: dict[tuple[str, str], FeatureStore] = {}
_lock = threading.Lock()
model_loads = 0  # models this process loaded: a fully labelled selection loads none


def worker_mllm(ref: ModelRef) -> MLLM:
    """This process's copy of the model, loaded on first use (other threads wait for it)."""
    global model_loads
    with _lock:
        key = (ref.path, ref.device, ref.dtype, ref.prompt_template)
        if key not in _models:
            mllm = load_mllm(ref.path, ref.device, ref.dtype, ref.prompt_template)
            if mllm.model_id != ref.model_id:
                raise ModelError(f"{ref.path} changed while labelling: now {mllm.model_id}")
            _models[key], model_loads = mllm, model_loads + 1
        return _models[key]


def worker_features(root: str, model_id: str, sample_id: str) -> Features:
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


_ids: dict[int, str] = {}


def worker_id() -> str:
    """``host:pid:random`` of this process (a forked child gets its own)."""
    pid = os.getpid()
    if pid not in _ids:
        _ids[pid] = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return _ids[pid]


def dead_here(worker: str | None) -> bool:
    """Whether ``worker`` (a :func:`worker_id`) was a process of this host that has exited:
    its claims need not wait out their lease (a ``kill -9`` and a re-run, say)."""
    host, _, rest = (worker or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or worker == worker_id():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class _Heartbeat:
    """One thread per process renews the leases of every claim its searches hold.

    (One thread for all, not one per sample: a sample's search can be 30 ms.)
    """

    def __init__(self):
        self.held: dict[tuple[int, int, str], tuple[object, float]] = {}  # key -> engine, lease
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def hold(self, engine, run_id: int, sample_id: str, lease_s: float) -> tuple:
        key = (id(engine), run_id, sample_id)
        with self.lock:
            self.held[key] = (engine, lease_s)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._beat, name="evocomp-leases", daemon=True
                )
                self.thread.start()
        return key

    def drop(self, key: tuple) -> None:
        with self.lock:
            self.held.pop(key, None)

    def _beat(self) -> None:
        from evocomp import store as db

        while True:
            with self.lock:
                held = list(self.held.items())
            shortest = min((lease for _, (_, lease) in held), default=30.0)
            time.sleep(shortest / 3)
            for (_, run_id, sample_id), (engine, lease_s) in held:
                with contextlib.suppress(Exception):  # a missed beat only shortens a lease
                    db.renew_claims(engine, worker_id(), [(run_id, sample_id)], lease_s)


_heartbeat = _Heartbeat()


@contextmanager
def leased(engine, run_id: int, sample_id: str, lease_s: float) -> Iterator[None]:
    """Keep this worker's claim on (run, sample) alive, renewed every ``lease_s / 3`` s, while
    the block runs (its search)."""
    key = _heartbeat.hold(engine, run_id, sample_id, lease_s)
    try:
        yield
    finally:
        _heartbeat.drop(key)
