"""Hosts in the admin: find them, read their dispatch state, change delay, concurrency and pause.

Every change goes through jobs.services (update_host, end_backoff), which
write the row under the lock the claim takes: a save() of the whole row would
write back the dispatch state (ready_at, back-off, errors) as the form loaded
it, undoing what the claim wrote since. Hosts are created by enqueue and never
deleted here: their jobs point at them.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.utils.html import format_html

from . import services
from .models import Host

# Written by the claim, back-offs and robots.txt: shown, never edited here.
HOST_READONLY = (
    "key",
    "crawl_delay",
    "active",
    "top_priority",
    "next_start_at",
    "backoff_until",
    "backoff_reason",
    "errors",
    "ready_at",
    "last_start_at",
    "created_at",
    "updated_at",
    "robots_state",
    "robots_status",
    "robots_fetched_at",
    "robots_due_at",
    "robots_failures",
    "robots_error",
    "robots_session",
    "robots_lease_until",
    "robots_file",
)

# Set on a Host whose change update_host refused: read by log_change and response_change.
NOT_SAVED = "_not_saved"


class HostForm(forms.ModelForm):
    """Delay, concurrency and pause, held to the bounds services.update_host applies (it checks them again)."""

    delay = forms.FloatField(
        required=False,
        min_value=0,
        max_value=86400,
        help_text="Seconds between two starts (0 to 86400); empty: the HOST_DELAY setting.",
    )
    concurrency = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=100_000,
        help_text="Most jobs running at once (1 to 100000); empty: the HOST_CONCURRENCY setting.",
    )

    class Meta:
        model = Host
        fields = ("delay", "concurrency", "paused")


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ("key", "paused", "delay", "concurrency", "backoff_until", "active", "robots_state")
    list_filter = ("paused", "active", "robots_state")
    search_fields = ("key",)
    search_help_text = "Part of a host name (hostname[:port])."
    ordering = ("key",)
    form = HostForm
    readonly_fields = HOST_READONLY
    fieldsets = (
        (None, {"fields": ("key", "delay", "concurrency", "paused")}),
        (
            "Dispatch state",
            {
                "fields": (
                    "crawl_delay",
                    "active",
                    "top_priority",
                    "next_start_at",
                    "backoff_until",
                    "backoff_reason",
                    "errors",
                    "ready_at",
                    "last_start_at",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        (
            "robots.txt",
            {
                "fields": (
                    "robots_state",
                    "robots_status",
                    "robots_fetched_at",
                    "robots_due_at",
                    "robots_failures",
                    "robots_error",
                    "robots_session",
                    "robots_lease_until",
                ),
                "description": "Written by jobs.robots from the crawlers' answers: shown, never edited here.",
            },
        ),
        ("robots.txt file", {"classes": ("collapse",), "fields": ("robots_file",)}),
    )
    actions = ("pause", "resume", "lift_backoff")
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # A robots.txt may hold 500 KiB: the list never reads it; the change form reads its one host's.
        return super().get_queryset(request).defer("robots_txt")

    @admin.display(description="robots.txt")
    def robots_file(self, obj: Host) -> str:
        if not obj.robots_txt:
            return "–"
        return format_html(
            '<pre style="max-height: 30rem; overflow: auto; white-space: pre-wrap; margin: 0">{}</pre>', obj.robots_txt
        )

    # --- Actions: each calls one service per host ---------------------------------------

    @admin.action(description="Pause selected hosts", permissions=["change"])
    def pause(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._update(request, queryset, paused=True)

    @admin.action(description="Resume selected hosts", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._update(request, queryset, paused=False)

    @admin.action(description="Lift the back-off of selected hosts", permissions=["change"])
    def lift_backoff(self, request: HttpRequest, queryset: QuerySet) -> None:
        actor = f"admin:{request.user.get_username()}"
        keys = list(queryset.filter(backoff_until__isnull=False).values_list("key", flat=True))
        for key in keys:
            try:
                services.end_backoff(key=key, actor=actor)
            except Host.DoesNotExist:
                pass
        self.message_user(request, f"Back-off lifted on {len(keys)} host(s).", messages.SUCCESS)

    def _update(self, request: HttpRequest, queryset: QuerySet, **changes: Any) -> None:
        actor = f"admin:{request.user.get_username()}"
        keys = list(queryset.values_list("key", flat=True))
        for key in keys:
            try:
                services.update_host(key=key, actor=actor, **changes)
            except Host.DoesNotExist:
                pass
        state = "paused" if changes.get("paused") else "resumed"
        self.message_user(request, f"{len(keys)} host(s) {state}.", messages.SUCCESS)

    # --- The change form: through services.update_host, never a save() of the whole row ------

    def save_model(self, request: HttpRequest, obj: Host, form, change: bool) -> None:
        changes = {name: form.cleaned_data[name] for name in form.changed_data if name in services.HOST_FIELDS}
        if not changes:
            return
        try:
            host = services.update_host(key=obj.key, actor=f"admin:{request.user.get_username()}", **changes)
        except (ValidationError, Host.DoesNotExist) as exc:
            setattr(obj, NOT_SAVED, True)
            text = "; ".join(exc.messages) if isinstance(exc, ValidationError) else "the host no longer exists"
            self.message_user(request, f"{obj.key} was not changed: {text}", messages.ERROR)
            return
        for model_field in Host._meta.concrete_fields:
            setattr(obj, model_field.attname, getattr(host, model_field.attname))

    def log_change(self, request: HttpRequest, obj: Host, message):
        if getattr(obj, NOT_SAVED, False):
            return None
        return super().log_change(request, obj, message)

    def response_change(self, request: HttpRequest, obj: Host):
        if getattr(obj, NOT_SAVED, False):
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A host exists because a job of it was queued (services.enqueue): its key is derived, never typed.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Host | None = None) -> bool:
        # Jobs point at their host (PROTECT): pause a host instead.
        return False
