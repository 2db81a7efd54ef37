"""`manage.py reset_jobs`: requeue running jobs by hand, through services.reset_running_jobs.

Prints the status distribution before and after. Filters combine; with none,
every running job is requeued.
"""

from __future__ import annotations

import argparse
import uuid
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from jobs import services
from jobs.models import Job
from jobsite_crawler.argtypes import seconds, whole_number

MAX_JOB_ID = 2**63 - 1


def session_uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a session UUID") from None


_seconds = seconds(allow_zero=True)


def seconds_ago(text: str) -> float:
    """Seconds, 0 or more, that still reach back no further than the year 1."""
    value = _seconds(text)
    try:
        services.now() - timedelta(seconds=value)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} seconds reaches back before the year 1") from None
    return value


job_id = whole_number(
    minimum=1,
    maximum=MAX_JOB_ID,
    invalid="is not a job id (a whole number)",
    out_of_range="is not a job id (ids are 1 or more)",
)


def reason_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the reason must not be blank")
    return text.strip()


def distribution(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in counts.items()) + f" (total {sum(counts.values())})"


class Command(BaseCommand):
    help = (
        "Requeue running jobs (each counts one interruption; a job that reaches max_interruptions "
        "fails instead) and print the status distribution before and after. Filters combine; "
        "without any, every running job is requeued."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Show how many running jobs would move; change nothing.",
        )
        parser.add_argument(
            "--session",
            type=session_uuid,
            metavar="UUID",
            help="Only jobs leased to this bus session.",
        )
        parser.add_argument(
            "--job",
            dest="job_ids",
            type=job_id,
            action="append",
            metavar="ID",
            help="Only this job (repeatable).",
        )
        expiry = parser.add_mutually_exclusive_group()
        expiry.add_argument(
            "--stale-for",
            type=seconds_ago,
            metavar="SECONDS",
            help="Only jobs whose lease expired at least SECONDS ago.",
        )
        expiry.add_argument(
            "--expired",
            action="store_true",
            help="Only jobs whose lease has expired (same as --stale-for 0).",
        )
        parser.add_argument(
            "--reason",
            type=reason_text,
            default="reset by manage.py reset_jobs",
            help="Recorded on each job's history (default: %(default)r).",
        )

    def handle(
        self,
        *args,
        dry_run: bool,
        session: uuid.UUID | None,
        job_ids: list[int] | None,
        stale_for: float | None,
        expired: bool,
        reason: str,
        **options,
    ) -> None:
        at = services.now()
        lease_expired_before: datetime | None = None
        if expired:
            lease_expired_before = at
        elif stale_for is not None:
            lease_expired_before = at - timedelta(seconds=stale_for)
        if job_ids is not None:
            job_ids = sorted(set(job_ids))

        self.stdout.write(f"Before: {distribution(Job.objects.status_counts())}")
        self.stdout.write(f"Selecting {self._describe(session, job_ids, lease_expired_before)}.")
        if dry_run:
            self._dry_run(session, job_ids, lease_expired_before)
            return
        try:
            counts = services.reset_running_jobs(
                session=session,
                job_ids=job_ids,
                lease_expired_before=lease_expired_before,
                reason=reason,
                actor="command",
                at=at,
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        suspects = (
            f" ({counts.suspected} of them to run alone next: max_interruptions reached in company)"
            if counts.suspected
            else ""
        )
        line = f"Requeued {counts.requeued}{suspects}, failed {counts.failed} (interrupted too many times)"
        if job_ids is not None:
            line += f", skipped {len(job_ids) - counts.total} of the listed jobs (not running or no match)"
        self.stdout.write(self.style.SUCCESS(line + "."))
        self.stdout.write(f"After:  {distribution(Job.objects.status_counts())}")

    def _describe(self, session, job_ids, lease_expired_before) -> str:
        parts = ["running jobs"]
        if session is not None:
            parts.append(f"leased to session {session}")
        if job_ids is not None:
            parts.append("with id " + ", ".join(map(str, job_ids)))
        if lease_expired_before is not None:
            parts.append(f"whose lease expired before {lease_expired_before.isoformat(timespec='seconds')}")
        return " ".join(parts)

    def _dry_run(self, session, job_ids, lease_expired_before) -> None:
        counts = services.preview_reset(session=session, job_ids=job_ids, lease_expired_before=lease_expired_before)
        self.stdout.write(
            f"Dry run: would move {counts.total} running jobs (requeue {counts.requeued}"
            + (f", of them {counts.suspected} to run alone next" if counts.suspected else "")
            + f", fail {counts.failed} at their last allowed interruption); nothing was changed."
        )
