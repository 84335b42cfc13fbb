"""The installed twotower distribution's version, for /version, --version and the metrics' build info."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version


def version() -> str:
    """pyproject.toml's version as installed; "0+unknown" for a source tree on sys.path, not installed."""
    try:
        return dist_version("twotower")
    except PackageNotFoundError:
        return "0+unknown"
