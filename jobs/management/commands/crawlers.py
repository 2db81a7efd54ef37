"""`manage.py crawlers`: list, add, drain, resume and remove the crawlers of the fleet, through jobs.fleet.

A registry error (an unparseable endpoint, a TCP endpoint without BUS_TOKEN,
an endpoint that is not registered) stops the command with its message and a
non-zero exit status; nothing changed then.
"""

from __future__ import annotations

import argparse
import json

from django.core.management.base import BaseCommand, CommandError

from jobs import fleet, selectors, services
from jobs.actions import run_crawler_action
from jobs.admin import format_duration

COLUMNS = ("endpoint", "label", "state", "source", "owner", "session", "last seen")


class Command(BaseCommand):
    help = (
        "The crawler registry: list the crawlers, add one, drain it (no new jobs; paused once its "
        "running jobs finish), resume it, or remove it (after draining, or at once with --now, "
        "requeueing its running jobs)."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        commands = parser.add_subparsers(dest="subcommand", required=True)
        listing = commands.add_parser("list", help="Every registered crawler, its state and owning bus node.")
        listing.add_argument("--json", action="store_true", help="One JSON array instead of a table.")
        add = commands.add_parser("add", help="Register an endpoint (unix:/path.sock or tcp://host:port).")
        add.add_argument("endpoint", metavar="ENDPOINT")
        add.add_argument("--label", default="", help="A name for people; adding a known endpoint sets it.")
        remove = commands.add_parser("remove", help="Remove a crawler once its running jobs finish.")
        remove.add_argument("endpoint", metavar="ENDPOINT")
        remove.add_argument("--now", action="store_true", help="Requeue its running jobs and remove it at once.")
        for name, text in (
            ("drain", "Give it no new jobs; paused once its running jobs finish."),
            ("resume", "Active again."),
        ):
            commands.add_parser(name, help=text).add_argument("endpoint", metavar="ENDPOINT")

    def handle(self, *args, subcommand: str, **options) -> None:
        try:
            if subcommand == "list":
                self._list(as_json=options["json"])
            elif subcommand == "add":
                self._add(options["endpoint"], options["label"])
            else:
                action = "remove_now" if subcommand == "remove" and options["now"] else subcommand
                line = run_crawler_action(action=action, endpoint=options["endpoint"], actor="command")
                self.stdout.write(self.style.SUCCESS(line))
        except fleet.RegistryError as exc:
            raise CommandError(str(exc)) from None

    def _add(self, endpoint: str, label: str) -> None:
        crawler, created = fleet.add_crawler(endpoint=endpoint, label=label)
        if created:
            self.stdout.write(self.style.SUCCESS(f"{crawler.endpoint}: registered"))
        else:
            labelled = f"; label {crawler.label!r}" if label else ""
            self.stdout.write(f"{crawler.endpoint}: already registered ({crawler.state}){labelled}; nothing added")

    def _list(self, *, as_json: bool) -> None:
        at = services.now()
        rows = selectors.fleet_status(at=at).crawlers
        if as_json:
            self.stdout.write(json.dumps([row.as_json() for row in rows], indent=2))
            return
        if not rows:
            self.stdout.write("No crawler is registered.")
            return
        table = [COLUMNS] + [
            (
                row.endpoint,
                row.label or "-",
                row.state + (" (removed when drained)" if row.remove_when_drained else ""),
                row.source,
                row.owner or "-",
                str(row.session) if row.session else "-",
                f"{format_duration(at - row.last_seen_at)} ago" if row.last_seen_at else "never",
            )
            for row in rows
        ]
        widths = [max(len(line[column]) for line in table) for column in range(len(COLUMNS))]
        for line in table:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
