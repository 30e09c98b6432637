"""deltas, cloud jobs, fleet teachers

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fleets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("teacher_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("replay_sha256", sa.String(length=64), nullable=True))
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_release_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("delta_target", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("delta_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("delta_size", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("origin", sa.String(length=200), nullable=False, server_default=""))
        batch_op.create_foreign_key("fk_releases_base_release_id", "releases", ["base_release_id"], ["id"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("step", sa.String(length=32), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("error", sa.String(length=1000), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("runner", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["fleet"], ["fleets.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_fleet"), ["fleet"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_fleet"))
    op.drop_table("jobs")
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.drop_constraint("fk_releases_base_release_id", type_="foreignkey")
        for col in ("origin", "delta_size", "delta_sha256", "delta_target", "base_release_id"):
            batch_op.drop_column(col)
    with op.batch_alter_table("fleets", schema=None) as batch_op:
        batch_op.drop_column("replay_sha256")
        batch_op.drop_column("teacher_sha256")
