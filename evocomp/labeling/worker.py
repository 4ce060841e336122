"""What a labelling worker process keeps: one loaded model and one feature index.

Tasks carry a :class:`ModelRef` (where the checkpoint is and its content id), never
the model: a thread pool shares one copy per process, a Dask worker process loads its
own once, on its first task.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from evocomp.errors import ModelError
from evocomp.features.cache import Features, FeatureStore
from evocomp.mllm.hf_llava import DTYPES, HFLlava, checkpoint_id


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
