"""The decoding rule, one home for the engine and the towers' training evaluation: the mask-token
convention, x0 prediction and confidence-threshold unmasking (unmask.py), and next-token sampling with
per-row seeds (sampler.py). Plain torch; imports nothing else of twotower, so `twotower/towers/` may use it."""

from .sampler import RowSampling, mix_seed, sample
from .unmask import MASK_TOKEN_ID, commit_counts, gumbel_noise, select_commits, x0_predict

__all__ = ["MASK_TOKEN_ID", "RowSampling", "commit_counts", "gumbel_noise", "mix_seed", "sample", "select_commits",
           "x0_predict"]  # fmt: skip
