"""Labels record each heuristic's kept tokens and the vocabulary word of each group.

Both columns are nullable: labels written before this revision keep NULL there.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Add labels.heuristic_kept and labels.group_words."""
    op.add_column("labels", sa.Column("heuristic_kept", JSON, nullable=True))
    op.add_column("labels", sa.Column("group_words", JSON, nullable=True))


def downgrade() -> None:
    """Drop labels.heuristic_kept and labels.group_words."""
    with op.batch_alter_table("labels") as batch:  # SQLite: a rebuilt table
        batch.drop_column("group_words")
        batch.drop_column("heuristic_kept")
