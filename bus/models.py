"""Bus sessions: one row per connection to a crawler.

Written by the bus, read by pages served from any process, so that connection
health is visible wherever the page is served.
"""

from __future__ import annotations

from django.db import models


class SessionState(models.TextChoices):
    CONNECTED = "connected", "Connected"
    CLOSED = "closed", "Closed"
    LOST = "lost", "Lost"


class BusSessionQuerySet(models.QuerySet):
    def open(self):
        return self.filter(state=SessionState.CONNECTED)


class BusSession(models.Model):
    session = models.UUIDField(primary_key=True)
    node = models.CharField(max_length=200, help_text="The bus node id (host:pid unless BUS_NODE is set).")
    endpoint = models.CharField(max_length=500)
    crawler = models.CharField(max_length=200, blank=True, default="")
    state = models.CharField(max_length=16, choices=SessionState.choices, default=SessionState.CONNECTED)
    slots = models.PositiveIntegerField(default=0)
    connected_at = models.DateTimeField()
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    close_reason = models.TextField(blank=True, default="")

    objects = BusSessionQuerySet.as_manager()

    class Meta:
        ordering = ["-connected_at"]
        indexes = [
            models.Index(fields=["state", "-connected_at"], name="bussession_state"),
            models.Index(fields=["node", "state"], name="bussession_node"),
        ]

    def __str__(self) -> str:
        return f"{self.crawler or 'crawler'} @ {self.endpoint} ({self.state})"
