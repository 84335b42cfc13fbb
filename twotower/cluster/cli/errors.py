"""The CLI's one way to stop on a user's mistake: one line on stderr, a non-zero status, no traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


def fail(message: str, status: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
