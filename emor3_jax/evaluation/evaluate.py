"""Held-out accuracy: the policy answers the test prompts, scored as the spec says (last boxed
answer vs label), greedily and with the spec's sampled setting; optionally the policy also
judges its own answers (the reflective scores).

One evaluator, `heldout`, runs greedy then sampled evaluation for the trainer and `eval`; its
pieces: `evaluate` (one setting: rollouts -> `response_rows` -> `summarize_rows`), and the
summaries of a greedy and a sampled result, `heldout_metrics` (the trainer's metrics) and
`response_lines` (eval's responses JSONL; results.json's entry is report.summarize).

Every per-response result is a plain python dict, one row per (record, sample), so rows of
several processes can be gathered and concatenated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from emor3_jax.evaluation.report import FAITHFULNESS
from emor3_jax.sampling.methods import GREEDY, SamplingParams
from emor3_jax.sampling.rollout import Rollouts, sample_rollouts

_NOT_JUDGED = ("overall", "accuracy", "format", "error")  # score entries that are not a judge's component


@dataclasses.dataclass
class ResponseRows:
    """Rows of responses, record b's samples at rows b*n .. b*n+n-1 (see `evaluate`).

    faithful: the rows that hold the task's faithfulness flags (records with a truth).
    judged: the reward components beyond accuracy and format the rows hold (the last row's;
    [] when the task does not reflect).
    """

    rows: list[dict] = dataclasses.field(default_factory=list)
    faithful: list[dict] = dataclasses.field(default_factory=list)
    judged: list[str] = dataclasses.field(default_factory=list)

    def extend(self, more: ResponseRows) -> None:
        self.rows += more.rows
        self.faithful += more.faithful
        self.judged = more.judged


def response_rows(task, records: list[dict], ro: Rollouts) -> ResponseRows:
    """The rows of `records`' responses in `ro` (its first len(records) * ro.n rows; rows of
    padding records after them are dropped), scored by `task` (with ro's reflection answers
    when the task reflects)."""
    out, n = ResponseRows(), ro.n
    for r in range(len(records) * n):
        rec, resp = records[r // n], ro.responses[r]
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
            out.faithful.append(row)
        if task.reflects:
            row["text_answer"], row["image_answer"] = answers
            out.judged = [k for k in s if k not in _NOT_JUDGED]
            row.update({k: s[k] for k in out.judged})
            if "error" in s:
                row["score_error"] = s["error"]
        out.rows.append(row)
    return out


def summarize_rows(task, got: ResponseRows, n: int) -> dict:
    """accuracy, the accuracy of each of the n runs (rows j, j+n, ...), format rate, mean
    length and the rows as `responses`; the means of the judged components; where rows hold
    faithfulness flags, `faithfulness` (task.faithfulness_rates of those rows)."""
    rows = got.rows
    out = {
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "run_accuracies": [float(np.mean([r["correct"] for r in rows[j::n]])) for j in range(n)],
        "format_rate": float(np.mean([r["format"] for r in rows])),
        "response_length": float(np.mean([r["length"] for r in rows])),
        "responses": rows,
    }
    out.update({k: float(np.mean([r[k] for r in rows])) for k in got.judged})
    if got.faithful:
        out["faithfulness"] = task.faithfulness_rates([r["label"] for r in got.faithful], got.faithful)
    return out


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
    The sampler's own stop ids and logit bias apply.

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
    compiled twice. Batch i (its first record's index) samples with key fold_in(key, i) and
    reflects with fold_in(that, 1).
    """
    got = ResponseRows()
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        batch_key = jax.random.fold_in(key, i)
        ro = sample_rollouts(sampler, model, encoder, task, padded, n=n, key=batch_key, max_new=max_new, params=params)
        if task.reflects:
            task.reflect(sampler, model, encoder, ro, key=jax.random.fold_in(batch_key, 1))
        got.extend(response_rows(task, chunk, ro))
    return summarize_rows(task, got, n)


@dataclasses.dataclass(frozen=True)
class HeldOutSettings:
    """How `heldout` evaluates: up to max_new tokens per response; greedy in batches of
    batch_size prompts (the policy judging its answers when judge_greedy), then `samples`
    sampled runs at `sampled` in batches of max(1, batch_size // samples) prompts (about
    batch_size rows)."""

    max_new: int
    batch_size: int
    sampled: SamplingParams
    samples: int = 1
    judge_greedy: bool = False

    @classmethod
    def from_config(cls, c, samples: int = 1, judge_greedy: bool = False) -> HeldOutSettings:
        """rl.max_response_len, eval.batch_size and eval.sampled_temperature / sampled_top_p."""
        sampled = SamplingParams(temperature=c.eval.sampled_temperature, top_p=c.eval.sampled_top_p)
        return cls(c.rl.max_response_len, c.eval.batch_size, sampled, samples, judge_greedy)


def heldout(
    sampler,
    model,
    encoder,
    task,
    records: list[dict],
    settings: HeldOutSettings,
    keys: tuple,
    progress: Callable[[str, dict], None] | None = None,
) -> tuple[dict, dict]:
    """(greedy, sampled) `evaluate` results of `model` on `records`: greedy with keys[0]
    (reflecting when settings.judge_greedy), then settings.samples runs without reflection
    with keys[1]. `progress(setting, result)` is called after each ("greedy", "sampled")."""
    s = settings
    greedy = evaluate(
        sampler,
        model,
        encoder,
        dataclasses.replace(task, reflects=s.judge_greedy),
        records,
        batch_size=s.batch_size,
        key=keys[0],
        max_new=s.max_new,
        params=GREEDY,
    )
    if progress:
        progress("greedy", greedy)
    sampled = evaluate(
        sampler,
        model,
        encoder,
        dataclasses.replace(task, reflects=False),
        records,
        batch_size=max(1, s.batch_size // s.samples),
        key=keys[1],
        max_new=s.max_new,
        params=s.sampled,
        n=s.samples,
    )
    if progress:
        progress("sampled", sampled)
    return greedy, sampled


def heldout_metrics(greedy: dict, sampled: dict) -> dict:
    """The trainer's held-out metrics: {greedy,sampled}_{accuracy,format,length}, and where
    the records carry a truth the overall faithfulness rates as {greedy,sampled}_<rate>."""
    out = {}
    for name, res in (("greedy", greedy), ("sampled", sampled)):
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


def response_lines(greedy: dict, sampled: dict, k: int) -> list[dict]:
    """eval's responses JSONL: one line per record, its greedy row and its k sampled responses
    (with their faithfulness flags where the record has a truth)."""
    keep = ("response", "prediction", "correct", "format", "length")
    lines = []
    for b, row in enumerate(greedy["responses"]):
        runs = sampled["responses"][b * k : (b + 1) * k]
        kept = [{key: r[key] for key in (*keep, *(f for f in FAITHFULNESS if f in r))} for r in runs]
        lines.append({**row, "sampled": kept})
    return lines
