"""Claims: which worker is searching which sample of a run, until when.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the claims table."""
    op.create_table(
        "claims",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.String(64), nullable=False),
        sa.Column("worker", sa.String(255), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=False),
        sa.Column("searches", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["label_runs.id"], name="fk_claims_run_id_label_runs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name="fk_claims_sample_id_samples", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "sample_id", name="pk_claims"),
    )


def downgrade() -> None:
    """Drop the claims table."""
    op.drop_table("claims")
