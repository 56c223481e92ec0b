"""Rollouts: n sampled responses to each record's prompt, decoded on the host, with the
sampling policy's log-probs kept on the device. Evaluation and GRPO both sample through here.

Letters: B prompts, n samples per prompt, R = B * n rows, G response bucket.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from emor3_jax.core.batches import Prompt
from emor3_jax.core.multihost import to_host
from emor3_jax.sampling.methods import SamplingParams


@dataclasses.dataclass
class Rollouts:
    records: list[dict]  # B
    prompts: list[Prompt]  # B
    n: int
    tokens: np.ndarray  # [R, G]
    lengths: np.ndarray  # [R]
    old_logp: jax.Array  # [R, G] the sampling policy's log-probs (device)
    responses: list[str]  # R, decoded, special tokens skipped
    text_answers: list[str | None] | None = None  # R; None where the judge was not asked
    image_answers: list[str | None] | None = None

    @property
    def labels(self) -> list[str]:
        return [r["label"] for r in self.records for _ in range(self.n)]


def sample_rollouts(
    sampler,
    policy,
    encoder,
    task,
    records: list[dict],
    *,
    n: int,
    key,
    max_new: int,
    params: SamplingParams,
) -> Rollouts:
    """n responses to each record's `task.prompt`, decoded on the host."""
    prompts = [task.prompt(encoder, r) for r in records]
    out = sampler.generate(policy, prompts, key=key, max_new_tokens=max_new, n=n, params=params)
    tokens, lengths = to_host(out.tokens), to_host(out.lengths)
    return Rollouts(records, prompts, n, tokens, lengths, out.logprobs, encoder.decode(tokens, lengths))
