"""What every `evocomp` command shares: params loading, one-line errors, progress bars.

Kept free of model, store and flow imports, so a stage's code dependencies (dvc.yaml)
stay what the stage itself runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from evocomp.config import Params, load_params
from evocomp.errors import EvoCompError, OutputError, ParamsError
from evocomp.files import check_writable

ParamsOpt = typer.Option(
    None, "--params", help="params file (default: ./params.yaml, or the defaults without one)"
)
DeviceOpt = typer.Option(None, help="cpu, cuda, cuda:1 (default: EVOCOMP_DEVICE or runtime.device)")
DtypeOpt = typer.Option(None, help="float32, bfloat16, float16 (default: runtime.dtype)")

# Errors a user can cause, shown as one line instead of a traceback: ours, and the missing
# file, unknown key or bad value a library reports for a bad input.
USER_ERRORS = (EvoCompError, FileNotFoundError, KeyError, ValueError)


def fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code)


def params_or_exit(path: Path | None) -> Params:
    try:
        return load_params(path)
    except ParamsError as err:
        fail(str(err))
    raise AssertionError  # unreachable


def writable_or_exit(*paths: Path | None) -> None:
    """Stop with one line, before any work, when an output path cannot be written."""
    try:
        check_writable(*paths)
    except OutputError as err:
        fail(str(err))


def device_for(params: Params, device: str | None) -> str:
    return device or os.environ.get("EVOCOMP_DEVICE") or params.runtime.device


def model_options(
    params: Params, model: Path | None, device: str | None, dtype: str | None
) -> tuple[str, str, str]:
    """``(checkpoint, device, dtype)`` from the command's options, else the environment and
    params.yaml: the arguments of ``evocomp.mllm.loader.load_mllm``."""
    return (
        str(model or params.mllm.checkpoint),
        device_for(params, device),
        dtype or params.runtime.dtype,
    )


class progress_bars:  # noqa: N801 - used like a function in `with`
    """Rich progress bars on stderr (when it is a terminal), one per phase.

    ``with progress_bars() as bar: bar("features", done, total)``
    """

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._p = Progress(
            "[bold]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
            disable=not sys.stderr.isatty(),
        )
        self._tasks: dict[str, object] = {}

    def __enter__(self):
        self._p.__enter__()
        return self.update

    def update(self, phase: str, done: int, total: int) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._p.add_task(phase, total=total)
        self._p.update(self._tasks[phase], completed=done, total=total)

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)
