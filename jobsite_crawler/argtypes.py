"""argparse `type=` functions for numbers, shared by every management command.

Each returns a parser that raises argparse.ArgumentTypeError naming the text it
refused, so argparse reports `argument --x: 'text' ...` and exits 2 (under
call_command, a CommandError). Django-free, like the settings helpers in
jobsite/env.py, which do the same for environment variables.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number(
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    invalid: str = "is not a whole number",
    out_of_range: str | None = None,
) -> Callable[[str], int]:
    """An int, within [minimum, maximum] when given; `invalid` and `out_of_range` follow the quoted text."""
    if out_of_range is None:
        if minimum is not None and maximum is not None:
            out_of_range = f"must be between {minimum} and {maximum}"
        else:
            out_of_range = f"must be >= {minimum}" if minimum is not None else f"must be <= {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} {invalid}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text!r} {out_of_range}")
        return value

    return parse


def seconds(*, allow_zero: bool) -> Callable[[str], float]:
    """A finite number of seconds, > 0 (or >= 0 with `allow_zero`)."""
    bound = "must be a number of seconds, 0 or more" if allow_zero else "must be a positive number of seconds"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{text!r} {bound}")
        return value

    return parse
