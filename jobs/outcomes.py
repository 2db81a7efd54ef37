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
    # Politeness extension (docs/protocol.md): what the site answered. A 429
    # or 503, or a connection error (`network`), backs the whole host off.
    http_status: int | None = None
    retry_after: str | float | None = None
    network: bool = False
    # Stored items extension (docs/protocol.md section 17): the objects a `done`
    # carried, already cut to JOB_ITEMS_MAX; None when it carried none (the
    # common case, which then costs the outcome path nothing).
    items: list[dict[str, Any]] | None = None
    items_truncated: bool = False

    def answer(self) -> tuple[int | None, str | float | None]:
        """The site's HTTP status and Retry-After this outcome reports (a `done` says it in its result)."""
        if self.http_status is not None or not self.succeeded or not isinstance(self.result, dict):
            return self.http_status, self.retry_after
        return http_status_of(self.result.get("status")), retry_after_of(self.result.get("retry_after"))


def http_status_of(value: Any) -> int | None:
    """An HTTP status code from a crawler's report, or None when it is not one."""
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


def retry_after_of(value: Any) -> str | float | None:
    """A Retry-After value from a crawler's report (header text or seconds), or None when unusable."""
    if isinstance(value, str) and 0 < len(value) <= 100:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e9:
        return float(value)
    return None
