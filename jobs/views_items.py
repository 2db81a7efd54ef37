"""Export of a job's stored items (docs/protocol.md section 17) as a JSON Lines download.

The page URL takes the pages' sign-in (anonymous users are sent to the login
page); the API URL takes the API's (a JSON 401 or 403). Both need the view
permission, and answer 404 when the job has no stored items.
"""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from . import selectors
from .api import api_login_required
from .views import view_permission_required

CONTENT_TYPE = "application/jsonl; charset=utf-8"


def _download(job_id: int, lines: str) -> HttpResponse:
    response = HttpResponse(lines.encode("utf-8"), content_type=CONTENT_TYPE)
    response["Content-Disposition"] = f'attachment; filename="job-{job_id}-items.jsonl"'
    return response


@view_permission_required
@require_GET
def job_items(request: HttpRequest, job_id: int) -> HttpResponse:
    """GET /jobs/<id>/items.jsonl: one JSON object per line, as the crawler sent them (cut to JOB_ITEMS_MAX)."""
    lines = selectors.stored_items_text(job_id)
    if lines is None:
        raise Http404(f"Job {job_id} has no stored items.")
    return _download(job_id, lines)


@require_GET
@api_login_required
def api_job_items(request: HttpRequest, job_id: int) -> HttpResponse:
    """GET /api/jobs/<id>/items.jsonl: the same download, with the API's JSON errors."""
    lines = selectors.stored_items_text(job_id)
    if lines is None:
        return JsonResponse({"error": f"job {job_id} has no stored items"}, status=404)
    return _download(job_id, lines)
