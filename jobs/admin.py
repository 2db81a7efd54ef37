"""The operator's view of jobs and crawlers: find them, read their history, and hand them to the services.

Requeue, retry and cancel are admin actions that call jobs/services.py; the
change form edits only the definition of a job that is still queued, never
its status or lease. Crawlers are added, drained, resumed and removed through
jobs/fleet.py; their ownership (owner, epoch, session) is the bus's to write.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html

from . import fleet, selectors, services
from .actions import run_action, run_crawler_action
from .forms import parse_id
from .models import BusNode, Crawler, Job, JobEvent, Status

# What an operator may change, and only while the job waits in the queue: once
# claimed, the crawler already runs what it was given.
EDITABLE_WHILE_QUEUED = ("url", "payload", "priority", "kind", "max_attempts", "max_interruptions")

# The changelist reads only these columns: payload, progress and result can
# each be tens of kilobytes of JSON that a list page never shows.
CHANGELIST_FIELDS = (
    "id",
    "url",
    "status",
    "priority",
    "kind",
    "attempt",
    "interruptions",
    "lease_session",
    "started_at",
    "updated_at",
)

URL_COLUMN_LENGTH = 60

# Set on a Job whose edit save_model could not write (no longer queued): read by log_change and response_change.
NOT_SAVED = "_not_saved"


def format_duration(duration: timedelta) -> str:
    """A compact, sortable-looking duration: 45s, 3m 05s, 2h 03m, 4d 02h."""
    seconds = max(0, int(duration.total_seconds()))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


class JobChangeList(ChangeList):
    def get_queryset(self, request, exclude_parameters=None):
        return super().get_queryset(request, exclude_parameters).only(*CHANGELIST_FIELDS)


class KindFilter(admin.SimpleListFilter):
    """Jobs by kind: the kinds that have queued jobs (selectors.queued_kinds), never a scan of every job."""

    title = "kind"
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        kinds = selectors.queued_kinds()
        chosen = self.value()
        if chosen and chosen not in kinds:
            kinds.append(chosen)  # chosen from a link or kind:K: keep it selectable
        return [("-", "(none: any crawler)")] + [(kind, kind) for kind in kinds]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if not value:
            return queryset
        return queryset.filter(kind="" if value == "-" else value)


class JobForm(forms.ModelForm):
    """Holds an edited job to the rules enqueue applies (http/https URL, payload a JSON object...)."""

    def clean(self) -> dict[str, Any]:
        super().clean()  # ModelForm.clean returns self.cleaned_data (its stub says it may be None)
        cleaned = self.cleaned_data
        try:
            services.validate_job_spec(
                url=cleaned.get("url", self.instance.url),
                payload=cleaned.get("payload", self.instance.payload),
                priority=cleaned.get("priority", self.instance.priority),
                kind=cleaned.get("kind", self.instance.kind),
            )
        except ValidationError as exc:
            for name, problems in exc.message_dict.items():
                if name not in self.errors:  # the field's own check said it already
                    self.add_error(name if name in self.fields else None, problems)
        return cleaned


# The change page shows a job's latest events only: a job can have 100,000 of them
# (a crawler sending stale outcomes), and one form row per event took seconds.
# The rest are on the event list, filtered by job and paginated.
INLINE_EVENTS = 50


class LatestEventsFormSet(BaseInlineFormSet):
    """The inline's rows: the job's latest INLINE_EVENTS events, oldest first, read in one query."""

    def get_queryset(self):
        if not hasattr(self, "_latest"):
            latest = list(super().get_queryset().order_by("-id")[: INLINE_EVENTS + 1])
            self.events_cut = len(latest) > INLINE_EVENTS
            self._latest = latest[:INLINE_EVENTS][::-1]
        return self._latest


class JobEventInline(admin.TabularInline):
    """A job's audit trail: written by the services only, so never editable here."""

    model = JobEvent
    formset = LatestEventsFormSet
    fields = ("at", "kind", "from_status", "to_status", "attempt", "session", "actor", "reason")
    readonly_fields = fields
    ordering = ("id",)
    extra = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = "history"

    def has_add_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # The history is part of the job: whoever may see the job sees it.
        return request.user.has_perm("jobs.view_job") or request.user.has_perm("jobs.change_job")


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "short_url",
        "status",
        "priority",
        "kind",
        "attempt",
        "interruptions",
        "session_link",
        "running_for",
        "updated_at",
    )
    list_display_links = ("id", "short_url")
    list_filter = ("status", KindFilter)
    form = JobForm
    search_fields = ("url",)
    search_help_text = "A job id, part of a URL, or kind:K for the jobs of kind K."
    actions = ("requeue_running", "retry", "cancel")
    inlines = (JobEventInline,)
    # Counting every matching row a second time is the slowest query of a page
    # on a large table; the paginator's count is enough.
    show_full_result_count = False
    fieldsets = (
        ("Job", {"fields": EDITABLE_WHILE_QUEUED}),
        (
            "State",
            {
                "fields": (
                    "status",
                    "attempt",
                    "failures",
                    "interruptions",
                    "outcome_attempt",
                    "run_after",
                    "error",
                )
            },
        ),
        ("Lease", {"fields": ("lease_session", "lease_expires_at", "started_at", "running_for")}),
        ("Outcome", {"fields": ("finished_at", "progress", "result")}),
        ("Times", {"fields": ("created_at", "updated_at")}),
    )

    # --- The list ------------------------------------------------------------

    def get_changelist(self, request: HttpRequest, **kwargs):
        return JobChangeList

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        term = search_term.strip().removeprefix("#")
        if term.startswith("kind:"):
            return queryset.filter(kind=term.removeprefix("kind:").strip()), False
        job_id = parse_id(term)
        if job_id is not None:
            # An id (through the primary key, not a text cast), or digits in a URL.
            return queryset.filter(Q(pk=job_id) | Q(url__icontains=term)), False
        return super().get_search_results(request, queryset, search_term)

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        # The bus session list links here with ?lease_session=<uuid>.
        return lookup == "lease_session" or super().lookup_allowed(lookup, value, request)

    @admin.display(description="URL", ordering="url")
    def short_url(self, job: Job) -> str:
        if len(job.url) <= URL_COLUMN_LENGTH:
            return job.url
        return format_html('<span title="{}">{}…</span>', job.url, job.url[: URL_COLUMN_LENGTH - 1])

    @admin.display(description="session", ordering="lease_session")
    def session_link(self, job: Job) -> str:
        if job.lease_session is None:
            return "-"
        url = reverse("admin:jobs_bussession_change", args=[job.lease_session])
        return format_html('<a href="{}" title="{}">{}</a>', url, job.lease_session, str(job.lease_session)[:8])

    @admin.display(description="running for", ordering="-started_at")
    def running_for(self, job: Job) -> str:
        if job.status != Status.RUNNING or job.started_at is None:
            return "-"
        return format_duration(services.now() - job.started_at)

    # --- Actions: each calls one service and reports what it did -------------------

    @admin.action(description="Requeue selected running jobs", permissions=["change"])
    def requeue_running(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run_action(request, queryset, "requeue")

    @admin.action(description="Retry selected jobs", permissions=["change"])
    def retry(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run_action(request, queryset, "retry")

    @admin.action(description="Cancel selected jobs", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run_action(request, queryset, "cancel")

    def _run_action(self, request: HttpRequest, queryset: QuerySet, action: str) -> None:
        username = request.user.get_username()
        report = run_action(
            action=action,
            job_ids=list(queryset.values_list("id", flat=True)),
            username=username,
            actor=f"admin:{username}",
            place="in the admin",
        )
        self.message_user(request, report.text, messages.SUCCESS if report.changed else messages.WARNING)

    # --- The change form: a queued job's definition, nothing else ----------------

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Job | None:
        # Decoded by selectors.stored_json: a stored result Django cannot decode
        # (a 5,000-digit number) must not make the page fail.
        job_id = parse_id(object_id) if from_field is None else None
        if job_id is None:
            return super().get_object(request, object_id, from_field)
        try:
            return selectors.job_for_display(job_id)
        except Job.DoesNotExist:
            return None

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "inline_events": INLINE_EVENTS,
            "all_events_url": reverse("admin:jobs_jobevent_changelist") + f"?job={parse_id(object_id)}",
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Jobs are created by services.enqueue (`manage.py enqueue`), which
        # writes the audit event and wakes the bus.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # Deleting would take a running job from under the bus and erase its
        # history; cancel it instead.
        return False

    def formfield_for_dbfield(self, db_field, request: HttpRequest, **kwargs):
        if db_field.name == "url":
            kwargs["assume_scheme"] = "https"
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Job | None = None) -> list[str]:
        shown = flatten_fieldsets(self.fieldsets)
        if obj is not None and obj.status == Status.QUEUED:
            return [name for name in shown if name not in EDITABLE_WHILE_QUEUED]
        return shown

    def save_model(self, request: HttpRequest, obj: Job, form, change: bool) -> None:
        # Never save() the whole row: the bus may have claimed the job since
        # the form was loaded, and save() would write back the old status and
        # lease. Write only the edited fields, and only while still queued.
        edited = [name for name in form.changed_data if name in EDITABLE_WHILE_QUEUED]
        if not edited:
            return
        updated = (
            Job.objects.queued()
            .filter(pk=obj.pk)
            .update(
                **{name: getattr(obj, name) for name in edited},
                updated_at=services.now(),
            )
        )
        if not updated:
            setattr(obj, NOT_SAVED, True)
            self.message_user(
                request,
                f"Job {obj.pk} is no longer queued, so it was not changed.",
                messages.ERROR,
            )

    def log_change(self, request: HttpRequest, obj: Job, message):
        if getattr(obj, NOT_SAVED, False):
            return None
        return super().log_change(request, obj, message)

    def response_change(self, request: HttpRequest, obj: Job):
        if getattr(obj, NOT_SAVED, False):
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)


@admin.register(JobEvent)
class JobEventAdmin(admin.ModelAdmin):
    """Every job's audit trail, newest first, one page at a time: `?job=<id>` lists one job's."""

    list_display = ("id", "job_link", "at", "kind", "from_status", "to_status", "attempt", "session", "actor", "reason")
    list_display_links = None
    list_filter = ("kind",)
    ordering = ("-id",)
    list_per_page = 100
    show_full_result_count = False
    list_select_related = False

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup == "job" or super().lookup_allowed(lookup, value, request)

    @admin.display(description="job", ordering="job")
    def job_link(self, event: JobEvent) -> str:
        return format_html('<a href="{}">#{}</a>', reverse("admin:jobs_job_change", args=[event.job_id]), event.job_id)

    # Written by the services only; whoever may see jobs sees their history.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: JobEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: JobEvent | None = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: JobEvent | None = None) -> bool:
        return request.user.has_perm("jobs.view_job") or request.user.has_perm("jobs.change_job")

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)


# --- The fleet -------------------------------------------------------------------


class CrawlerForm(forms.ModelForm):
    """A new crawler's endpoint, checked and spelled as jobs.fleet stores it; the label of any."""

    class Meta:
        model = Crawler
        fields = ("endpoint", "label")

    def clean_endpoint(self) -> str:
        try:
            return fleet.normalize_endpoint(self.cleaned_data["endpoint"])
        except fleet.RegistryError as exc:
            raise ValidationError(str(exc)) from None


# What only the bus (or a fleet function) writes: shown, never edited here.
CRAWLER_READONLY = (
    "state",
    "remove_when_drained",
    "source",
    "owner",
    "owner_epoch",
    "owned_at",
    "session",
    "slots",
    "last_seen_at",
    "last_error",
    "created_at",
    "updated_at",
)


@admin.register(Crawler)
class CrawlerAdmin(admin.ModelAdmin):
    list_display = ("endpoint", "label", "state", "source", "owner", "last_seen_at", "session_link")
    list_filter = ("state", "source")
    search_fields = ("endpoint", "label", "owner")
    search_help_text = "Part of an endpoint, a label or an owning bus node."
    form = CrawlerForm
    actions = ("drain", "resume", "remove", "remove_now")
    readonly_fields = CRAWLER_READONLY

    def get_fieldsets(self, request: HttpRequest, obj: Crawler | None = None):
        if obj is None:
            return [(None, {"fields": ("endpoint", "label")})]
        return [
            (None, {"fields": ("endpoint", "label", "state", "remove_when_drained", "source")}),
            ("Ownership", {"fields": ("owner", "owner_epoch", "owned_at", "session", "slots")}),
            ("Health", {"fields": ("last_seen_at", "last_error", "created_at", "updated_at")}),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: Crawler | None = None):
        # An endpoint is the crawler's identity (jobs record it): a different one is another crawler.
        return CRAWLER_READONLY if obj is None else ("endpoint", *CRAWLER_READONLY)

    @admin.display(description="session", ordering="session")
    def session_link(self, crawler: Crawler) -> str:
        if crawler.session is None:
            return "-"
        url = reverse("admin:jobs_bussession_change", args=[crawler.session])
        return format_html('<a href="{}" title="{}">{}</a>', url, crawler.session, str(crawler.session)[:8])

    # --- Actions: each calls one jobs.fleet function per crawler ---------------------

    @admin.action(description="Drain selected crawlers (no new jobs; paused once idle)", permissions=["change"])
    def drain(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, queryset, "drain")

    @admin.action(description="Resume selected crawlers", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, queryset, "resume")

    @admin.action(description="Remove selected crawlers once their running jobs finish", permissions=["change"])
    def remove(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, queryset, "remove")

    @admin.action(description="Remove selected crawlers now (requeue their running jobs)", permissions=["change"])
    def remove_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._run(request, queryset, "remove_now")

    def _run(self, request: HttpRequest, queryset: QuerySet, action: str) -> None:
        actor = f"admin:{request.user.get_username()}"
        for endpoint in queryset.values_list("endpoint", flat=True):
            try:
                line = run_crawler_action(action=action, endpoint=endpoint, actor=actor)
            except fleet.RegistryError as exc:  # removed meanwhile
                self.message_user(request, str(exc), messages.WARNING)
            else:
                self.message_user(request, line, messages.SUCCESS)

    # --- Add and change: through jobs.fleet, never a save() of the whole row ---------

    def save_model(self, request: HttpRequest, obj: Crawler, form, change: bool) -> None:
        if change:
            # save() would write back owner, epoch and session as the form loaded them,
            # undoing what the owning bus wrote since: write the label alone.
            if "label" in form.changed_data:
                Crawler.objects.filter(pk=obj.pk).update(label=obj.label, updated_at=services.now())
            return
        crawler, created = fleet.add_crawler(endpoint=obj.endpoint, label=obj.label)
        for model_field in Crawler._meta.concrete_fields:
            setattr(obj, model_field.attname, getattr(crawler, model_field.attname))
        if not created:  # registered meanwhile (the form checked it was not)
            self.message_user(request, f"{crawler.endpoint} was already registered.", messages.WARNING)

    def has_delete_permission(self, request: HttpRequest, obj: Crawler | None = None) -> bool:
        # Deleting the row would leave its running jobs to the lease sweeper: remove it with an action.
        return False


@admin.register(BusNode)
class BusNodeAdmin(admin.ModelAdmin):
    """The bus processes and their leases, read-only: each node writes its own row."""

    list_display = ("node", "host", "pid", "started_at", "lease_expires_at", "lease_live", "stopping")
    search_fields = ("node", "host")
    actions = None

    @admin.display(description="lease", boolean=True)
    def lease_live(self, node: BusNode) -> bool:
        return node.lease_expires_at >= services.now()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: BusNode | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: BusNode | None = None) -> bool:
        return False


from . import admin_hosts  # noqa: E402, F401  (HostAdmin, registered on import)
