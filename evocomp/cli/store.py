"""`evocomp db upgrade` and `evocomp labels export`: the label store and its frozen exports.

evocomp db upgrade
evocomp labels export --out data/labels/labels.parquet
"""

from __future__ import annotations

from pathlib import Path

import typer

from evocomp.cli.common import USER_ERRORS, fail, writable_or_exit

UrlOpt = typer.Option(None, help="database URL (default: EVOCOMP_DB_URL or data/evocomp.db)")
db_app = typer.Typer(
    no_args_is_help=True, help="The label store (EVOCOMP_DB_URL, default data/evocomp.db)."
)
labels_app = typer.Typer(no_args_is_help=True, help="Frozen label sets.")


@db_app.command("upgrade")
def upgrade(url: str = UrlOpt) -> None:
    """Create or migrate the store schema (Alembic) to the latest revision."""
    from evocomp.store import default_db_url, mask_url
    from evocomp.store import upgrade as migrate

    try:
        migrate(url)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"store at {mask_url(url or default_db_url())} is at the latest schema")


@labels_app.command("export")
def export(
    out: Path = typer.Option(Path("data/labels/labels.parquet")),
    model_id: str = typer.Option(None, help="only labels of this model id"),
    paper: bool = typer.Option(False, "--paper", help="only paper-mode labels"),
    keep_ratio: float = typer.Option(None, help="only budget-mode labels at this keep ratio"),
    url: str = UrlOpt,
) -> None:
    """Write the frozen Parquet label set (latest run per sample wins) that DVC versions.

    A label set holds one budget: where the store has labels of several, pick one with
    --paper or --keep-ratio.
    """
    from evocomp.store import budget_of, export_labels, get_engine
    from evocomp.store import upgrade as migrate

    if paper and keep_ratio is not None:
        fail("--paper and --keep-ratio: pass one budget")
    budget = None
    if paper:
        budget = budget_of({"mode": "paper"})
    elif keep_ratio is not None:
        budget = budget_of({"mode": "budget", "keep_ratio": keep_ratio})
    writable_or_exit(out)
    try:
        migrate(url)
        n = export_labels(get_engine(url), out, model_id=model_id, budget=budget)
    except USER_ERRORS as err:
        fail(str(err))
    typer.echo(f"wrote {n} labels to {out}")
