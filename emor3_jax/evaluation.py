"""Held-out accuracy: the policy answers the test prompts (no reflection), scored as the spec
says (last boxed answer vs label), greedily and with the spec's sampled setting."""

from __future__ import annotations

import jax
import numpy as np

from emor3_jax.data.encode import Encoder
from emor3_jax.rl import rewards
from emor3_jax.rl.rollout import sample_rollouts
from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.sampler import Sampler


def evaluate(
    sampler: Sampler,
    model,
    encoder: Encoder,
    records: list[dict],
    *,
    batch_size: int,
    key,
    max_new: int,
    params: SamplingParams = GREEDY,
    stop_ids=(),
    logit_bias=None,
    use_set: bool = True,
) -> dict:
    """accuracy, format rate and mean response length over `records`, plus every response.

    The last batch is padded with repeats of its first record (their answers are dropped),
    so every batch has the same shape and no program is compiled twice.
    """
    acc, fmt, lengths, responses = [], [], [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        ro = sample_rollouts(
            sampler,
            model,
            encoder,
            padded,
            n=1,
            key=jax.random.fold_in(key, i),
            max_new=max_new,
            params=params,
            stop_ids=stop_ids,
            logit_bias=logit_bias,
            use_set=use_set,
        )
        for resp, length, rec in zip(ro.responses[: len(chunk)], ro.lengths[: len(chunk)], chunk):
            acc.append(rewards.accuracy_score(resp, rec["label"]))
            fmt.append(rewards.format_score(resp))
            lengths.append(int(length))
            responses.append({"id": rec["id"], "label": rec["label"], "response": resp})
    return {
        "accuracy": float(np.mean(acc)),
        "format_rate": float(np.mean(fmt)),
        "response_length": float(np.mean(lengths)),
        "responses": responses,
    }
