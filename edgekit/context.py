"""The explicit context passed through the pipeline: cache folder, seed, progress display. No globals."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEKIT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgekit"


@dataclass
class Context:
    """What every stage may need besides its input: where to cache, which seed, whether to draw progress."""

    cache_dir: Path = field(default_factory=default_cache_dir)
    seed: int = 0
    progress: bool = False

    def cache(self, *parts: str) -> Path:
        p = self.cache_dir.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def track(self, iterable, description: str, total: int | None = None):
        """Wrap an iterable in a rich progress bar when progress is on (the CLI turns it on)."""
        if not self.progress:
            return iterable
        from rich.console import Console
        from rich.progress import track

        return track(iterable, description=description, total=total, transient=True, console=Console(stderr=True))
