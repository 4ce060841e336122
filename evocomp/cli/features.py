"""`evocomp features`: cache each sample's visual tokens, vocabulary groups and attention scores.

evocomp features --data data/prepared --out data/features
"""

from __future__ import annotations

from pathlib import Path

import typer

from evocomp.cli.common import (
    USER_ERRORS,
    DeviceOpt,
    DtypeOpt,
    ParamsOpt,
    fail,
    model_options,
    params_or_exit,
    progress_bars,
    writable_or_exit,
)


def features(
    data: Path = typer.Option(Path("data/prepared"), help="prepared samples"),
    out: Path = typer.Option(Path("data/features"), help="feature cache root"),
    model: Path = typer.Option(None, help="checkpoint folder (default: mllm.checkpoint)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    params_path: Path = ParamsOpt,
) -> None:
    """Cache visual tokens, vocabulary groups and attention scores for every labelled/evaluated sample."""
    from evocomp.data.prepared import load_prepared
    from evocomp.features.compute import ensure_features
    from evocomp.mllm.loader import load_mllm

    params = params_or_exit(params_path)
    writable_or_exit(out)
    try:
        samples = [
            s
            for split in ("train", "val", "test")
            for s in load_prepared(data, split, params.label.max_samples)
        ]
        mllm = load_mllm(
            *model_options(params, model, device, dtype),
            prompt_template=params.mllm.prompt_template,
        )
        with progress_bars() as bar:
            ensure_features(
                mllm,
                samples,
                out,
                params.runtime.batch_size,
                progress=lambda done, total: bar("features", done, total),
            )
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"features of {len(samples)} samples for {mllm.model_id} under {out}")
