#!/usr/bin/env python3
"""Django's command-line utility for jobsite."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # A bad environment variable: say which, without a traceback.
        sys.stderr.write(f"jobsite: configuration error: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
