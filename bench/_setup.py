"""A benchmark workspace: a held-out built-in set, prepared, with the model's features cached.

Not a benchmark itself. ``bench/label_quality.py``, ``bench/label_throughput.py`` and
``bench/ablation.py`` call :func:`build_workspace`, which synthesises ``n`` images with ``seed``
(one question each), prepares them (train/val/test by image hash, as ``evocomp prepare``) and
computes the features of every sample with the model. ``--benchmark scenes`` makes it a
scenes-vqa set on the model's grid (default model ``models/scenes/mllm``). Everything is
cached under

    <cache>/<benchmark>-vqa[-g<grid>]-seed<seed>-n<n>/raw/                  the synthetic set
    <cache>/<benchmark>-vqa[-g<grid>]-seed<seed>-n<n>/prepared-v<val>-t<test>/samples.parquet
    <cache>/<benchmark>-vqa[-g<grid>]-seed<seed>-n<n>/features/<model id>/  safetensors shards

so a cache entry is keyed by (seed, n, model id): a retrained checkpoint gets a new model id
(a content hash) and new features. The default cache is ``.bench/`` at the repository root.
The reference model is trained on scenes of ``mllm.seed`` (0) drawn by its own generator;
any bench seed gives images it has never seen.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import REPO

from evocomp.data.prepared import load_prepared, write_prepared
from evocomp.data.readers import read_dataset
from evocomp.data.samples import Sample
from evocomp.data.synth import write_dataset
from evocomp.features.cache import Features, FeatureStore
from evocomp.features.compute import ensure_features
from evocomp.mllm.base import MLLM
from evocomp.mllm.checkpoint import checkpoint_info
from evocomp.mllm.loader import load_mllm

DEFAULT_CACHE = REPO / ".bench"
DEFAULT_MODELS = {"shapes": REPO / "models" / "mllm", "scenes": REPO / "models" / "scenes" / "mllm"}


@dataclass
class Workspace:
    """A prepared held-out set and the model that labels it, features on disk."""

    root: Path  # the cache entry of this (seed, n)
    samples: list[Sample]  # every sample, in id order
    mllm: MLLM
    info: dict  # checkpoint_info(model): model_id, n_tokens, grid, hidden_size, heads, ffn, layers
    fstore: FeatureStore

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def features(self, sample: Sample) -> Features:
        return self.fstore.get(sample.id)


def _synth(raw: Path, n: int, seed: int, benchmark: str, grid: int | None) -> None:
    """Write the set into a private folder, then rename it: a crashed or concurrent run never
    leaves a half-written one behind."""
    if (raw / "dataset.json").is_file():
        return
    tmp = raw.with_name(f"{raw.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_dataset(tmp, n=n, seed=seed, questions_per_image=1, benchmark=benchmark, grid=grid)
    try:
        os.replace(tmp, raw)
    except OSError:  # another run got there first (or a stale non-empty folder): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (raw / "dataset.json").is_file():
            raise RuntimeError(
                f"{raw} exists without a dataset.json: delete it and re-run"
            ) from None


def build_workspace(
    model: str | Path,
    n: int,
    seed: int,
    device: str = "cpu",
    cache: str | Path = DEFAULT_CACHE,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
    log: Callable[[str], None] = print,
    benchmark: str = "shapes",
) -> Workspace:
    """Synthesise, prepare and featurise a held-out built-in set (cached; see the module doc)."""
    model = Path(model or DEFAULT_MODELS[benchmark])
    if not (model / "config.json").is_file():
        raise SystemExit(
            f"--model {model}: no checkpoint there (no config.json); train the reference model "
            "with `evocomp mllm train` (or `dvc repro mllm`) or pass another LLaVA checkpoint"
        )
    if n < 1:
        raise SystemExit(f"--samples must be >= 1, got {n}")
    info = checkpoint_info(model)
    grid = None
    name = "shapes-vqa"
    if benchmark == "scenes":  # the model's own grid; a non-square one cannot be a scenes model
        rows, cols = info["grid"] or (0, 0)
        if rows != cols:
            raise SystemExit(
                f"--model {model}: its {rows} x {cols} token grid is no scenes-vqa grid"
            )
        grid, name = rows, f"scenes-vqa-g{rows}"
    root = Path(cache) / f"{name}-seed{seed}-n{n}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _synth(root / "raw", n, seed, benchmark, grid)
    prepared = root / f"prepared-v{val_fraction:g}-t{test_fraction:g}"
    if not (prepared / "samples.parquet").is_file():
        samples = read_dataset(root / "raw", val_fraction=val_fraction, test_fraction=test_fraction)
        write_prepared(samples, prepared, str(root / "raw"))
    samples = load_prepared(prepared)
    mllm = load_mllm(model, device=device)
    fstore = ensure_features(mllm, samples, root / "features")
    log(
        f"workspace {root} ({len(samples)} samples, model {info['model_id']}, "
        f"{info['n_tokens']} visual tokens) ready in {time.perf_counter() - t0:.1f} s"
    )
    return Workspace(root, samples, mllm, info, fstore)


def add_common_args(p, samples: int, seed: int = 2) -> None:
    """The flags every workspace benchmark takes."""
    p.add_argument(
        "--benchmark",
        choices=("shapes", "scenes"),
        default="shapes",
        help="built-in set to synthesise (scenes: on the model's grid)",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="LLaVA checkpoint folder (default: models/mllm, models/scenes/mllm for scenes)",
    )
    p.add_argument("--device", default=os.environ.get("EVOCOMP_DEVICE", "cpu"))
    p.add_argument(
        "--samples", type=int, default=samples, help="images synthesised (1 question each)"
    )
    p.add_argument("--seed", type=int, default=seed, help="synthetic-set seed (held out: not 0)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="workspace cache folder")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def check_device(p, args) -> None:
    """Check --device and --threads; fill in the benchmark's default --model."""
    if getattr(args, "model", "") is None:
        args.model = DEFAULT_MODELS[getattr(args, "benchmark", "shapes")]
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible to torch")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")


def mean(xs) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def workspace_report(ws: Workspace, args, machine: dict, command: str) -> dict:
    """The keys every workspace benchmark's JSON shares: which set, which model, where, how."""
    return {
        "benchmark": args.benchmark,
        "seed": args.seed,
        "model": {
            "path": str(args.model),
            "model_id": ws.info["model_id"],
            "n_tokens": ws.info["n_tokens"],
        },
        "workspace": str(ws.root),
        "machine": machine,
        "command": command,
    }
