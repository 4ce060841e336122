"""The ``evocomp`` command line: one command per pipeline stage, one module per command group.

    evocomp --help
    evocomp synth | prepare                 (evocomp/cli/data.py)
    evocomp mllm train | eval               (evocomp/cli/mllm.py)
    evocomp features                        (evocomp/cli/features.py)
    evocomp label                           (evocomp/cli/label.py)
    evocomp db upgrade | labels export      (evocomp/cli/store.py)
    evocomp train                           (evocomp/cli/train.py)
    evocomp evaluate                        (evocomp/cli/evaluate.py)
    evocomp generate                        (evocomp/cli/generate.py)
    evocomp dashboard                       (evocomp/cli/dashboard.py)
    evocomp serve                           (evocomp/cli/serve.py)

Every command reads ``params.yaml`` (``--params`` to use another file; ``evocomp --profile
scenes ...`` applies a profile) and reports user
errors (bad params, missing files, unusable checkpoints) as one line naming the culprit,
with exit status 2. This package is the only place that starts flows or the dashboard.
"""

from __future__ import annotations

import os
import sys

import typer

from evocomp.cli import (
    dashboard,
    data,
    evaluate,
    features,
    generate,
    label,
    mllm,
    serve,
    store,
    train,
)
from evocomp.config import PROFILE_ENV

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="EvoComp: learned visual-token compression via evolutionary labeling.",
)


@app.callback()
def _root(
    profile: str = typer.Option(
        None,
        "--profile",
        envvar="EVOCOMP_PROFILE",
        help="params.yaml profile to apply (default: params.yaml's `profile`), e.g. scenes",
    ),
) -> None:
    if profile:  # read by evocomp.config.parse_params, here and in worker processes
        os.environ[PROFILE_ENV] = profile


app.command()(data.synth)
app.command()(data.prepare)
app.add_typer(mllm.app, name="mllm")
app.command()(features.features)
app.command()(label.label)
app.add_typer(store.db_app, name="db")
app.add_typer(store.labels_app, name="labels")
app.command()(train.train)
app.command()(evaluate.evaluate)
app.command()(generate.generate)
app.command()(dashboard.dashboard)
app.command()(serve.serve)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="evocomp")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
