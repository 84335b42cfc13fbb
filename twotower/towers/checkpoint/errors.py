"""The one error type of checkpoint reading and writing."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory cannot be used: its message names the file or tensor at fault."""
