"""Checkpoint reading and writing for NemotronH / TwoTower towers (see keys.py for the key layouts)."""

from .errors import CheckpointError
from .keys import nemotron_h_key_layout, twotower_key_layout
from .loader import load_tower
from .writer import save_nemotron_h, save_twotower

__all__ = [
    "CheckpointError",
    "load_tower",
    "nemotron_h_key_layout",
    "save_nemotron_h",
    "save_twotower",
    "twotower_key_layout",
]
