"""The fleet web page (placeholder: being written)."""

from __future__ import annotations


def install(app, svc) -> None:  # noqa: ANN001
    return None
