"""The bulk actions (requeue, retry, cancel) and the crawler actions, as the admin, the pages and
`manage.py crawlers` run them.

One function calls the service and words what it did, so every place prints
the same message for the same outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import fleet, services
from .models import CrawlerState

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


# --- Crawlers ---------------------------------------------------------------------


def run_crawler_action(*, action: str, endpoint: str, actor: str) -> str:
    """Run `action` on one crawler through jobs.fleet and say what happened ("<endpoint>: ...").

    Raises fleet.RegistryError (an unknown or unparseable endpoint); nothing changed then.
    """
    if action == "drain":
        crawler = fleet.drain_crawler(endpoint=endpoint)
        if crawler.state == CrawlerState.PAUSED:
            return f"{crawler.endpoint}: paused already; nothing to drain"
        return f"{crawler.endpoint}: draining: no new jobs; paused once its running jobs finish"
    if action == "resume":
        crawler = fleet.resume_crawler(endpoint=endpoint)
        return f"{crawler.endpoint}: active: takes new jobs"
    if action in ("remove", "remove_now"):
        removal = fleet.remove_crawler(endpoint=endpoint, now=action == "remove_now", actor=actor)
        if not removal.removed:
            return f"{removal.endpoint}: draining: removed once its running jobs finish"
        jobs = "job" if removal.requeued == 1 else "jobs"
        return f"{removal.endpoint}: removed, {removal.requeued} {jobs} requeued"
    raise ValueError(f"unknown crawler action {action!r}")
