"""The ``evocomp`` command line: one subcommand per pipeline stage.

    evocomp --help
    evocomp synth --n 1000 --seed 1 --out data/raw/shapes-vqa
    evocomp prepare
    evocomp mllm train
    evocomp mllm eval

Every command reads ``params.yaml`` (``--params`` to use another file) and
reports user errors (bad params, missing files, unusable checkpoints) as one
line naming the culprit, with exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from evocomp.config import Params, ParamsError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
mllm_app = typer.Typer(no_args_is_help=True, help="The reference MLLM: train and evaluate.")
app.add_typer(mllm_app, name="mllm")
db_app = typer.Typer(
    no_args_is_help=True, help="The label store (EVOCOMP_DB_URL, default data/evocomp.db)."
)
app.add_typer(db_app, name="db")
labels_app = typer.Typer(no_args_is_help=True, help="Frozen label sets.")
app.add_typer(labels_app, name="labels")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read")


def fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code)


def params_or_exit(path: Path) -> Params:
    try:
        return load_params(path)
    except ParamsError as err:
        fail(str(err))
    raise AssertionError  # unreachable


def user_errors():
    """Exceptions a user can cause; shown as one line instead of a traceback."""
    from evocomp.datasets import DatasetError
    from evocomp.mllm.base import ModelError
    from evocomp.store import StoreError

    return (
        DatasetError,
        ModelError,
        ParamsError,
        StoreError,
        FileNotFoundError,
        KeyError,
        ValueError,
    )


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def device_for(params: Params, device: str | None) -> str:
    return device or os.environ.get("EVOCOMP_DEVICE") or params.runtime.device


def load_mllm(params: Params, model: Path | None, device: str | None, dtype: str | None):
    from evocomp.mllm.hf_llava import HFLlava

    return HFLlava(
        model or Path(params.mllm.checkpoint),
        device=device_for(params, device),
        dtype=dtype or params.runtime.dtype,
    )


@app.command()
def synth(
    out: Path = typer.Option(Path("data/raw/shapes-vqa"), help="output folder (LLaVA format)"),
    n: int = typer.Option(None, help="images (default: prepare.n_images)"),
    seed: int = typer.Option(None, help="seed (default: prepare.seed)"),
    questions: int = typer.Option(
        None, help="questions per image (default: prepare.questions_per_image)"
    ),
    params_path: Path = ParamsOpt,
) -> None:
    """Write the built-in shapes-vqa benchmark (images + dataset.json), deterministic by seed."""
    from evocomp.synth import write_dataset

    p = params_or_exit(params_path).prepare
    path = write_dataset(
        out, n or p.n_images, p.seed if seed is None else seed, questions or p.questions_per_image
    )
    typer.echo(f"wrote {path}")


@app.command()
def prepare(
    source: str = typer.Option(
        None, help="LLaVA .json / .jsonl or a folder with dataset.json (default: prepare.source)"
    ),
    images_dir: Path = typer.Option(None, help="image folder (default: next to the dataset file)"),
    out: Path = typer.Option(Path("data/prepared"), help="output folder"),
    params_path: Path = ParamsOpt,
) -> None:
    """Read a dataset, hash and split its samples, write data/prepared/samples.parquet."""
    from evocomp.datasets import read_dataset
    from evocomp.prepared import write_prepared

    p = params_or_exit(params_path).prepare
    src = source or p.source
    if src == "synth":
        src = "data/raw/shapes-vqa"
    try:
        samples = read_dataset(src, images_dir or p.images_dir, p.val_fraction, p.test_fraction)
    except user_errors() as err:
        fail(str(err))
    path = write_prepared(samples, out, str(src))
    splits = {s: sum(1 for x in samples if x.split == s) for s in ("train", "val", "test")}
    typer.echo(f"wrote {path}: {len(samples)} samples {splits}")


@mllm_app.command("train")
def mllm_train(
    out: Path = typer.Option(Path("models/mllm"), help="checkpoint folder to write"),
    seed: int = typer.Option(None, help="override mllm.seed"),
    params_path: Path = ParamsOpt,
) -> None:
    """Train the reference tiny LLaVA on shapes-vqa scenes and save it in HF format."""
    from evocomp.mllm.reference import train_reference

    p = params_or_exit(params_path).mllm
    if seed is not None:
        p = p.model_copy(update={"seed": seed})
    train_reference(out, p, log=lambda m: typer.echo(m, err=True))


@mllm_app.command("eval")
def mllm_eval(
    data: Path = typer.Option(
        None, help="prepared shapes-vqa samples (default: a fresh held-out synth set)"
    ),
    n: int = typer.Option(None, help="images of the fresh synth set (default: mllm.eval_images)"),
    synth_seed: int = typer.Option(
        None, help="seed of the fresh synth set (default: 10000 + mllm.seed)"
    ),
    model: Path = typer.Option(None, help="checkpoint folder (default: mllm.checkpoint)"),
    split: str = typer.Option("test", help="split of --data to evaluate"),
    limit: int = typer.Option(None, help="evaluate the first N samples only"),
    out: Path = typer.Option(Path("metrics/mllm.json")),
    device: str = typer.Option(
        None, help="cpu, cuda, cuda:1 (default: EVOCOMP_DEVICE or runtime.device)"
    ),
    dtype: str = typer.Option(None),
    params_path: Path = ParamsOpt,
) -> None:
    """Accuracy of the reference model: full tokens, and random/oracle/anti selections per ratio."""
    import tempfile

    from evocomp.datasets import read_dataset
    from evocomp.mllm.quality import evaluate_reference
    from evocomp.prepared import load_prepared
    from evocomp.synth import write_dataset

    params = params_or_exit(params_path)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if data is None:  # images the model never saw: a seed outside the training range
                seed = 10000 + params.mllm.seed if synth_seed is None else synth_seed
                samples = read_dataset(write_dataset(tmp, n or params.mllm.eval_images, seed))[
                    :limit
                ]
                where = f"a fresh shapes-vqa set (seed {seed})"
            else:
                samples = load_prepared(data, split, limit)
                where = f"the {split} split of {data}"
            metrics = evaluate_reference(load_mllm(params, model, device, dtype), samples)
    except user_errors() as err:
        fail(str(err))
    metrics["evaluated_on"] = where
    write_json(out, metrics)
    typer.echo(f"full accuracy {metrics['full']:.3f} on {len(samples)} samples of {where}")
    typer.echo(
        "  by type: " + "  ".join(f"{q} {a:.3f}" for q, a in metrics["full_by_type"].items())
    )
    for r, row in metrics["ratios"].items():
        typer.echo(
            f"  keep {r}: "
            + "  ".join(f"{m} {row[m]:.3f}" for m in ("oracle", "objects", "random", "anti"))
        )
    typer.echo(
        f"median distinct nearest words per image: {metrics['median_distinct_words']}; "
        f"meaningful nearest word: {metrics['meaningful_nearest_word']:.3f}"
    )
    typer.echo(f"wrote {out}")


@app.command()
def features(
    data: Path = typer.Option(Path("data/prepared"), help="prepared samples"),
    out: Path = typer.Option(Path("data/features"), help="feature cache root"),
    model: Path = typer.Option(None, help="checkpoint folder (default: mllm.checkpoint)"),
    device: str = typer.Option(
        None, help="cpu, cuda, ... (default: EVOCOMP_DEVICE or runtime.device)"
    ),
    dtype: str = typer.Option(None),
    params_path: Path = ParamsOpt,
) -> None:
    """Cache visual tokens, vocabulary groups and attention scores for every labelled/evaluated sample."""
    from evocomp.features import ensure_features
    from evocomp.prepared import load_prepared

    params = params_or_exit(params_path)
    try:
        samples = [
            s
            for split in ("train", "val", "test")
            for s in load_prepared(data, split, params.label.max_samples)
        ]
        mllm = load_mllm(params, model, device, dtype)
        with progress_bar(len(samples), "features") as bar:
            ensure_features(
                mllm,
                samples,
                out,
                params.runtime.batch_size,
                progress=lambda done, total: bar(done, total),
            )
    except user_errors() as err:
        fail(str(err))
    typer.echo(f"features of {len(samples)} samples for {mllm.model_id} under {out}")


@db_app.command("upgrade")
def db_upgrade(
    url: str = typer.Option(None, help="database URL (default: EVOCOMP_DB_URL or data/evocomp.db)"),
) -> None:
    """Create or migrate the store schema (Alembic) to the latest revision."""
    from evocomp.store import default_db_url, mask_url, upgrade

    try:
        upgrade(url)
    except user_errors() as err:
        fail(str(err))
    typer.echo(f"store at {mask_url(url or default_db_url())} is at the latest schema")


@labels_app.command("export")
def labels_export(
    out: Path = typer.Option(Path("data/labels/labels.parquet")),
    model_id: str = typer.Option(None, help="only labels of this model id"),
    url: str = typer.Option(None, help="database URL (default: EVOCOMP_DB_URL or data/evocomp.db)"),
) -> None:
    """Write the frozen Parquet label set (latest run per sample wins) that DVC versions."""
    from evocomp.store import export_labels, get_engine, upgrade

    try:
        upgrade(url)
        n = export_labels(get_engine(url), out, model_id=model_id)
    except user_errors() as err:
        fail(str(err))
    typer.echo(f"wrote {n} labels to {out}")


@app.command()
def train(
    labels: Path = typer.Option(Path("data/labels/labels.parquet"), help="frozen label set"),
    features_dir: Path = typer.Option(
        Path("data/features"), "--features", help="feature cache root"
    ),
    model: Path = typer.Option(
        None, help="checkpoint the labels were made with (default: mllm.checkpoint)"
    ),
    out: Path = typer.Option(Path("models/compressor")),
    curve: Path = typer.Option(Path("plots/train_curve.csv"), help="training curve for dvc plots"),
    metrics: Path = typer.Option(Path("metrics/train.json")),
    device: str = typer.Option(None),
    params_path: Path = ParamsOpt,
) -> None:
    """Train the compressor (GHM-C + cosine separation) on the label set, early-stopped on val."""
    import pandas as pd

    from evocomp.mllm.hf_llava import checkpoint_info
    from evocomp.training import train_compressor

    params = params_or_exit(params_path)
    try:
        info = checkpoint_info(model or params.mllm.checkpoint)
        history, summary = train_compressor(
            labels,
            features_dir,
            info,
            params.train,
            out,
            device_for(params, device),
            log=lambda r: typer.echo(
                f"epoch {r['epoch']}: train {r['train_loss']:.4f} val {r['val_loss']}", err=True
            ),
        )
    except user_errors() as err:
        fail(str(err))
    curve.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(history).to_csv(curve, index=False)
    write_json(
        metrics,
        {
            k: summary[k]
            for k in (
                "train_samples",
                "val_samples",
                "epochs",
                "best_epoch",
                "val_loss",
                "val_precision",
                "label_set_hash",
            )
        },
    )
    typer.echo(
        f"compressor -> {out}: best epoch {summary['best_epoch']}, val precision {summary['val_precision']}"
    )


@app.command()
def evaluate(
    data: Path = typer.Option(Path("data/prepared")),
    features_dir: Path = typer.Option(Path("data/features"), "--features"),
    labels: Path = typer.Option(
        Path("data/labels/labels.parquet"), help="label set (its test split is the GA oracle)"
    ),
    compressor: Path = typer.Option(Path("models/compressor")),
    model: Path = typer.Option(None, help="checkpoint (default: mllm.checkpoint)"),
    out: Path = typer.Option(Path("metrics/eval.json")),
    plots: Path = typer.Option(
        Path("plots/retention.csv"), help="retention vs ratio for dvc plots"
    ),
    speed: Path = typer.Option(
        Path("metrics/bench_speedup.json"), help="real-shape timings (bench/speedup.py)"
    ),
    device: str = typer.Option(None),
    dtype: str = typer.Option(None),
    params_path: Path = ParamsOpt,
) -> None:
    """Accuracy and retention of every method at every keep ratio on the test split."""
    from evocomp.evaluation_cli import run_evaluation

    params = params_or_exit(params_path)
    try:
        result = run_evaluation(
            params,
            data,
            features_dir,
            labels,
            compressor,
            load_mllm(params, model, device, dtype),
            speed,
            progress_bar,
        )
    except user_errors() as err:
        fail(str(err))
    write_json(out, result)
    from evocomp.evaluation_cli import print_table, write_plot

    write_plot(plots, result)
    typer.echo(print_table(result))
    typer.echo(f"wrote {out}")


@app.command()
def dashboard(port: int = typer.Option(8501), address: str = typer.Option("127.0.0.1")) -> None:
    """Start the Streamlit audit dashboard (read-only on the store except its explicit actions)."""
    import subprocess

    app_file = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"
    if not app_file.is_file():
        fail(f"dashboard app not found at {app_file} (run from a source checkout)")
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_file),
        "--server.headless",
        "true",
        "--server.address",
        address,
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
    ]
    typer.echo(f"dashboard on http://{address}:{port}")
    raise typer.Exit(subprocess.call(cmd))


class progress_bar:  # noqa: N801 - used like a function in `with`
    """A rich progress bar on stderr, fed ``(done, total)``."""

    def __init__(self, total: int, what: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._p = Progress(
            "[bold]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
            disable=not sys.stderr.isatty(),
        )
        self._task = self._p.add_task(what, total=total)

    def __enter__(self):
        self._p.__enter__()
        return lambda done, total: self._p.update(self._task, completed=done, total=total)

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)


def _register_commands() -> None:
    from evocomp.cli_label import register as register_label

    register_label(app)


_register_commands()


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="evocomp")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
