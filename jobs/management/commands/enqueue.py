"""`manage.py enqueue`: queue jobs from arguments, a file or stdin, all or none.

Every line is checked first and reported; one bad line and nothing is queued.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import TextIO

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from jobs import services
from jobsite_crawler.argtypes import whole_number


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"depth\": 2}'")
    return value


priority = whole_number()


class Command(BaseCommand):
    help = (
        "Queue one job per URL, given as arguments or in a file (one URL per line; blank lines and "
        "lines starting with # are ignored; '-' reads stdin). Every URL is checked first: if any is "
        "rejected, nothing is queued and the exit status is non-zero."
    )
    stealth_options = ("stdin",)  # call_command(..., stdin=StringIO(...)) in tests

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("urls", nargs="*", metavar="URL", help="URLs to crawl.")
        parser.add_argument(
            "--file",
            metavar="PATH",
            help="Read URLs from this file, one per line ('-' for stdin).",
        )
        parser.add_argument("--priority", type=priority, default=0, metavar="N", help="Higher runs first (default 0).")
        parser.add_argument(
            "--payload",
            type=json_object,
            default=None,
            metavar="JSON",
            help="A JSON object given to the crawler with every job.",
        )
        parser.add_argument(
            "--kind",
            default="",
            metavar="K",
            help="Only crawlers that take this kind run the jobs (their ready.kinds); default: any crawler.",
        )

    def handle(
        self, *args, urls: list[str], file: str | None, priority: int, payload: dict | None, kind: str, **options
    ) -> None:
        if urls and file:
            raise CommandError("give URLs as arguments or --file, not both")
        if not urls and not file:
            raise CommandError("give at least one URL, or --file PATH ('-' for stdin)")
        if file:
            numbered = list(self._read_lines(file, options.get("stdin") or sys.stdin))
        else:
            numbered = [(f"argument {n}", url) for n, url in enumerate(urls, start=1)]
        if not numbered:
            raise CommandError(f"no URLs in {file} (only blank lines and comments)")

        accepted: list[tuple[str, str]] = []
        rejected: list[tuple[str, str, str]] = []
        for where, url in numbered:
            try:
                services.validate_job_spec(url=url, payload=payload, priority=priority, kind=kind)
            except ValidationError as exc:
                problems = exc.message_dict
                if "url" not in problems:  # the same for every line: an option is wrong
                    field, messages = next(iter(problems.items()))
                    raise CommandError(f"--{field}: {'; '.join(messages)}") from None
                rejected.append((where, url, "; ".join(problems["url"])))
            else:
                accepted.append((where, url.strip()))

        if rejected:
            if options["verbosity"] >= 2:
                for where, url in accepted:
                    self.stdout.write(f"accepted {where}: {url}")
            for where, _url, reason in rejected:
                self.stdout.write(self.style.ERROR(f"rejected {where}: {reason}"))
            raise CommandError(
                f"{len(rejected)} of {len(numbered)} URLs rejected, {len(accepted)} accepted; nothing was queued"
            )
        try:
            jobs = services.enqueue_many(
                urls=[url for _, url in accepted],
                payload=payload,
                priority=priority,
                kind=kind,
                actor="command",
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        for (where, url), job in zip(accepted, jobs, strict=True):  # one job per accepted URL
            self.stdout.write(f"queued job {job.pk} from {where}: {url}")
        self.stdout.write(self.style.SUCCESS(f"Queued {len(jobs)} job{'s' if len(jobs) != 1 else ''}."))

    def _read_lines(self, path: str, stdin: TextIO) -> Iterator[tuple[str, str]]:
        """Yield ("line N", text) for each line that is not blank or a comment."""
        try:
            if path == "-":
                text = stdin.read()
            else:
                with open(path, encoding="utf-8-sig") as handle:
                    text = handle.read()
        except FileNotFoundError:
            raise CommandError(f"--file {path}: no such file") from None
        except UnicodeDecodeError as exc:
            raise CommandError(f"--file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise CommandError(f"--file {path}: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield f"line {number}", line
