"""Log-probs of token sequences under the model, and the optimizer steps (SFT and GRPO).

Letters: R rows, T tokens per row, D width, V vocab, C chunk of positions.

A row is a prompt followed by its response. `SequenceBatch` carries what the model needs;
`response_logprobs` runs it and scores the tokens at positions start+1 .. start+length from
the hidden states before them, computing the vocabulary projection chunk by chunk (under
`jax.checkpoint`, so the backward pass never holds [R, T, V] logits either).
`packed_logprobs` does the same for rows packed into fixed-length sequences (`PackedBatch`,
rl/packing.py) and returns the same [R, G] layout, so the loss never sees the packing.

Gradients are accumulated over micro-batches with weights that make the sum equal the
loss over the whole mini-batch (token-mean: each micro-batch's tokens over all tokens).

LoRA dropout (lora.dropout > 0) runs in the gradient passes alone: each grad function takes a
`lora.Dropout` (its key traced, so one program serves every step; None: the program without
dropout). Rollouts, old and reference log-probs, evaluation and export see no dropout, as with
PEFT's model.train() for the loss's forward pass and model.eval() everywhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from emor3_jax.core import sharding
from emor3_jax.core.batches import PackedBatch, SequenceBatch
from emor3_jax.core.multihost import to_host
from emor3_jax.models import lora
from emor3_jax.rl import grpo


def response_logprobs(
    model, batch: SequenceBatch, start: int, length: int, chunk: int = 256, dropout: lora.Dropout | None = None
):
    """Log-probs and entropies [R, length] of tokens start+1 .. start+length (static ints).
    `dropout`: the LoRA dropout of a gradient pass (None: none)."""
    body, head = lora.fold(dropout, 0), lora.fold(dropout, 1)
    x = model.embed(batch.input_ids, batch.pixels, batch.layout, body)
    h = model.hidden_states(x, batch.positions, batch.attention_mask, dropout=body)
    h = h[:, start : start + length]  # [R, length, D]
    return _token_scores(model, h, batch.input_ids[:, start + 1 : start + 1 + length], chunk, head)


def packed_logprobs(model, packed: PackedBatch, chunk: int = 256, dropout: lora.Dropout | None = None):
    """Log-probs and entropies [R, G] of the packed rows' response tokens, unpacked: only the
    hidden states at `packed.scored` [P, N] reach the vocabulary projection (never a prompt
    position or a row's padding to G), and `packed.index` puts each score in its row.
    `dropout`: the LoRA dropout of a gradient pass (None: none)."""
    b = packed.batch
    body, head = lora.fold(dropout, 0), lora.fold(dropout, 1)
    x = model.embed(b.input_ids, b.pixels, b.layout, body)
    h = model.hidden_states(x, b.positions, b.attention_mask, b.segment_ids, body)  # [P, L, D]
    h = jnp.take_along_axis(h, packed.scored[..., None], axis=1)  # [P, N, D], within each pack
    targets = jnp.take_along_axis(b.input_ids, packed.scored + 1, axis=1)  # [P, N]: the tokens they predict
    logp, ent = _token_scores(model, h, targets, chunk, head)
    return logp.reshape(-1)[packed.index], ent.reshape(-1)[packed.index]


def _token_scores(model, h, targets, chunk: int, dropout: lora.Dropout | None = None):
    """Log-probs of targets [R, T] and entropies, both [R, T], from hidden states h [R, T, D],
    the logits formed C positions at a time (rematerialised in the backward pass), each chunk
    with its own LoRA dropout of an adapted lm_head."""
    length = h.shape[1]
    chunk = min(chunk, length)  # a short response is one chunk, not padded to C
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hc = jnp.moveaxis(h.reshape(h.shape[0], n_chunks, chunk, -1), 1, 0)  # [chunks, R, C, D]
    tc = jnp.moveaxis(targets.reshape(targets.shape[0], n_chunks, chunk), 1, 0)

    @jax.checkpoint
    def one(args):
        hx, tx, d = args
        logits = model.logits(hx, d)  # [R, C, V] fp32
        return grpo.token_logprobs(logits, tx), grpo.entropy(logits)

    logp, ent = jax.lax.map(one, (hc, tc, lora.split(dropout, n_chunks)))  # no dropout: (hc, tc, None)
    unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1)[:, :length]
    return unchunk(logp), unchunk(ent)


def _warmup_constant(lr: float, warmup: int, total_steps: int, updates_per_step: int):
    w = max(warmup, 1)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), optax.constant_schedule(lr)], [w])


def _stepwise_warmup_constant(lr: float, warmup: int, total_steps: int, updates_per_step: int):
    """lr * min(1, s / max(1, warmup)) for every update of step s + 1 (s = 0, 1, ...): the official
    run's `get_constant_schedule_with_warmup` (EasyR1 verl/utils/torch_functional.py:190-200: a
    LambdaLR, whose first rate is lr_lambda(0)), stepped once per actor update call, i.e. per
    GRPO step (verl/workers/fsdp_workers.py:521). With warmup 0 (lr_warmup_ratio 0.0,
    examples/config.yaml:53) lr_lambda(0) = min(1, 0 / max(1, 0)) = 0: every optimizer update of
    the first GRPO step has rate 0 (AdamW's moments still take its gradients), then lr."""
    w = max(warmup, 1)
    return lambda count: lr * jnp.minimum(1.0, (count // updates_per_step) / w)


# The registry the config validation reads (rl.schedule): (lr, warmup, total steps, optimizer
# updates per GRPO step) -> schedule of the optimizer update count.
SCHEDULES = {
    "constant": lambda lr, warmup, total_steps, updates_per_step: optax.constant_schedule(lr),
    "warmup_constant": _warmup_constant,
    "stepwise_warmup_constant": _stepwise_warmup_constant,
    "cosine": lambda lr, warmup, total_steps, updates_per_step: optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 1), max(total_steps, warmup + 1)
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """AdamW after global-norm clipping, with a learning-rate schedule from SCHEDULES."""

    schedule: str
    learning_rate: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    b1: float
    b2: float
    grad_clip: float
    updates_per_step: int = 1  # optimizer updates per GRPO step (rl.rollout_batch / rl.update_batch)

    @classmethod
    def constant(cls, learning_rate: float, *, weight_decay: float = 0.0) -> OptimizerSettings:
        """A constant learning rate with the configs' AdamW moments (0.9, 0.999) and clipping
        at 1.0: the benches' and tests' optimizer."""
        return cls(
            schedule="constant",
            learning_rate=learning_rate,
            warmup_steps=0,
            total_steps=1,
            weight_decay=weight_decay,
            b1=0.9,
            b2=0.999,
            grad_clip=1.0,
        )

    @classmethod
    def from_config(cls, c, phase: str, total_steps: int) -> OptimizerSettings:
        """Phase "grpo" reads rl.*; "cold_start" reads its learning rate and warmup from
        cold_start.* (constant after warmup) and the AdamW moments and clipping from rl.*. A
        LoRA run (lora.rank > 0) multiplies either learning rate by lora.lr_multiplier."""
        rl = c.rl
        if phase == "cold_start":
            cs = c.cold_start
            schedule = "warmup_constant" if cs.warmup_steps else "constant"
            lr, warmup, updates = cs.learning_rate, cs.warmup_steps, 1
        elif phase == "grpo":
            schedule, lr, warmup = rl.schedule, rl.learning_rate, rl.warmup_steps
            updates = rl.rollout_batch // rl.update_batch
        else:
            raise ValueError(f"unknown phase {phase!r}; expected cold_start or grpo")
        return cls(
            schedule=schedule,
            learning_rate=lr * (c.lora.lr_multiplier if c.lora.rank else 1.0),
            warmup_steps=warmup,
            total_steps=total_steps,
            weight_decay=rl.weight_decay,
            b1=rl.b1,
            b2=rl.b2,
            grad_clip=rl.grad_clip,
            updates_per_step=updates,
        )


def make_optimizer(s: OptimizerSettings) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """AdamW after global-norm clipping; also the learning-rate schedule (for logging)."""
    if s.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {s.schedule!r}, expected one of {tuple(SCHEDULES)}")
    lr_fn = SCHEDULES[s.schedule](s.learning_rate, s.warmup_steps, s.total_steps, s.updates_per_step)
    tx = optax.chain(
        optax.clip_by_global_norm(s.grad_clip), optax.adamw(lr_fn, b1=s.b1, b2=s.b2, weight_decay=s.weight_decay)
    )
    return tx, lr_fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOSettings:
    """The clipped, KL-regularised loss (rl/grpo.py): kl_kind from grpo.KL_KINDS, loss_mode
    from grpo.MODES; `groups` > 1: a micro-batch's rows in that many equal blocks (its
    data-parallel shards), each taking its own mean (grpo.aggregate)."""

    clip_low: float
    clip_high: float
    dual_clip: float
    kl_coef: float
    kl_kind: str
    loss_mode: str
    groups: int = 1

    @classmethod
    def from_config(cls, c) -> GRPOSettings:
        rl = c.rl
        return cls(
            clip_low=rl.clip_low,
            clip_high=rl.clip_high,
            dual_clip=rl.dual_clip,
            kl_coef=rl.kl_coef,
            kl_kind=rl.kl_kind,
            loss_mode=rl.loss_mode,
        )


def _trainable_grads(loss_fn, trainable):
    """loss_fn(params, ...) -> (loss, aux) as (params, ...) -> (grads, aux): the gradient of the
    `trainable` parameters only (the rest held fixed, none computed for them), each constrained
    to its parameter's logical axes under the rules in use: left to itself, XLA returns the
    gradient of an fsdp-sharded parameter whole on every chip (issue 21: 3B's fp32 gradients,
    14 GiB, on each chip of a v5p slice; tests/test_compile_for.py checks the share per chip)."""

    def run(params, *args):
        train, frozen = nnx.split_state(params, trainable, ...)
        grads, aux = jax.grad(lambda t: loss_fn(nnx.merge_state(t, frozen), *args), has_aux=True)(train)
        like = lambda v: v.replace(sharding.constrain(v.get_value(), v.get_metadata()["axes"]))
        return jax.tree.map(like, grads, is_leaf=lambda x: isinstance(x, nnx.Variable)), aux

    return run


class Learner:
    """Owns the jitted gradient / update functions for one model graph and optimizer.

    `trainable` (an nnx filter; models/lora.py `trainable`) picks the parameters the optimizer
    updates: every nnx.Param (full fine-tuning) or the LoRA adapters. Gradients, their sum over
    micro-batches and the optimizer state cover those alone; the others pass through each step
    as the same arrays."""

    def __init__(self, graphdef, tx: optax.GradientTransformation, chunk: int = 256, trainable=nnx.Param):
        self.graphdef, self.tx, self.chunk, self.trainable = graphdef, tx, chunk, trainable
        self._grad = {}
        self._logprobs = jax.jit(self._logprobs_impl, static_argnums=(2, 3))
        self._packed_logprobs = jax.jit(self._packed_logprobs_impl)
        self._apply = jax.jit(self._apply_impl, donate_argnums=(0, 1))
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,))

    def model(self, params):
        """The model with `params` (a view: no copy)."""
        return nnx.merge(self.graphdef, params)

    # ---- log-probs without gradients (old / reference policy) ----
    def _logprobs_impl(self, params, batch, start, length):
        model = nnx.merge(self.graphdef, params)
        return response_logprobs(model, batch, start, length, self.chunk)[0]

    def logprobs(self, params, batch: SequenceBatch, start: int, length: int) -> jax.Array:
        return self._logprobs(params, batch, start, length)

    def _packed_logprobs_impl(self, params, packed):
        return packed_logprobs(nnx.merge(self.graphdef, params), packed, self.chunk)[0]

    def packed_logprobs(self, params, packed: PackedBatch) -> jax.Array:
        """Log-probs [R, G] of packed rows (one program per pack count)."""
        return self._packed_logprobs(params, packed)

    # ---- gradients ----
    # Each takes `dropout`, the LoRA dropout of its forward pass (lora.dropout > 0: a
    # lora.Dropout keyed by the run's seed, step and micro-batch; None: none, today's program).
    def sft_grads(self, params, batch: SequenceBatch, loss_mask, weight, dropout: lora.Dropout | None = None):
        """Gradient of weight * (masked mean NLL of the tokens loss_mask [R, T-1] marks)."""
        return self.sft_grad_fn()(params, batch, loss_mask, weight, dropout)

    def sft_grad_fn(self):
        """The jitted function `sft_grads` calls (compile_for lowers it)."""
        fn = self._grad.get("sft")
        if fn is None:

            def loss_fn(p, batch, loss_mask, weight, dropout):
                model = nnx.merge(self.graphdef, p)
                length = batch.input_ids.shape[1] - 1
                logp, _ = response_logprobs(model, batch, 0, length, self.chunk, dropout)
                nll = -(logp * loss_mask).sum() / jnp.maximum(loss_mask.sum(), 1)
                return weight * nll, {"loss": nll, "tokens": loss_mask.sum()}

            fn = self._grad["sft"] = jax.jit(_trainable_grads(loss_fn, self.trainable))
        return fn

    def grpo_grads(
        self,
        params,
        batch: SequenceBatch,
        start: int,
        length: int,
        old_logp,
        ref_logp,
        advantages,
        mask,
        weight,
        settings: GRPOSettings,
        dropout: lora.Dropout | None = None,
    ):
        """Gradient of weight * GRPO loss on one micro-batch; metrics alongside."""
        fn = self.grpo_grad_fn(start, length, settings)
        return fn(params, batch, old_logp, ref_logp, advantages, mask, weight, dropout)

    def grpo_grad_fn(self, start: int, length: int, settings: GRPOSettings):
        """The jitted function `grpo_grads` calls (compile_for lowers it)."""
        score = lambda model, b, d: response_logprobs(model, b, start, length, self.chunk, d)
        return self._grpo_grad_fn(("grpo", start, length, settings), score, settings)

    def packed_grpo_grads(
        self,
        params,
        packed: PackedBatch,
        old_logp,
        ref_logp,
        advantages,
        mask,
        weight,
        settings: GRPOSettings,
        dropout: lora.Dropout | None = None,
    ):
        """`grpo_grads` of a micro-batch of packed rows (the same loss on the same [R, G] layout)."""
        fn = self.packed_grpo_grad_fn(settings)
        return fn(params, packed, old_logp, ref_logp, advantages, mask, weight, dropout)

    def packed_grpo_grad_fn(self, settings: GRPOSettings):
        """The jitted function `packed_grpo_grads` calls (compile_for lowers it)."""
        score = lambda model, b, d: packed_logprobs(model, b, self.chunk, d)
        return self._grpo_grad_fn(("grpo_packed", settings), score, settings)

    def _grpo_grad_fn(self, key, score, settings: GRPOSettings):
        """The jitted gradient of weight * GRPO loss, the log-probs [R, G] from
        score(model, batch, dropout)."""
        fn = self._grad.get(key)
        if fn is None:

            def loss_fn(p, batch, old_logp, ref_logp, advantages, mask, weight, dropout):
                logp, ent = score(nnx.merge(self.graphdef, p), batch, dropout)
                loss, metrics = grpo.grpo_loss(
                    logp,
                    old_logp,
                    ref_logp,
                    advantages,
                    mask,
                    clip_low=settings.clip_low,
                    clip_high=settings.clip_high,
                    dual_clip=settings.dual_clip,
                    kl_coef=settings.kl_coef,
                    kl_kind=settings.kl_kind,
                    mode=settings.loss_mode,
                    groups=settings.groups,
                )
                metrics = dict(metrics, entropy=grpo.aggregate(ent, mask, "token"), loss=loss)
                return weight * loss, metrics

            fn = self._grad[key] = jax.jit(_trainable_grads(loss_fn, self.trainable))
        return fn

    def accumulate(self, total, grads):
        return grads if total is None else self._add(total, grads)

    # ---- optimizer step ----
    def init(self, params):
        """Optimizer state on the params' mesh: moments shaped and sharded like the trainable
        params, the step counters replicated (committed, so every step reuses one compiled
        `apply` and a restore places them on the mesh too)."""
        opt = self.tx.init(self.trained(params))
        mesh = jax.tree.leaves(params)[0].sharding.mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # tx.init makes the counters with a default (single-device) sharding, even on a one-device
        # mesh; apply returns them as NamedShardings, which would compile apply a second time.
        return jax.tree.map(
            lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding) else jax.device_put(x, replicated), opt
        )

    def _apply_impl(self, params, opt_state, grads, loss):
        norm = optax.tree.norm(grads)
        updates, new_opt = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves params and moments as they were (the official
        # run skips such a step); decided on the device, so no step waits for the host.
        ok = jnp.isfinite(norm) & jnp.isfinite(loss)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        return keep(new_params, params), keep(new_opt, opt_state), norm

    def trained(self, params):
        """The part of `params` the optimizer updates (`trainable`): what `grads` and the optimizer
        state are shaped like."""
        return nnx.split_state(params, self.trainable, ...)[0]

    def apply(self, params, opt_state, grads, loss=0.0):
        """One optimizer step of the trainable params (`grads` is theirs), or none when `loss`
        or the gradient norm is not finite; returns (params, opt_state, grad_norm before
        clipping). The other params come back as the same arrays: split off here, outside the
        jitted step, they are neither donated nor copied."""
        train, frozen = nnx.split_state(params, self.trainable, ...)
        train, opt_state, norm = self._apply(train, opt_state, grads, jnp.asarray(loss, jnp.float32))
        return nnx.merge_state(train, frozen), opt_state, norm


def check_finite(step: int, phase: str, **values) -> None:
    """Stops the run at the first NaN/inf loss or gradient norm, naming the step (the trainer
    adds which checkpoint is kept and what to change)."""
    bad = {k: float(v) for k, v in values.items() if not np.isfinite(to_host(v)).all()}
    if bad:
        raise FloatingPointError(f"{phase} step {step}: non-finite {bad}")
