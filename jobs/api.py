"""A JSON API over jobs for scripts: the list (filters, keyset pages), one job with its events, and enqueue.

Signed-in users with the `jobs.view_job` permission only (the session cookie
of the pages); anonymous callers get a JSON 401 rather than the login page,
users without the permission a JSON 403. Queueing jobs (POST to the list)
needs what the new-jobs page needs: a staff account with the "change job"
permission; being a POST with the session cookie, it carries Django's CSRF
token (the `csrftoken` cookie, sent back in an `X-CSRFToken` header).
"""

from __future__ import annotations

import json
from functools import wraps

from django.core.exceptions import ValidationError
from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_http_methods

from . import selectors, services
from .forms import MAX_LINES, parse_id
from .models import Job, JobEvent, Status
from .views import can_change_jobs, can_view_jobs

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def api_login_required(view):
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"error": "authentication required: sign in at /accounts/login/"}, status=401)
        if not request.user.is_active:
            return JsonResponse({"error": "this account is inactive"}, status=403)
        if not can_view_jobs(request.user):
            return JsonResponse({"error": 'reading jobs needs the "view job" permission'}, status=403)
        return view(request, *args, **kwargs)

    return wrapper


def _bad_request(message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=400)


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def job_summary(job: Job) -> dict:
    return {
        "id": job.pk,
        "url": job.url,
        "status": job.status,
        "priority": job.priority,
        "kind": job.kind,  # "" : any crawler takes it
        "attempt": job.attempt,
        "failures": job.failures,
        "interruptions": job.interruptions,
        "session": str(job.lease_session) if job.lease_session else None,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "href": reverse("jobs:api_detail", args=[job.pk]),
    }


def event_record(event: JobEvent) -> dict:
    return {
        "id": event.pk,
        "at": _iso(event.at),
        "kind": event.kind,
        "from_status": event.from_status,
        "to_status": event.to_status,
        "attempt": event.attempt,
        "session": str(event.session) if event.session else None,
        "actor": event.actor,
        "reason": event.reason,
    }


@require_http_methods(["GET", "POST"])
@api_login_required
def jobs(request: HttpRequest) -> JsonResponse:
    """/api/jobs/: GET lists jobs, POST queues new ones."""
    if request.method == "POST":
        return _enqueue(request)
    return _job_list(request)


def _enqueue(request: HttpRequest) -> JsonResponse:
    """POST /api/jobs/ {"urls": [...], "priority": 0, "kind": "", "payload": {}}: all queued, or none (400).

    `url` (one string) may stand for `urls`. The answer, 201, lists the new
    jobs' ids in the order of the URLs.
    """
    if not can_change_jobs(request.user):
        return JsonResponse({"error": "queueing jobs needs a staff account with permission to change jobs"}, status=403)
    try:
        body = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return _bad_request(f"the body must be a JSON object: {exc}")
    if not isinstance(body, dict):
        return _bad_request("the body must be a JSON object")
    unknown = sorted(set(body) - {"url", "urls", "priority", "kind", "payload"})
    if unknown:
        return _bad_request(f"unknown fields: {', '.join(unknown)}")
    if ("url" in body) == ("urls" in body):
        return _bad_request("give either url (a string) or urls (a list of strings)")
    urls = [body["url"]] if "url" in body else body["urls"]
    if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
        return _bad_request("urls must be a non-empty list of strings")
    if len(urls) > MAX_LINES:
        return _bad_request(f"at most {MAX_LINES} URLs at once")
    try:
        queued = services.enqueue_many(
            urls=urls,
            priority=body.get("priority", 0),
            kind=body.get("kind", ""),
            payload=body.get("payload"),
            actor=f"api:{request.user.get_username()}",
        )
    except ValidationError as exc:
        return JsonResponse({"error": "nothing was queued", "problems": exc.messages}, status=400)
    return JsonResponse({"count": len(queued), "ids": [job.pk for job in queued]}, status=201)


def _job_list(request: HttpRequest) -> JsonResponse:
    """GET /api/jobs/?status=&kind=&url=&before=&limit= — newest first; `next` holds the following page's URL."""
    status = request.GET.get("status") or None
    if status is not None and status not in Status.values:
        return _bad_request(f"status must be one of {', '.join(Status.values)}")
    kind = request.GET.get("kind", "")
    try:
        kind = services.validate_kind(kind)
    except ValidationError as exc:
        return _bad_request("; ".join(exc.messages))
    limit = parse_id(request.GET.get("limit", str(DEFAULT_LIMIT)))
    before = parse_id(request.GET["before"]) if request.GET.get("before") else None
    if limit is None or (request.GET.get("before") and before is None):
        return _bad_request("limit and before must be whole numbers (ASCII digits, below 2**63)")
    if not 1 <= limit <= MAX_LIMIT:
        return _bad_request(f"limit must be between 1 and {MAX_LIMIT}")
    url = request.GET.get("url", "")[:500]
    page = selectors.job_page(status=status, url=url, kind=kind or None, before=before, limit=limit)
    next_url = None
    if page.next_cursor is not None:
        params: dict[str, str | int] = {k: v for k, v in (("status", status), ("kind", kind), ("url", url)) if v}
        next_url = request.path + "?" + urlencode({**params, "limit": limit, "before": page.next_cursor})
    return JsonResponse({"jobs": [job_summary(job) for job in page.jobs], "next": next_url})


@require_GET
@api_login_required
def job_detail(request: HttpRequest, job_id: int) -> JsonResponse:
    try:
        job, events, events_cut = selectors.job_with_events(job_id)
    except Job.DoesNotExist:
        return JsonResponse({"error": f"no job {job_id}"}, status=404)
    items = selectors.stored_items_of(job)
    return JsonResponse(
        {
            **job_summary(job),
            "payload": job.payload,
            "max_attempts": job.max_attempts,
            "max_interruptions": job.max_interruptions,
            "run_after": _iso(job.run_after),
            "lease_expires_at": _iso(job.lease_expires_at),
            "progress": job.progress,
            "result": job.result,
            "error": job.error,
            # Stored items (docs/protocol.md section 17): null when the job has none.
            "items_stored": None if items is None else items.count,
            "items_truncated": None if items is None else items.truncated,
            "items_href": None if items is None else reverse("jobs:api_items", args=[job.pk]),
            "events": [event_record(event) for event in events],
            "events_truncated": events_cut,
            "page": job.get_absolute_url(),
        }
    )
