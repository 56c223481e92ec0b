"""Held-out accuracy: the policy answers the test prompts, scored as the spec says (last boxed
answer vs label), greedily and with the spec's sampled setting; optionally the policy also
judges its own answers (the reflective scores).

Every per-response result is a plain python dict, one row per (record, sample), so rows of
several processes can be gathered and concatenated.
"""

from __future__ import annotations

import jax
import numpy as np

from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.rollout import sample_rollouts


def evaluate(
    sampler,
    model,
    encoder,
    task,
    records: list[dict],
    *,
    batch_size: int,
    key,
    max_new: int,
    params: SamplingParams = GREEDY,
    n: int = 1,
) -> dict:
    """accuracy, format rate and mean response length over `n` responses to each of
    `records`, the accuracy of each of the n runs, and every response. `task`
    (emo_r3/task.py) asks and scores; when `task.reflects`, `model` also judges its answers.

    `responses`: R = len(records) * n rows, record b's samples at rows b*n .. b*n+n-1, each
    {id, label, sample, response, prediction (the task's parsed answer, "None" if none),
    correct and format (bools), length}; when the task reflects, also {text_answer,
    image_answer (None: not asked), the other reward components (coherence, consistency), and
    score_error if scoring failed}, and those components' means. Rows of records that carry a
    truth also hold the task's faithfulness flags (image_faithful, answer_coherent), and
    `faithfulness` holds their rates, overall and per class (task.faithfulness_rates); without
    any truth both are absent.

    Batches hold `batch_size` prompts. The last one is padded with repeats of its first
    record (their answers are dropped), so every batch has the same shape and no program is
    compiled twice.
    """
    rows, faithful = [], []  # faithful: the rows with faithfulness flags (records with a truth)
    judged = []  # the reward components beyond accuracy and format, when reflecting
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        batch_key = jax.random.fold_in(key, i)
        ro = sample_rollouts(
            sampler,
            model,
            encoder,
            task,
            padded,
            n=n,
            key=batch_key,
            max_new=max_new,
            params=params,
        )
        if task.reflects:
            task.reflect(
                sampler,
                model,
                encoder,
                ro,
                key=jax.random.fold_in(batch_key, 1),
            )
        for r in range(len(chunk) * n):
            rec, resp = chunk[r // n], ro.responses[r]
            answers = (ro.text_answers[r], ro.image_answers[r]) if task.reflects else (None, None)
            s = task.score(resp, rec["label"], *answers)
            row = {
                "id": rec["id"],
                "label": rec["label"],
                "sample": r % n,
                "response": resp,
                "prediction": task.answer(resp),
                "correct": s["accuracy"] == 1.0,
                "format": s["format"] == 1.0,
                "length": int(ro.lengths[r]),
            }
            flags = task.faithfulness(resp, rec)
            if flags is not None:
                row.update(flags)
                faithful.append(row)
            if task.reflects:
                row["text_answer"], row["image_answer"] = answers
                judged = [k for k in s if k not in ("overall", "accuracy", "format", "error")]
                row.update({k: s[k] for k in judged})
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
    out.update({k: float(np.mean([r[k] for r in rows])) for k in judged})
    if faithful:
        out["faithfulness"] = task.faithfulness_rates([r["label"] for r in faithful], faithful)
    return out


def heldout(rt, model, encoder, task, records: list[dict], c, key) -> dict:
    """The trainer's validation: greedy and sampled (eval.sampled_temperature / top_p)
    accuracy, format rate and mean length over `records` (rt: factory.Runtime), and
    where the records carry a truth the image-faithful and answer-coherent rates."""
    out = {}
    sampled = SamplingParams(temperature=c.eval.sampled_temperature, top_p=c.eval.sampled_top_p)
    for name, params in (("greedy", GREEDY), ("sampled", sampled)):
        res = evaluate(
            rt.sampler,
            model,
            encoder,
            task,
            records,
            batch_size=c.eval.batch_size,
            key=key,
            max_new=c.rl.max_response_len,
            params=params,
        )
        out.update(
            {
                f"{name}_accuracy": res["accuracy"],
                f"{name}_format": res["format_rate"],
                f"{name}_length": res["response_length"],
            }
        )
        if "faithfulness" in res:
            rates = res["faithfulness"]
            out.update({f"{name}_{k}": v for k, v in rates.items() if k not in ("count", "per_class")})
    return out
