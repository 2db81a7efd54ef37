"""The shape of a crawler's outcome, shared by the bus and the services.

Plain Python with no Django import, so the bus's protocol code can build
outcomes without touching models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """A `done` (succeeded) or `failed` frame from a crawler, for (job_id, attempt)."""

    job_id: int
    attempt: int
    succeeded: bool
    result: dict[str, Any] | None = None
    error: str = ""
    retryable: bool = False
