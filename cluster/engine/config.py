"""Engine configuration (one validated dataclass; the serving layer's config embeds it)."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")  # tower dtypes a config may name (None: see loading.resolve_dtype)


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint directory; None = the bundled model
    device: str = "cpu"  # device of both towers in-process ("cuda:0", ...)
    dtype: str | None = None  # float32 | bfloat16 | float16; None = the checkpoint's torch_dtype
    max_num_seqs: int = 32  # requests decoded at once (all lanes together)
    max_prefills_per_step: int = 16  # new requests prefilled per engine step
    max_model_len: int = 4096  # prompt + generated tokens per request
    max_block_size: int = 64  # largest block a request may ask for
    eager: bool = True  # False: every tower step as one compiled graph per bucket (engine/steps.py)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefills_per_step", "max_model_len", "max_block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EngineConfig.{name}: must be a positive integer (got {v!r})")
        if not isinstance(self.eager, bool):
            raise ValueError(f"EngineConfig.eager: must be true or false (got {self.eager!r})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype: must be float32, bfloat16 or float16 (got {self.dtype!r})")

    def pool_limits(self):
        """What each tower's state pool is sized for: max_num_seqs slots of max_model_len tokens."""
        from .runners import PoolLimits

        return PoolLimits(self.max_num_seqs, self.max_model_len, self.max_block_size)
