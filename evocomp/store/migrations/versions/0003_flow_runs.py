"""Flow runs: the Prefect flow runs working on each label run, with a heartbeat.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the flow_runs table."""
    op.create_table(
        "flow_runs",
        sa.Column("flow_run_id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=False),
        sa.Column("heartbeat", sa.Float(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["label_runs.id"], name="fk_flow_runs_run_id_label_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("flow_run_id", name="pk_flow_runs"),
    )


def downgrade() -> None:
    """Drop the flow_runs table."""
    op.drop_table("flow_runs")
