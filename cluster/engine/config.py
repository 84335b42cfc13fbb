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
    kv_capacity: int = 256  # initial KV positions per lane row (grows on demand)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefills_per_step", "max_model_len", "max_block_size", "kv_capacity"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EngineConfig.{name}: must be a positive integer (got {v!r})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype: must be float32, bfloat16 or float16 (got {self.dtype!r})")
