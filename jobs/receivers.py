"""Receivers for the bus's signals: thin calls to reset_running_jobs."""

from __future__ import annotations

from uuid import UUID

from .services import ResetCounts, reset_running_jobs


def requeue_session_jobs(sender, *, session: UUID, reason: str, **kwargs) -> ResetCounts:
    return reset_running_jobs(session=session, reason=reason, actor="bus")
