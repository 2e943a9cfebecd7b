"""Which stored rows (and cached baselines) a run keeps: ``detprune run SUITE --recompute MODE``.

``none`` (the default) keeps every finished cell, whatever made it: a killed suite resumes.
``stale`` redoes the rows computed by other code than this checkout's harness packages (their
``code_digest`` differs, or is unknown: rows from before rows recorded it), and retrains the
cached baselines such code trained. ``all`` redoes every row and baseline made before this run
started. A recomputed row replaces the old one in one transaction; until then the old row stays,
so a recompute killed halfway loses nothing and its rerun goes on where it stopped.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from .provenance import code_digest

MODES = ("none", "stale", "all")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Recompute:
    mode: str = "none"
    started_at: str = field(default_factory=now)  # ISO 8601, UTC, seconds: as rows record it

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--recompute {self.mode!r}: one of {', '.join(MODES)}")

    def keeps(self, made: dict[str, Any] | None) -> bool:
        """Whether a stored row (or a cached baseline's meta) with provenance ``made``
        (``code_digest``, ``created_at``) counts as done in this run."""
        if made is None:
            return False
        if self.mode == "stale":
            return made.get("code_digest") == code_digest()
        if self.mode == "all":
            return (made.get("created_at") or "") >= self.started_at
        return True
