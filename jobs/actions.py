"""The bulk actions (requeue, retry, cancel) as the admin and the jobs pages both run them.

One function calls the service and words what it did, so the two places
print the same message for the same outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import services

# The verb in each action's audit reason: "requeued by alice from the jobs page".
_DONE = {"requeue": "requeued", "retry": "retried", "cancel": "cancelled"}


@dataclass(frozen=True)
class ActionReport:
    text: str
    changed: int  # jobs the action moved; 0 means everything was skipped


def run_action(*, action: str, job_ids: list[int], username: str, actor: str, place: str) -> ActionReport:
    """Run `action` on `job_ids` through its service; `place` ends the audit reason ("in the admin")."""
    reason = f"{_DONE[action]} by {username} {place}"
    if action == "requeue":
        counts = services.reset_running_jobs(job_ids=job_ids, reason=reason, actor=actor)
        skipped = len(job_ids) - counts.total
        suspects = (
            (
                f" ({counts.suspected} of them interrupted too many times with other jobs in their session: "
                f"each runs alone next)"
            )
            if counts.suspected
            else ""
        )
        return ActionReport(
            f"Requeued {counts.requeued}{suspects}, failed {counts.failed} (interrupted too many times), "
            f"skipped {skipped} not running.",
            counts.total,
        )
    if action == "retry":
        result = services.retry_jobs(job_ids=job_ids, reason=reason, actor=actor)
        return ActionReport(
            f"Retried {result.changed}, skipped {result.skipped} not failed or cancelled.", result.changed
        )
    if action == "cancel":
        result = services.cancel_jobs(job_ids=job_ids, reason=reason, actor=actor)
        return ActionReport(
            f"Cancelled {result.changed} ({len(result.running)} of them running; their crawlers are told "
            f"to stop), skipped {result.skipped} already finished.",
            result.changed,
        )
    raise ValueError(f"unknown action {action!r}")
