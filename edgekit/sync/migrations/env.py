"""Alembic environment: ``edgekit.sync.db.migrate`` passes an open connection in ``config.attributes``."""

from __future__ import annotations

from alembic import context

from edgekit.sync.db import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only `migrate` runs these migrations
    raise RuntimeError("run migrations through edgekit.sync.db.migrate(engine)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
