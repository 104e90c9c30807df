"""argparse types shared by the subcommands: a bad number is refused by the parser, before any work starts."""
from __future__ import annotations

import argparse
import math


def at_least(lo: float, kind: type = int):
    """An argparse type: a number of `kind` that is >= lo."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < lo:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected >= {lo}")
        return value
    return parse
