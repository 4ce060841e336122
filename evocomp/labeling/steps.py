"""The steps of a label run: open it, compute missing features, label a batch, close it.

Each step is a plain function of picklable arguments (a sample batch, a
:class:`~evocomp.labeling.worker.ModelRef`, a store URL), so it runs alike in this thread,
a pool thread or a Dask worker process; :mod:`evocomp.labeling.run` runs them in order,
the Prefect flow (``flows/label.py``) as tasks. A sample that cannot be labelled is stored
as failed with its reason and never stops the run.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path

from evocomp import store as db
from evocomp.config import SearchParams
from evocomp.data.samples import Sample, to_row
from evocomp.features.cache import FeatureStore
from evocomp.features.compute import compute
from evocomp.files import write_json_atomic, write_text_atomic
from evocomp.labeling.report import fitness_curve, label_metrics
from evocomp.labeling.sample import label_and_store
from evocomp.labeling.worker import (
    ModelRef,
    dead_here,
    leased,
    worker_features,
    worker_id,
    worker_mllm,
)
from evocomp.search import run_spec

FEATURE_BATCH = 64  # samples per vision-tower pass


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
    batch: Batch,
    model: ModelRef,
    params: SearchParams,
    features_dir: str,
    db_url: str,
    run_id: int,
    lease_s: float = 30.0,
) -> dict[str, str]:
    """Claim, search and store each sample of a batch: ``{sample id: status}``.

    ``done`` / ``failed``: searched here; ``skipped``: another worker of the run stored it;
    ``held``: another worker holds its claim (the caller tries again later).
    """
    engine, mllm, status = db.get_engine(db_url), None, {}
    for s in batch:
        claimed = db.claim(engine, run_id, s.id, worker_id(), lease_s)
        holder = db.claim_holder(engine, run_id, s.id) if claimed == "held" else None
        if dead_here(holder):  # its process is gone: take the sample over now
            db.release_claims(engine, holder, [(run_id, s.id)])
            claimed = db.claim(engine, run_id, s.id, worker_id(), lease_s)
        if claimed != "claimed":
            status[s.id] = "skipped" if claimed == "done" else "held"
            continue
        with leased(engine, run_id, s.id, lease_s):
            mllm = mllm or worker_mllm(model)
            try:
                feats = worker_features(features_dir, model.model_id, s.id)
            except (KeyError, ValueError) as err:  # missing or unusable (NaN) features
                db.write_failure(engine, run_id, s.id, reason(err))
                status[s.id] = "failed"
            else:
                status[s.id] = label_and_store(mllm, s, feats, params, engine, run_id)
        if status[s.id] == "failed":  # a retry need not wait out the lease; a done label
            db.release_claims(engine, worker_id(), [(run_id, s.id)])  # keeps others away itself
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
    budget = db.budget_of(run["params"])  # a label set holds one budget (store/export.py)
    exported = db.export_labels(engine, labels_out, model_id=model_id, budget=budget)
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
