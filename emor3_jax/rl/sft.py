"""The cold start's step, beside GRPOStep (rl/experience.py): supervised fine-tuning on
reference answers. `SFTStep.update` turns a global batch of records into one optimizer step
and returns the new parameters, optimizer state and metrics. The trainer and tests call it;
neither rebuilds a piece.

Letters: R rows, T tokens per row (padded to the smallest of `buckets` that fits).

The loss is the token mean of the negative log-likelihood of the tokens the loss mask [R, T-1]
marks (the reference answer's; Learner.sft_grads). With `judge_batch_size`, the task's
reflection questions about the step's records, with their answers, form a batch of their own
whose token-mean loss is added: their one- or two-token answers would weigh next to nothing in
the SET rows' token mean.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax.core.batches import SequenceBatch
from emor3_jax.data.encode import sft_batch
from emor3_jax.models import lora
from emor3_jax.rl.learner import Learner, check_finite


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSettings:
    """What one cold-start step does besides its optimizer."""

    buckets: tuple[int, ...]  # row lengths T a batch is padded to (the smallest that fits)
    judge_batch_size: int = 0  # reflection questions per step, in a batch of their own (0: none)

    @classmethod
    def from_config(cls, c) -> SFTSettings:
        """Rows padded to a prompt bucket, or to the longest prompt + response."""
        return cls(
            buckets=tuple(c.sampling.prompt_buckets) + (c.rl.max_prompt_len + c.rl.max_response_len,),
            judge_batch_size=c.cold_start.judge_batch_size,
        )


class SFTStep:
    """The cold-start step of one model graph (in `learner`), encoder, task and settings."""

    def __init__(self, *, learner: Learner, encoder, task, settings: SFTSettings, pad_id: int):
        self.learner, self.encoder, self.task, self.s, self.pad_id = learner, encoder, task, settings, pad_id

    def set_batch(self, records: list[dict]) -> tuple[SequenceBatch, np.ndarray]:
        """The right-padded rows [R, T] of SET prompts + reference answers, one per record, and
        their loss mask [R, T-1]."""
        return self._padded([self.task.sft_example(self.encoder, r) for r in records])

    def judge_batch(self, records: list[dict], step: int) -> tuple[SequenceBatch, np.ndarray]:
        """judge_batch_size reflection questions about `records` with their answers (the task's
        judge_sft_examples, drawn by `step`) [judge_batch_size, T] and their loss mask."""
        return self._padded(self.task.judge_sft_examples(self.encoder, records, step, self.s.judge_batch_size))

    def _padded(self, examples: list) -> tuple[SequenceBatch, np.ndarray]:
        inputs, loss_mask = sft_batch(examples, self.encoder.cfg, self.pad_id, self.s.buckets)
        return SequenceBatch.from_inputs(inputs), loss_mask

    def update(
        self, params, opt, records: list[dict], *, step: int, dropout: lora.Dropout | None = None
    ) -> tuple[object, object, dict]:
        """One optimizer step on `records` (the global batch, the same on every process) and,
        with judge_batch_size, the judge's batch. Returns (params, opt, metrics: the SET rows'
        loss, grad_norm before clipping, tokens the loss is taken on, and judge_loss with a
        judge batch). A non-finite loss or gradient norm raises FloatingPointError naming
        `step` (the caller says what is kept). `dropout`: the step's LoRA dropout (None: none),
        folded with 0 for the SET batch and 1 for the judge's."""
        learner = self.learner
        grads, m = learner.sft_grads(params, *self.set_batch(records), 1.0, lora.fold(dropout, 0))
        if self.s.judge_batch_size:
            judge = self.judge_batch(records, step)
            judge_grads, judge = learner.sft_grads(params, *judge, 1.0, lora.fold(dropout, 1))
            grads = jax.tree.map(jnp.add, grads, judge_grads)
        params, opt, gnorm = learner.apply(params, opt, grads)
        check_finite(step, "cold_start", loss=m["loss"], grad_norm=gnorm)
        metrics = {"loss": float(m["loss"]), "grad_norm": float(gnorm), "tokens": float(m["tokens"])}
        if self.s.judge_batch_size:
            metrics["judge_loss"] = float(judge["loss"])
        return params, opt, metrics
