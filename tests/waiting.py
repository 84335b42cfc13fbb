"""Polling for a condition in tests that drive a live server."""

from __future__ import annotations

import time


def wait_for(cond, timeout: float, what: str, every: float = 0.5):
    """cond()'s first truthy value within `timeout` seconds, else an AssertionError naming `what`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
