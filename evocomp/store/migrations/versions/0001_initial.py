"""Initial schema: datasets, samples, label_runs, labels, generations, elites.

Revision ID: 0001
Revises:
Create Date: 2026-11-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _created_at(name: str = "created_at") -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    """Create every table of the label store."""
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_datasets"),
        sa.UniqueConstraint("name", name="uq_datasets_name"),
    )
    op.create_table(
        "samples",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("qtype", sa.String(64), nullable=True),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("image", sa.String(1024), nullable=False),
        sa.Column("meta", JSON, nullable=True),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name="fk_samples_dataset_id_datasets",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
    )
    op.create_index("ix_samples_dataset_id_split", "samples", ["dataset_id", "split"])
    op.create_table(
        "label_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(255), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("note", sa.String(1024), nullable=True),
        _created_at(),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_label_runs"),
        sa.UniqueConstraint("key", name="uq_label_runs_key"),
    )
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("kept", JSON, nullable=False),
        sa.Column("soft", JSON, nullable=True),
        sa.Column("groups", JSON, nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("full_loss", sa.Float(), nullable=True),
        sa.Column("heuristic_losses", JSON, nullable=False),
        sa.Column("margin", sa.Float(), nullable=True),
        sa.Column("agreement", sa.Float(), nullable=True),
        sa.Column("n_groups", sa.Integer(), nullable=True),
        sa.Column("converged_gen", sa.Integer(), nullable=True),
        sa.Column("n_forwards", sa.Integer(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        _created_at(),
        _created_at("updated_at"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["label_runs.id"], name="fk_labels_run_id_label_runs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name="fk_labels_sample_id_samples", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_labels"),
        sa.UniqueConstraint("run_id", "sample_id", name="uq_labels_run_id_sample_id"),
    )
    op.create_index("ix_labels_sample_id", "labels", ["sample_id"])
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("label_id", sa.Integer(), nullable=False),
        sa.Column("gen", sa.Integer(), nullable=False),
        sa.Column("nevals", sa.Integer(), nullable=False),
        sa.Column("min", sa.Float(), nullable=True),
        sa.Column("avg", sa.Float(), nullable=True),
        sa.Column("max", sa.Float(), nullable=True),
        sa.Column("std", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["label_id"], ["labels.id"], name="fk_generations_label_id_labels", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_generations"),
        sa.UniqueConstraint("label_id", "gen", name="uq_generations_label_id_gen"),
    )
    op.create_table(
        "elites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("label_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("kept", JSON, nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["label_id"], ["labels.id"], name="fk_elites_label_id_labels", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_elites"),
        sa.UniqueConstraint("label_id", "rank", name="uq_elites_label_id_rank"),
    )


def downgrade() -> None:
    """Drop every table of the label store."""
    for table in ("elites", "generations", "labels", "label_runs", "samples", "datasets"):
        op.drop_table(table)
