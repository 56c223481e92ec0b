"""Held-out accuracy: the policy answers the test prompts, scored as the spec says (last boxed
answer vs label), greedily and with the spec's sampled setting; optionally the policy also
judges its own answers (the reflective scores).

Every per-response result is a plain python dict, one row per (record, sample), so rows of
several processes can be gathered and concatenated.
"""

from __future__ import annotations

import jax
import numpy as np

from emor3_jax.data.encode import Encoder
from emor3_jax.emo_r3 import rewards
from emor3_jax.rl.rollout import Reflection, reflect, sample_rollouts
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
    n: int = 1,
    reflection: Reflection | None = None,
) -> dict:
    """accuracy, format rate and mean response length over `n` responses to each of
    `records`, the accuracy of each of the n runs, and every response.

    `responses`: R = len(records) * n rows, record b's samples at rows b*n .. b*n+n-1, each
    {id, label, sample, response, prediction (the boxed answer, "None" if none), correct
    and format (bools), length}; with `reflection`, also {text_answer, image_answer (None: not asked),
    coherence, consistency, and score_error if scoring failed}, and their means.

    Batches hold `batch_size` prompts. The last one is padded with repeats of its first
    record (their answers are dropped), so every batch has the same shape and no program is
    compiled twice.
    """
    rows = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        batch_key = jax.random.fold_in(key, i)
        ro = sample_rollouts(
            sampler,
            model,
            encoder,
            padded,
            n=n,
            key=batch_key,
            max_new=max_new,
            params=params,
            stop_ids=stop_ids,
            logit_bias=logit_bias,
            use_set=use_set,
        )
        if reflection is not None:
            reflect(
                sampler,
                model,
                encoder,
                ro,
                reflection,
                key=jax.random.fold_in(batch_key, 1),
                stop_ids=stop_ids,
                logit_bias=logit_bias,
            )
        for r in range(len(chunk) * n):
            rec, resp = chunk[r // n], ro.responses[r]
            row = {
                "id": rec["id"],
                "label": rec["label"],
                "sample": r % n,
                "response": resp,
                "prediction": rewards.extract_boxed(resp),
                "correct": rewards.accuracy_score(resp, rec["label"]) == 1.0,
                "format": rewards.format_score(resp) == 1.0,
                "length": int(ro.lengths[r]),
            }
            if reflection is not None:
                row["text_answer"], row["image_answer"] = ro.text_answers[r], ro.image_answers[r]
                s = rewards.safe_score(resp, rec["label"], row["text_answer"], row["image_answer"], reflection.reward)
                row["coherence"], row["consistency"] = s["coherence"], s["consistency"]
                if "error" in s:
                    row["score_error"] = s["error"]
            rows.append(row)
    out = {
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "run_accuracies": [float(np.mean([r["correct"] for r in rows[j::n]])) for j in range(n)],
        "format_rate": float(np.mean([r["format"] for r in rows])),
        "response_length": float(np.mean([r["length"] for r in rows])),
        "responses": rows,
    }
    if reflection is not None:
        out["coherence"] = float(np.mean([r["coherence"] for r in rows]))
        out["consistency"] = float(np.mean([r["consistency"] for r in rows]))
    return out
