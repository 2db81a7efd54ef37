"""The web pages: dashboard, job list, job detail, enqueue, crawlers, /health, and crawlers announcing themselves.

Each view parses input, asks jobs/selectors.py or calls one service from
jobs/services.py, and renders. Pages with live data also render their live
part alone (`?fragment=1`), which jobs/static/jobs/live.js fetches every 2 s.
"""

from __future__ import annotations

import json
import re
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import DatabaseError, connection
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import fleet, selectors, services
from .actions import run_action, run_crawler_action
from .forms import ACTIONS, CRAWLER_ACTIONS, BulkActionForm, CrawlerActionForm, CrawlerAddForm, EnqueueForm, parse_id
from .models import Crawler, Job, Status

PAGE_SIZE = 50
LIVE_INTERVAL_MS = 2000
LINKED_NEW_JOBS = 10


def can_view_jobs(user) -> bool:
    """Reading jobs (every page and the API) needs the view permission; change implies it, as in the admin."""
    return user.is_active and (user.has_perm("jobs.view_job") or user.has_perm("jobs.change_job"))


def view_permission_required(view):
    """Signed-in users with the view permission; others signed in get a 403, anonymous ones the login page."""

    @wraps(view)
    @login_required
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not can_view_jobs(request.user):
            raise PermissionDenied('Reading jobs needs the "view job" permission; ask an administrator.')
        return view(request, *args, **kwargs)

    return wrapper


def can_change_jobs(user) -> bool:
    """Staff who may change jobs in the admin may act on them here: the same rule in both places."""
    return user.is_active and user.is_staff and user.has_perm("jobs.change_job")


def _require_change(request: HttpRequest) -> None:
    if not can_change_jobs(request.user):
        raise PermissionDenied("Changing jobs needs a staff account with permission to change jobs.")


def _is_fragment(request: HttpRequest) -> bool:
    return request.GET.get("fragment") == "1"


def _int_param(request: HttpRequest, name: str) -> int | None:
    return parse_id(request.GET.get(name, ""))


def _page(request: HttpRequest, template: str, fragment_template: str, context: dict) -> HttpResponse:
    """The whole page, or only its live part when live.js asks for it."""
    context.setdefault("now", services.now())
    context.setdefault("live_interval", LIVE_INTERVAL_MS)
    context.setdefault("can_change", can_change_jobs(request.user))
    query = request.GET.copy()
    query["fragment"] = "1"
    context.setdefault("live_url", f"{request.path}?{query.urlencode()}")
    response = render(request, fragment_template if _is_fragment(request) else template, context)
    if _is_fragment(request):
        response["Cache-Control"] = "no-store"
    return response


# --- Dashboard ----------------------------------------------------------------------


@view_permission_required
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    board = selectors.dashboard(at=services.now())
    return _page(
        request,
        "jobs/dashboard.html",
        "jobs/_dashboard_live.html",
        {
            "board": board,
            "now": board.at,
            "chart": _chart(board.throughput),
        },
    )


CHART_WIDTH, CHART_HEIGHT, CHART_TOP = 600, 120, 4


def _chart(bars: list[selectors.ThroughputBar]) -> dict:
    """Bar geometry of the throughput SVG, computed here so the template only prints numbers."""
    peak = max((bar.total for bar in bars), default=0)
    step = CHART_WIDTH / max(1, len(bars))
    usable = CHART_HEIGHT - CHART_TOP
    shapes = []
    for index, bar in enumerate(bars):
        total_h = usable * bar.total / peak if peak else 0
        ok_h = usable * bar.succeeded / peak if peak else 0
        shapes.append(
            {
                "bar": bar,
                "x": round(index * step + 1, 2),
                "width": round(max(1.0, step - 2), 2),
                "y": round(CHART_HEIGHT - total_h, 2),
                "height": round(total_h, 2),
                "ok_y": round(CHART_HEIGHT - ok_h, 2),
                "ok_height": round(ok_h, 2),
            }
        )
    return {
        "bars": shapes,
        "peak": peak,
        "total": sum(bar.total for bar in bars),
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
    }


# --- Jobs ---------------------------------------------------------------------------


@view_permission_required
@require_GET
def job_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "")
    status = status if status in Status.values else ""
    query = request.GET.get("q", "").strip()[:500]
    kind = request.GET.get("kind", "").strip()[:100].replace("\x00", "")
    sort = request.GET.get("sort", selectors.DEFAULT_SORT)
    page = selectors.job_page(
        status=status or None,
        url=query,
        kind=kind or None,
        sort=sort,
        before=_int_param(request, "before"),
        after=_int_param(request, "after"),
        limit=PAGE_SIZE,
    )
    filters = {
        key: value
        for key, value in (("status", status), ("q", query), ("kind", kind), ("sort", page.sort))
        if value and not (key == "sort" and value == selectors.DEFAULT_SORT)
    }

    def link(**cursor) -> str:
        return "?" + urlencode({**filters, **cursor}) if (filters or cursor) else "?"

    return _page(
        request,
        "jobs/job_list.html",
        "jobs/_job_list_live.html",
        {
            "page": page,
            "status": status,
            "query": query,
            "kind": kind,
            "sort": page.sort,
            "statuses": Status.choices,
            "sorts": [("id", "Newest"), ("priority", "Claim order"), ("updated", "Updated")],
            "next_link": link(before=page.next_cursor) if page.next_cursor else "",
            "previous_link": link(after=page.previous_cursor) if page.previous_cursor else "",
            "first_link": link(),
            "actions": ACTIONS,
            "return_to": request.get_full_path(),
        },
    )


@view_permission_required
@require_GET
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    try:
        job, events, events_cut = selectors.job_with_events(job_id)
    except Job.DoesNotExist:
        raise Http404(f"No job {job_id}.") from None
    result = job.result if isinstance(job.result, dict) else None
    return _page(
        request,
        "jobs/job_detail.html",
        "jobs/_job_detail_live.html",
        {
            "job": job,
            "events": events,
            "events_cut": events_cut,
            "bus_session": selectors.session_of(job),
            # A finished or queued job has no lease; its timeline still says which session ran it last.
            "last_session": next((event.session for event in reversed(events) if event.session), None),
            "result": result,
            "result_fields": _result_fields(result),
            "stored_items": selectors.stored_items_of(job),
            "actions": ACTIONS,
            "return_to": reverse("jobs:detail", args=[job.pk]),
        },
    )


# The reference crawler's result fields, in reading order (docs/protocol.md).
RESULT_FIELDS = (
    ("status", "HTTP status"),
    ("final_url", "Final URL"),
    ("content_type", "Content type"),
    ("bytes", "Bytes"),
    ("title", "Title"),
    ("links", "Links"),
    ("elapsed_ms", "Elapsed (ms)"),
)


def _result_fields(result: dict | None) -> list[tuple[str, str, object]]:
    if not result:
        return []
    return [(key, label, result[key]) for key, label in RESULT_FIELDS if key in result]


@login_required
@require_POST
def job_actions(request: HttpRequest) -> HttpResponse:
    """Requeue, retry or cancel the posted job ids through the services; report the counts."""
    _require_change(request)
    form = BulkActionForm(request.POST)
    back = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        back = reverse("jobs:list")
    if not form.is_valid():
        # The texts an ErrorList iterates over, which its stub types as ValidationError | str.
        errors = form.errors.as_data()
        for error in errors.get("__all__", []) + errors.get("action", []):
            for problem in error.messages:
                messages.error(request, problem)
        return HttpResponseRedirect(back)
    username = request.user.get_username()
    report = run_action(
        action=form.cleaned_data["action"],
        job_ids=form.cleaned_data["job_ids"],
        username=username,
        actor=f"web:{username}",
        place="from the jobs page",
    )
    (messages.success if report.changed else messages.warning)(request, report.text)
    return HttpResponseRedirect(back)


LINE_MESSAGE = re.compile(r"^line (\d+): (.*)$", re.DOTALL)


@login_required
@require_http_methods(["GET", "POST"])
def enqueue(request: HttpRequest) -> HttpResponse:
    """Queue one URL per line, all or nothing (services.enqueue_many)."""
    _require_change(request)
    form = EnqueueForm(request.POST or None)
    problems: list[dict] = []
    if request.method == "POST" and form.is_valid():
        lines = form.numbered_lines()
        try:
            jobs = services.enqueue_many(
                urls=[text for _, text in lines],
                priority=form.cleaned_data["priority"],
                kind=form.cleaned_data["kind"],
                actor=f"web:{request.user.get_username()}",
            )
        except ValidationError as exc:
            problems = _line_problems(exc, lines)
            form.add_error(
                "urls",
                f"Nothing was queued: {len(problems)} line(s) need fixing." if lines else "Enter at least one URL.",
            )
        else:
            messages.success(request, _enqueued_message(jobs))
            return HttpResponseRedirect(reverse("jobs:new"))
    return render(
        request,
        "jobs/enqueue.html",
        {
            "form": form,
            "problems": problems,
            "can_change": True,
            "now": services.now(),
        },
    )


def _line_problems(exc: ValidationError, lines: list[tuple[int, str]]) -> list[dict]:
    """enqueue_many's "line N: reason" (N counts the URLs sent) as textarea line numbers and texts."""
    problems = []
    for message in exc.messages:
        match = LINE_MESSAGE.match(message)
        if match and 1 <= int(match.group(1)) <= len(lines):
            number, text = lines[int(match.group(1)) - 1]
            problems.append({"line": number, "text": text, "reason": match.group(2)})
        else:
            problems.append({"line": None, "text": "", "reason": message})
    return problems


def _enqueued_message(jobs: list[Job]) -> str:
    ids = [job.pk for job in jobs]
    shown = format_html_join(
        ", ", '<a href="{}">#{}</a>', ((job.get_absolute_url(), job.pk) for job in jobs[:LINKED_NEW_JOBS])
    )
    more = "…" if len(jobs) > LINKED_NEW_JOBS else ""
    listing = reverse("jobs:list") + "?" + urlencode({"before": max(ids) + 1})
    return format_html(
        'Queued {} job{}: {}{} — <a href="{}" id="new-jobs-link">see them in the list</a>.',
        len(jobs),
        "" if len(jobs) == 1 else "s",
        shown,
        more,
        listing,
    )


# --- Crawlers ----------------------------------------------------------------------


def can_manage_crawlers(user, *, permission: str = "change") -> bool:
    """Staff with the admin's permission on crawlers ("change" to drain/resume/remove, "add" to add)."""
    return user.is_active and user.is_staff and user.has_perm(f"jobs.{permission}_crawler")


def _require_crawlers(request: HttpRequest, *, permission: str = "change") -> None:
    if not can_manage_crawlers(request.user, permission=permission):
        raise PermissionDenied(f"This needs a staff account with permission to {permission} crawlers.")


def _crawlers_page(request: HttpRequest, add_form: CrawlerAddForm | None = None) -> HttpResponse:
    at = services.now()
    return _page(
        request,
        "jobs/crawlers.html",
        "jobs/_crawlers_live.html",
        {
            "fleet": selectors.fleet_status(at=at),
            "now": at,
            "heartbeat_timeout": settings.HEARTBEAT_TIMEOUT,
            "can_manage": can_manage_crawlers(request.user),
            "can_add": can_manage_crawlers(request.user, permission="add"),
            "add_form": add_form or CrawlerAddForm(),
            "live_url": reverse("jobs:crawlers") + "?fragment=1",  # also after a POST to crawlers/add
        },
    )


@view_permission_required
@require_GET
def crawlers(request: HttpRequest) -> HttpResponse:
    return _crawlers_page(request)


@login_required
@require_POST
def crawler_add(request: HttpRequest) -> HttpResponse:
    """Register an endpoint (jobs.fleet.add_crawler); a bad one shows the page again with the reason."""
    _require_crawlers(request, permission="add")
    form = CrawlerAddForm(request.POST)
    if form.is_valid():
        try:
            crawler, created = fleet.add_crawler(
                endpoint=form.cleaned_data["endpoint"], label=form.cleaned_data["label"]
            )
        except fleet.RegistryError as exc:
            form.add_error("endpoint", str(exc))
        else:
            if created:
                messages.success(request, f"{crawler.endpoint}: registered.")
            else:
                messages.warning(request, f"{crawler.endpoint}: already registered; nothing added.")
            return HttpResponseRedirect(reverse("jobs:crawlers"))
    return _crawlers_page(request, add_form=form)


@login_required
@require_POST
def crawler_action(request: HttpRequest) -> HttpResponse:
    """Drain, resume or remove one crawler through jobs.fleet; say what happened on the crawlers page."""
    _require_crawlers(request)
    form = CrawlerActionForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose an action and a crawler.")
        return HttpResponseRedirect(reverse("jobs:crawlers"))
    try:
        line = run_crawler_action(
            action=form.cleaned_data["action"],
            endpoint=form.cleaned_data["endpoint"],
            actor=f"web:{request.user.get_username()}",
        )
    except fleet.RegistryError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, line)
    return HttpResponseRedirect(reverse("jobs:crawlers"))


@login_required
@require_GET
def crawler_remove(request: HttpRequest) -> HttpResponse:
    """Ask before removing: after draining, or now (requeueing the running jobs)."""
    _require_crawlers(request)
    try:
        endpoint = fleet.normalize_endpoint(request.GET.get("endpoint", ""))
        crawler = Crawler.objects.get(endpoint=endpoint)
    except (fleet.RegistryError, Crawler.DoesNotExist):
        raise Http404("No such crawler is registered.") from None
    return render(
        request,
        "jobs/crawler_remove.html",
        {
            "crawler": crawler,
            "running": Job.objects.running().filter(crawler=crawler.endpoint).count(),
            "actions": {name: CRAWLER_ACTIONS[name] for name in ("remove", "remove_now")},
            "can_change": can_change_jobs(request.user),
            "now": services.now(),
        },
    )


# A crawler's announcement: one small JSON object (docs in README.md, "Crawlers").
MAX_ANNOUNCE_BYTES = 4096


def _announce_error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


@csrf_exempt  # no session and no cookie: the HMAC with BUS_TOKEN is the proof
@never_cache
def announce(request: HttpRequest) -> JsonResponse:
    """POST /crawlers/announce: a crawler registers or deregisters itself (jobs.fleet.announce)."""
    if request.method != "POST":
        response = _announce_error("POST a JSON object", 405)
        response["Allow"] = "POST"
        return response
    if not settings.BUS_TOKEN:
        return _announce_error("self-registration is off: it needs BUS_TOKEN", 404)
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    too_large = _announce_error(f"the body is larger than {MAX_ANNOUNCE_BYTES} bytes", 413)
    if declared > MAX_ANNOUNCE_BYTES:
        return too_large
    body = request.read(MAX_ANNOUNCE_BYTES + 1)
    if len(body) > MAX_ANNOUNCE_BYTES:
        return too_large
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        return _announce_error("the body is not JSON", 400)
    if not isinstance(fields, dict):
        return _announce_error("the body must be a JSON object", 400)
    try:
        status, crawler = fleet.announce(fields=fields)
    except fleet.AnnounceRefused as exc:  # the proof itself: wrong HMAC, stale ts, replay
        return _announce_error(str(exc), 403)
    except fleet.RegistryError as exc:
        return _announce_error(str(exc), 400)
    endpoint = crawler.endpoint if crawler is not None else fleet.normalize_endpoint(fields["endpoint"])
    return JsonResponse({"status": status, "endpoint": endpoint})


# --- Sign-in throttling ---------------------------------------------------------------


def client_ip(request: HttpRequest) -> str | None:
    """The client's address, as django-axes counts failed sign-ins (AXES_CLIENT_IP_CALLABLE).

    Behind TRUSTED_PROXIES proxies, the address the outermost of them appended
    to X-Forwarded-For: entries left of it come from the client and may be forged,
    and REMOTE_ADDR is the proxy itself, which would lock everyone out together.
    """
    hops = settings.TRUSTED_PROXIES
    if hops:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        forwarded = [part for part in forwarded if part]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return request.META.get("REMOTE_ADDR")


# --- Health -------------------------------------------------------------------------


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """For load balancers: 200 when the database answers and a crawler session is live, else 503.

    A session counts when it is connected and its heartbeat is within
    2 x HEARTBEAT_TIMEOUT: a row left "connected" by a bus that died is no crawler.
    Anyone gets the status and the counts; the sessions (ids, endpoint paths,
    crawler names) only a signed-in user.
    """
    at = services.now()
    try:
        detailed = request.user.is_authenticated and request.user.is_active  # reads the session table
    except DatabaseError:
        detailed = False
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        report = {"database": "ok", **selectors.health(at=at)}
    except DatabaseError:
        report = {"database": "error", "sessions": [], "live_sessions": 0, "oldest_running_age": None}
    report["status"] = "ok" if report["database"] == "ok" and report["live_sessions"] else "unavailable"
    report["session_count"] = len(report["sessions"])
    if detailed:
        report["heartbeat_timeout"] = settings.HEARTBEAT_TIMEOUT
    else:
        del report["sessions"]
    return JsonResponse(report, status=200 if report["status"] == "ok" else 503)
