"""Receivers for the session-end signals (jobs/signals.py): thin calls to reset_running_jobs."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from .services import ResetCounts, reset_running_jobs


def requeue_session_jobs(sender: object, *, session: UUID, reason: str, **kwargs: Any) -> ResetCounts:
    return reset_running_jobs(session=session, reason=reason, actor="bus")
