"""`manage.py reset_jobs` and `manage.py enqueue`: output, filters, and errors, in-process and as real processes."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command

from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status
from tests.conftest import ROOT, database_url


def run(command: str, *args: str, stdin: io.StringIO | None = None) -> str:
    out = io.StringIO()
    options = {"stdin": stdin} if stdin is not None else {}
    call_command(command, *args, stdout=out, stderr=io.StringIO(), no_color=True, **options)
    return out.getvalue()


def manage(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """Run manage.py in a real process against the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(DATABASE_URL=database_url(), DEBUG="true", BUS_AUTOSTART="false")
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def status_of(*jobs: Job) -> list[str]:
    by_id = dict(Job.objects.filter(pk__in=[job.pk for job in jobs]).values_list("pk", "status"))
    return [by_id[job.pk] for job in jobs]


@pytest.fixture
def jobs():
    return services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(5)], actor="test")


def claim(count: int, *, session: uuid.UUID | None = None, lease_seconds: float = 60, at=None) -> uuid.UUID:
    session = session or uuid.uuid4()
    services.claim_jobs(session=session, limit=count, lease_seconds=lease_seconds, at=at)
    return session


# --- reset_jobs -----------------------------------------------------------------------


@pytest.mark.django_db
def test_reset_jobs_prints_distribution_before_and_after_and_the_counts(jobs):
    claim(1)  # jobs[0], alone in its session: the evidence of a poison verdict
    claim(2)
    Job.objects.filter(pk=jobs[0].pk).update(interruptions=2)  # its third interruption: max reached
    output = run("reset_jobs")
    assert "Before: queued 2, running 3, succeeded 0, failed 0, cancelled 0, disallowed 0 (total 5)" in output
    assert "Requeued 2, failed 1 (interrupted too many times)." in output
    assert "After:  queued 4, running 0, succeeded 0, failed 1, cancelled 0, disallowed 0 (total 5)" in output
    assert output.index("Before:") < output.index("Requeued") < output.index("After:")
    events = JobEvent.objects.filter(kind=EventKind.INTERRUPT)
    assert set(events.values_list("actor", "reason")) >= {("command", "reset by manage.py reset_jobs")}
    assert events.count() == 3


@pytest.mark.django_db
def test_reset_jobs_dry_run_changes_nothing(jobs):
    claim(1)
    claim(2)
    Job.objects.filter(pk=jobs[0].pk).update(interruptions=2)
    before = list(Job.objects.order_by("pk").values())
    output = run("reset_jobs", "--dry-run")
    assert "Dry run: would move 3 running jobs (requeue 2, fail 1" in output
    assert "nothing was changed" in output
    assert "After:" not in output
    assert list(Job.objects.order_by("pk").values()) == before
    assert not JobEvent.objects.filter(kind=EventKind.INTERRUPT).exists()


@pytest.mark.django_db
def test_reset_jobs_says_which_jobs_reached_max_interruptions_in_company_and_run_alone_next(jobs):
    claim(3)
    Job.objects.filter(pk=jobs[0].pk).update(interruptions=2)
    assert "would move 3 running jobs (requeue 3, of them 1 to run alone next, fail 0" in run("reset_jobs", "--dry-run")
    output = run("reset_jobs")
    assert "Requeued 3 (1 of them to run alone next: max_interruptions reached in company), failed 0" in output
    assert Job.objects.get(pk=jobs[0].pk).run_alone


@pytest.mark.django_db
def test_reset_jobs_dry_run_applies_the_filters(jobs):
    session = claim(2)
    claim(2)
    assert "would move 2 running jobs" in run("reset_jobs", "--dry-run", "--session", str(session))
    assert "would move 1 running jobs" in run("reset_jobs", "--dry-run", "--job", str(jobs[3].pk), "--job", "999")
    assert "would move 0 running jobs" in run("reset_jobs", "--dry-run", "--expired")


@pytest.mark.django_db
def test_reset_jobs_session_filter_moves_only_that_sessions_jobs(jobs):
    mine = claim(2)
    claim(2)
    output = run("reset_jobs", "--session", str(mine))
    assert f"leased to session {mine}" in output
    assert "Requeued 2, failed 0" in output
    assert status_of(*jobs) == [Status.QUEUED, Status.QUEUED, Status.RUNNING, Status.RUNNING, Status.QUEUED]


@pytest.mark.django_db
def test_reset_jobs_job_filter_is_repeatable_and_reports_skipped_ids(jobs):
    claim(4)
    output = run("reset_jobs", "--job", str(jobs[0].pk), "--job", str(jobs[2].pk), "--job", str(jobs[4].pk))
    assert "Requeued 2, failed 0 (interrupted too many times), skipped 1 of the listed jobs" in output
    assert status_of(*jobs) == [Status.QUEUED, Status.RUNNING, Status.QUEUED, Status.RUNNING, Status.QUEUED]


@pytest.mark.django_db
def test_reset_jobs_expired_moves_only_jobs_whose_lease_ran_out(jobs):
    claim(2, lease_seconds=1, at=services.now() - timedelta(seconds=30))  # expired 29 s ago
    claim(2, lease_seconds=600)
    output = run("reset_jobs", "--expired")
    assert "Requeued 2, failed 0" in output
    assert status_of(*jobs) == [Status.QUEUED, Status.QUEUED, Status.RUNNING, Status.RUNNING, Status.QUEUED]


@pytest.mark.django_db
def test_reset_jobs_stale_for_moves_only_leases_expired_at_least_that_long_ago(jobs):
    long_ago = services.now() - timedelta(seconds=300)
    claim(1, lease_seconds=1, at=long_ago)  # expired about 299 s ago
    claim(1, lease_seconds=280, at=long_ago)  # expired about 20 s ago
    claim(1, lease_seconds=600)  # not expired
    output = run("reset_jobs", "--stale-for", "120")
    assert "Requeued 1, failed 0" in output
    assert status_of(*jobs[:3]) == [Status.QUEUED, Status.RUNNING, Status.RUNNING]
    assert "Requeued 1, failed 0" in run("reset_jobs", "--stale-for", "0")
    assert status_of(*jobs[:3]) == [Status.QUEUED, Status.QUEUED, Status.RUNNING]


@pytest.mark.django_db
def test_reset_jobs_filters_combine(jobs):
    session = claim(2, lease_seconds=1, at=services.now() - timedelta(seconds=30))
    claim(1, session=session, lease_seconds=600)
    claim(2, lease_seconds=1, at=services.now() - timedelta(seconds=30))
    output = run(
        "reset_jobs",
        "--session",
        str(session),
        "--expired",
        "--job",
        str(jobs[1].pk),
        "--job",
        str(jobs[2].pk),
        "--job",
        str(jobs[3].pk),
        "--reason",
        "crawler host rebooted",
    )
    assert "Requeued 1, failed 0 (interrupted too many times), skipped 2 of the listed jobs" in output
    assert status_of(*jobs) == [Status.RUNNING, Status.QUEUED, Status.RUNNING, Status.RUNNING, Status.RUNNING]
    event = JobEvent.objects.get(kind=EventKind.INTERRUPT)
    assert (event.job_id, event.actor, event.reason) == (jobs[1].pk, "command", "crawler host rebooted")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        (["--session", "not-a-uuid"], "argument --session: 'not-a-uuid' is not a session UUID"),
        (["--stale-for", "-5"], "argument --stale-for: '-5' must be a number of seconds, 0 or more"),
        (["--stale-for", "soon"], "argument --stale-for: 'soon' is not a number of seconds"),
        (["--stale-for", "nan"], "argument --stale-for: 'nan' must be a number of seconds, 0 or more"),
        (["--job", "7x"], "argument --job: '7x' is not a job id (a whole number)"),
        (["--job", "0"], "argument --job: '0' is not a job id (ids are 1 or more)"),
        (["--expired", "--stale-for", "3"], "argument --stale-for: not allowed with argument --expired"),
        (["--reason", "  "], "argument --reason: the reason must not be blank"),
    ],
)
def test_reset_jobs_rejects_bad_arguments_and_changes_nothing(jobs, args, message):
    claim(2)
    with pytest.raises(CommandError, match=re.escape(message)):
        run("reset_jobs", *args)
    assert Job.objects.running().count() == 2


@pytest.mark.django_db(transaction=True)
def test_reset_jobs_process_prints_distribution_and_requeues(jobs):
    session = claim(2)
    result = manage("reset_jobs", "--session", str(session), "--reason", "by hand")
    assert result.returncode == 0, result.stderr
    assert "Before: queued 3, running 2" in result.stdout
    assert "Requeued 2, failed 0" in result.stdout
    assert "After:  queued 5, running 0" in result.stdout
    assert Job.objects.running().count() == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "args, message",
    [
        (["--session", "12345"], "'12345' is not a session UUID"),
        (["--stale-for", "-1"], "'-1' must be a number of seconds, 0 or more"),
        (["--job", "abc"], "'abc' is not a job id"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_reset_jobs_process_exits_non_zero_on_bad_arguments(jobs, args, message):
    claim(2)
    result = manage("reset_jobs", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert Job.objects.running().count() == 2


# --- enqueue --------------------------------------------------------------------------


@pytest.mark.django_db
def test_enqueue_from_arguments_queues_each_url_and_prints_the_ids():
    output = run(
        "enqueue", "https://example.com/a", " https://example.com/b ", "--priority", "5", "--payload", '{"depth": 2}'
    )
    jobs = list(Job.objects.order_by("pk"))
    assert [(j.url, j.priority, j.payload, j.status) for j in jobs] == [
        ("https://example.com/a", 5, {"depth": 2}, Status.QUEUED),
        ("https://example.com/b", 5, {"depth": 2}, Status.QUEUED),
    ]
    assert f"queued job {jobs[0].pk} from argument 1: https://example.com/a" in output
    assert f"queued job {jobs[1].pk} from argument 2: https://example.com/b" in output
    assert "Queued 2 jobs." in output
    assert set(JobEvent.objects.values_list("kind", "actor")) == {(EventKind.ENQUEUE, "command")}


@pytest.mark.django_db
def test_enqueue_from_a_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("# seeds for today\n\nhttps://example.com/1\n   \n  # indented comment\nhttps://example.com/2\n")
    output = run("enqueue", "--file", str(path))
    assert list(Job.objects.order_by("pk").values_list("url", flat=True)) == [
        "https://example.com/1",
        "https://example.com/2",
    ]
    assert "from line 3: https://example.com/1" in output
    assert "from line 6: https://example.com/2" in output


@pytest.mark.django_db
def test_enqueue_from_stdin():
    output = run("enqueue", "--file", "-", stdin=io.StringIO("https://example.com/x\nhttps://example.com/y\n"))
    assert Job.objects.count() == 2
    assert "Queued 2 jobs." in output


@pytest.mark.django_db
def test_enqueue_file_with_one_bad_line_queues_nothing_and_names_the_line(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("https://example.com/1\nftp://example.com/file\nhttps://example.com/3\nnot a url\n")
    out = io.StringIO()
    with pytest.raises(CommandError, match="2 of 4 URLs rejected, 2 accepted; nothing was queued"):
        call_command("enqueue", "--file", str(path), stdout=out, no_color=True, verbosity=2)
    report = out.getvalue()
    assert "accepted line 1: https://example.com/1" in report
    assert "rejected line 2: 'ftp://example.com/file' is not a valid http:// or https:// URL" in report
    assert "accepted line 3: https://example.com/3" in report
    assert "rejected line 4: 'not a url' is not a valid http:// or https:// URL" in report
    assert Job.objects.count() == 0
    assert JobEvent.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give at least one URL, or --file PATH"),
        (["https://example.com/", "--file", "x.txt"], "give URLs as arguments or --file, not both"),
        (["--file", "/nonexistent/urls.txt"], "--file /nonexistent/urls.txt: no such file"),
        (["https://example.com/", "--payload", "[1, 2]"], "--payload: must be a JSON object"),
        (["https://example.com/", "--payload", "{oops"], "--payload: not valid JSON"),
        (["https://example.com/", "--priority", "high"], "--priority: 'high' is not a whole number"),
        (["https://example.com/", "--priority", str(2**40)], "--priority: priority is out of range"),
    ],
)
def test_enqueue_rejects_bad_input_and_queues_nothing(args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        run("enqueue", *args)
    assert Job.objects.count() == 0


@pytest.mark.django_db
def test_enqueue_reports_the_reason_for_a_rejected_argument():
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 of 2 URLs rejected"):
        call_command("enqueue", "https://example.com/ok", "https://example.com/" + "a" * 2100, stdout=out)
    assert "rejected argument 2: URL is 2120 characters long; at most 2048 are allowed" in out.getvalue()
    assert Job.objects.count() == 0


@pytest.mark.django_db
def test_enqueue_file_of_only_comments_is_an_error(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(CommandError, match="no URLs in .* \\(only blank lines and comments\\)"):
        run("enqueue", "--file", str(path))


@pytest.mark.django_db(transaction=True)
def test_enqueue_process_reads_stdin_and_queues():
    result = manage(
        "enqueue", "--file", "-", "--priority", "2", input="# list\nhttps://example.com/p1\nhttps://example.com/p2\n"
    )
    assert result.returncode == 0, result.stderr
    jobs = list(Job.objects.order_by("pk"))
    assert [(j.url, j.priority) for j in jobs] == [("https://example.com/p1", 2), ("https://example.com/p2", 2)]
    assert f"queued job {jobs[0].pk} from line 2" in result.stdout


@pytest.mark.django_db(transaction=True)
def test_enqueue_process_with_a_bad_line_exits_non_zero_and_queues_nothing(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("https://example.com/1\njavascript:alert(1)\n")
    result = manage("enqueue", "--file", str(path))
    assert result.returncode == 1
    assert "rejected line 2: 'javascript:alert(1)' is not a valid http:// or https:// URL" in result.stdout
    assert "CommandError: 1 of 2 URLs rejected, 1 accepted; nothing was queued" in result.stderr
    assert Job.objects.count() == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--file", "/nonexistent/urls.txt"], 1, "CommandError: --file /nonexistent/urls.txt: no such file"),
        (["https://example.com/", "--payload", "3"], 2, "argument --payload: must be a JSON object"),
        ([], 1, "CommandError: give at least one URL, or --file PATH"),
    ],
)
def test_enqueue_process_exits_non_zero_on_bad_arguments(args, status, message):
    result = manage("enqueue", *args)
    assert result.returncode == status
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert Job.objects.count() == 0
