"""Engine configuration (one validated dataclass; the serving layer's config embeds it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .cache_limits import PREFILL_CHUNK, PrefixCacheConfig

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
    # False: every tower step as one compiled graph per bucket (engine/steps.py), captured as a CUDA graph
    # on CUDA. Serving compiles by default; `twotower generate` and tests pass eager=True.
    eager: bool = False
    warmup: bool = True  # compiled: build the start-up step set before serving (else each on first use)
    # block sizes whose extend / verify / denoise steps are in the start-up set (every batch bucket, the
    # smallest attention window); others compile the first time a request uses them
    warmup_block_sizes: list[int] = field(default_factory=lambda: [16])
    # prompts that share cached grid blocks with an earlier sequence are seated from the cache and
    # prefill only the rest (output unchanged); entries hold KV + Mamba states, see prefix_cache.py
    prefix_cache: bool = True
    prefix_cache_grid: int = 256  # tokens per grid block, a multiple of 64 (the prefill chunk)
    prefix_cache_bytes: int = 1 << 30  # the cache's memory budget on the context tower's device

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_prefills_per_step", "max_model_len", "max_block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EngineConfig.{name}: must be a positive integer (got {v!r})")
        for name in ("eager", "warmup", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name}: must be true or false (got {getattr(self, name)!r})")
        sizes = self.warmup_block_sizes
        if not isinstance(sizes, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= self.max_block_size for v in sizes
        ):
            raise ValueError(f"EngineConfig.warmup_block_sizes: must be a list of block sizes in [1, max_block_size="
                             f"{self.max_block_size}] (got {sizes!r})")  # fmt: skip
        self.warmup_block_sizes = list(sizes)
        g = self.prefix_cache_grid
        if type(g) is not int or g < PREFILL_CHUNK or g % PREFILL_CHUNK:
            raise ValueError(f"EngineConfig.prefix_cache_grid: must be a positive multiple of {PREFILL_CHUNK} "
                             f"tokens (got {g!r})")  # fmt: skip
        b = self.prefix_cache_bytes
        if type(b) is not int or b < 0:
            raise ValueError(f"EngineConfig.prefix_cache_bytes: must be a non-negative integer (got {b!r})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype: must be float32, bfloat16 or float16 (got {self.dtype!r})")

    def pool_limits(self):
        """What each tower's state memory is sized for: max_num_seqs slots of max_model_len tokens, and
        the context tower's prefix cache (None: off)."""
        from .slots import PoolLimits

        cache = PrefixCacheConfig(self.prefix_cache_grid, self.prefix_cache_bytes) if self.prefix_cache else None
        return PoolLimits(self.max_num_seqs, self.max_model_len, self.max_block_size, prefix_cache=cache)
