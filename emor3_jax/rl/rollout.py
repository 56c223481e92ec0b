"""One step's experience: rollouts, both reflections, rewards, and the rows GRPO trains on.

Letters: B prompts, n samples per prompt, R = B * n rows, P prompt bucket, G response bucket.

The reflections are sampled in batches of exactly R prompts (slots whose response gave no
span are filled with a placeholder prompt and their answers ignored), so every step runs the
same compiled programs. Rewards are scored on the host in a thread pool while the device
computes log-probs (`score_async`).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np

from emor3_jax.data.encode import Encoder
from emor3_jax.emo_r3 import rewards
from emor3_jax.models.qwen25_vl.model import prepare_inputs
from emor3_jax.rl.learner import SequenceBatch
from emor3_jax.runtime.multihost import to_host
from emor3_jax.sampling.methods import SamplingParams
from emor3_jax.sampling.sampler import Prompt, Sampler, bucket


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


@dataclasses.dataclass(frozen=True)
class Reflection:
    """How the policy judges its responses (spec section 4): both reflection questions are
    sampled with `params`, up to `max_new` tokens, and scored as `reward` says."""

    reward: rewards.RewardConfig
    max_new: int
    params: SamplingParams

    @classmethod
    def from_config(cls, c) -> Reflection:
        """From the run config's `reward` section (emo_r3_code mode answers up to rl.max_response_len)."""
        rc = c.reward
        return cls(
            rewards.RewardConfig(
                rc.compat, rc.coherence_target, rc.w_accuracy, rc.w_coherence, rc.w_consistency, rc.w_format
            ),
            rc.reflection_max_tokens if rc.compat == "robust" else c.rl.max_response_len,
            SamplingParams(temperature=rc.reflection_temperature, top_p=rc.reflection_top_p),
        )


def decode(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return [tokenizer.decode(row[:length].tolist(), skip_special_tokens=True) for row, length in zip(tokens, lengths)]


def sample_rollouts(
    sampler: Sampler,
    policy,
    encoder: Encoder,
    records: list[dict],
    *,
    n: int,
    key,
    max_new: int,
    params: SamplingParams,
    stop_ids,
    logit_bias,
    use_set: bool = True,
) -> Rollouts:
    prompts = [encoder.rollout_prompt(r, use_set) for r in records]
    out = sampler.generate(
        policy, prompts, key=key, max_new_tokens=max_new, n=n, params=params, stop_ids=stop_ids, logit_bias=logit_bias
    )
    tokens, lengths = to_host(out.tokens), to_host(out.lengths)
    return Rollouts(records, prompts, n, tokens, lengths, out.logprobs, decode(encoder.tok, tokens, lengths))


def reflect(
    sampler: Sampler,
    judge,
    encoder: Encoder,
    ro: Rollouts,
    how: Reflection,
    *,
    key,
    stop_ids,
    logit_bias,
) -> None:
    """Asks `judge` both reflection questions about every response (fills ro.*_answers)."""
    labels, compat = encoder.labels, how.reward.compat
    text_q = [rewards.text_reflection_prompt(r, labels, compat) for r in ro.responses]
    image_q = [rewards.image_reflection_prompt(r, compat) for r in ro.responses]
    placeholder = "Answer 'None'"
    text_prompts = [encoder.prompt(q or placeholder, what="text reflection") for q in text_q]
    image_prompts = []
    for row, q in enumerate(image_q):
        src = ro.prompts[row // ro.n]
        image_prompts.append(
            encoder.prompt(q or "<image>\n" + placeholder, src.pixel_values, src.image_grid_thw, "image reflection")
        )
    k1, k2 = jax.random.split(key)
    answers = []
    for qs, ps, k in ((text_q, text_prompts, k1), (image_q, image_prompts, k2)):
        out = sampler.generate(
            judge, ps, key=k, max_new_tokens=how.max_new, params=how.params, stop_ids=stop_ids, logit_bias=logit_bias
        )
        texts = decode(encoder.tok, to_host(out.tokens), to_host(out.lengths))
        answers.append([t if q is not None else None for t, q in zip(texts, qs)])
    ro.text_answers, ro.image_answers = answers


def score_async(
    pool: ThreadPoolExecutor, ro: Rollouts, cfg: rewards.RewardConfig, reflection: bool, rows: slice = slice(None)
) -> list[Future]:
    """One future per row of `rows` (this process's rows) resolving to its reward components
    (safe: errors score 0)."""
    futures = []
    labels = ro.labels
    for i in range(len(ro.responses))[rows]:
        resp, label = ro.responses[i], labels[i]
        if reflection:
            futures.append(pool.submit(rewards.safe_score, resp, label, ro.text_answers[i], ro.image_answers[i], cfg))
        else:
            futures.append(pool.submit(rewards.safe_score_without_reflection, resp, label, cfg))
    return futures


def training_rows(
    ro: Rollouts, encoder: Encoder, pad_id: int, prompt_buckets, rows: np.ndarray
) -> tuple[SequenceBatch, np.ndarray, int, int]:
    """Rows `rows` as prompt (left-padded to P) + response (G): the model inputs, the response
    mask [len(rows), G], and (P, G). Response token j sits at position P + j."""
    p_len = bucket(max(len(p.ids) for p in ro.prompts), prompt_buckets, "prompt length")
    g_len = ro.tokens.shape[1]
    ids = np.full((len(rows), p_len + g_len), pad_id, np.int64)
    attn = np.zeros((len(rows), p_len + g_len), np.int64)
    resp_mask = (np.arange(g_len)[None, :] < ro.lengths[rows, None]).astype(np.float32)
    srcs = [ro.prompts[row // ro.n] for row in rows]
    for i, (row, src) in enumerate(zip(rows, srcs)):
        ids[i, p_len - len(src.ids) : p_len] = src.ids
        attn[i, p_len - len(src.ids) : p_len] = 1
        ids[i, p_len:] = ro.tokens[row]
        attn[i, p_len:] = resp_mask[i]
    inputs = prepare_inputs(
        encoder.cfg,
        ids,
        attn,
        np.concatenate([p.pixel_values for p in srcs]),
        np.concatenate([p.image_grid_thw for p in srcs]),
    )
    return as_batch(inputs), resp_mask, p_len, g_len


def as_batch(inputs: dict) -> SequenceBatch:
    """`prepare_inputs` arrays -> SequenceBatch."""
    return SequenceBatch(
        inputs["input_ids"], inputs["attention_mask"], inputs["positions"], inputs.get("pixels"), inputs.get("layout")
    )
