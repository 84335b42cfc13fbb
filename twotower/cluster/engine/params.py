"""Per-request sampling parameters, validated against the model's limits."""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("diffusion", "mock_ar", "ar", "lossless")
MAX_TOP_LOGPROBS = 20  # most likely alternatives a caller may ask for at each position (OpenAI `logprobs`)


@dataclass(frozen=True)
class ModelLimits:
    """What a request may ask of the served model."""

    vocab_size: int
    max_model_len: int  # prompt + generated tokens
    max_block_size: int = 64  # sampling far past the trained block size collapses quality
    modes: tuple[str, ...] = MODES  # an AR-only checkpoint serves only "ar"


@dataclass
class SamplingParams:
    mode: str = "diffusion"  # diffusion | mock_ar | ar | lossless
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off (AR modes only; unused by diffusion, as in the reference)
    top_p: float = 1.0
    seed: int | None = None  # None: the engine draws one (reported back for reproduction)
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the text
    ignore_eos: bool = False
    block_size: int = 16  # S: tokens denoised in parallel (diffusion, lossless drafts)
    steps_per_block: int = 16  # T: at most T denoiser forwards per block
    gamma: float = 0.8  # commit masked positions with confidence strictly above gamma
    logprobs: bool = False  # report the log-probability of each generated token

    def validate(self, limits: ModelLimits, prompt_len: int | None = None) -> SamplingParams:
        """Raise ValueError naming the first bad field; returns self."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name}: {why} (got {getattr(self, name)!r})")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.mode not in MODES:
            bad("mode", f"must be one of {', '.join(MODES)}")
        if self.mode not in limits.modes:
            bad("mode", f"this model serves only {', '.join(limits.modes)}")
        if not is_int(self.max_tokens) or self.max_tokens <= 0:
            bad("max_tokens", "must be a positive integer")
        if self.max_tokens >= limits.max_model_len:
            bad("max_tokens", f"must be below the context limit {limits.max_model_len}")
        if prompt_len is not None:
            if prompt_len < 1:
                raise ValueError("prompt: must contain at least one token")
            if prompt_len + self.max_tokens > limits.max_model_len:
                bad("max_tokens", f"prompt ({prompt_len} tokens) + max_tokens exceeds the context limit "
                                  f"{limits.max_model_len}")  # fmt: skip
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be a non-negative integer (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "must be an integer in [0, 2^63)")
        if any(not is_int(t) or not 0 <= t < limits.vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be token ids in [0, {limits.vocab_size})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if not is_int(self.block_size) or not 1 <= self.block_size <= limits.max_block_size:
            bad("block_size", f"must be in [1, {limits.max_block_size}]")
        if not is_int(self.steps_per_block) or self.steps_per_block < 1:
            bad("steps_per_block", "must be a positive integer")
        if not isinstance(self.gamma, (int, float)) or not 0.0 < self.gamma <= 1.0:
            bad("gamma", "must be in (0, 1]")
        if self.mode == "lossless" and self.temperature != 0.0:
            bad("temperature", "lossless mode verifies against greedy AR and needs temperature 0")
        if self.mode == "lossless" and self.block_size < 2:
            bad("block_size", "lossless mode needs blocks of at least 2 (slot 0 holds the known token)")
        return self
