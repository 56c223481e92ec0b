"""LoRA adapters (Hu et al. 2021, as PEFT implements them): a frozen projection y = x @ W gains
a trainable low-rank term, y = x @ W + (x @ A) @ B * (alpha / rank). With `Dropout` (PEFT's
lora_dropout, in gradient passes only) the adapter's input is dropped out: y = x @ W +
(dropout(x) @ A) @ B * (alpha / rank), the base term seeing x unchanged.

A [in, r] is drawn as PEFT draws lora_A (kaiming-uniform with a = sqrt(5), nn.Linear's init:
U(-1/sqrt(in), 1/sqrt(in))), B [r, out] starts at zeros, so an adapted model at step 0 is its
base. Both are `LoRAParam`s (an nnx.Param subclass, so filters tell them from the base) in fp32
whatever the base's dtype, named `<module path>/lora_a` and `<module path>/lora_b` beside the
module's `kernel` (e.g. `layers/self_attn/q_proj/lora_a` [Y, D, r] in a stacked decoder):
the names an export maps to PEFT's `...q_proj.lora_A.weight` (transposed, as kernels are).

Functions over a parameter state (an nnx.State of the whole model; each a no-op on a model
without adapters): `trainable` (the filter of what an optimizer updates), `adapters_off` (the
base's outputs exactly: every adapter matrix zeros), `merged` (W + A B s in the kernels),
`adapters` / `with_adapters` (what a checkpoint holds and its return onto a base) and
`base_fingerprint` (which base weights the adapters were trained on).

Dropout is keyed, never stateful: a `Dropout` (key, rate) travels down a forward pass beside
the activations, each module folding its own number into the key (`fold`; a scanned stack's
layers take one key each, `split`), so every projection of every layer draws its own mask and a
step's masks are a function of the key it was given. A module's numbers are distinct among its
own children (projections 0-6 of a decoder layer, layers 0..Y-1 of a stack, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
from flax import nnx, struct

from emor3_jax.core.multihost import to_host

# The adapters' dtype whatever the base's: their updates are small next to their values.
DTYPE = jnp.float32

# lora.targets -> the projections an adapter is put on (the registry the config validation reads).
TARGETS = {
    "attention": "the language model's attention q/k/v/o projections",
    "mlp": "the language model's MLP gate/up/down projections",
    "vision": "the vision tower blocks' attention (qkv, proj) and MLP (gate/up/down) projections",
    "merger": "the patch merger's two projections (fc1, fc2)",
    "lm_head": "the language model's output projection (a model whose lm_head is not tied to its embedding)",
}


class LoRAParam(nnx.Param):
    """An adapter matrix (lora_a or lora_b); its metadata carries `scale` = alpha / rank."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    """The adapter one projection gets: its rank and the scale alpha / rank of its term."""

    rank: int
    scale: float


def adapter(rank: int, alpha: float, targets: tuple[str, ...], group: str) -> Adapter | None:
    """The adapter of projection group `group` (a TARGETS name), None where it gets none."""
    return Adapter(rank, alpha / rank) if rank and group in targets else None


@struct.dataclass
class Dropout:
    """PEFT's lora_dropout of one forward pass: each element of an adapter's input is zeroed with
    probability `rate` (static) and the rest scaled by 1 / (1 - rate), the mask drawn from `key`
    (a typed PRNG key; [n] keys where a scan or map hands one to each of n layers or chunks)."""

    key: jax.Array
    rate: float = struct.field(pytree_node=False)


def fold(d: Dropout | None, n: int) -> Dropout | None:
    """The dropout of sub-module or projection number `n` (None stays None: no ops added)."""
    return None if d is None else d.replace(key=jax.random.fold_in(d.key, n))


def split(d: Dropout | None, n: int) -> Dropout | None:
    """n dropouts in one, key [n], the i-th fold(d, i): the xs of a scan or map over n layers or
    chunks (None: None). Folds, not jax.random.split, so that every key of a pass is a path of
    numbers from its root and two modules differ whenever their paths do."""
    return None if d is None else d.replace(key=jax.vmap(lambda i: jax.random.fold_in(d.key, i))(jnp.arange(n)))


def drop(x: jax.Array, d: Dropout) -> jax.Array:
    """x [..., in] with each element zeroed with probability d.rate, the rest divided by 1 - rate
    (nn.Dropout in train mode): the expectation is x."""
    keep = 1.0 - d.rate
    mask = jax.random.bernoulli(d.key, keep, x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def trainable(rank: int):
    """The filter of the parameters an optimizer updates: every nnx.Param (full fine-tuning) at
    rank 0, else the adapters alone."""
    return LoRAParam if rank else nnx.Param


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def adapters_off(params):
    """`params` with every adapter matrix zeros (each in its own sharding), the base arrays
    themselves (no copy): the model then gives the base's outputs exactly (x @ 0 @ 0 adds 0)."""
    off = lambda v: v.replace(jnp.zeros_like(v.get_value())) if isinstance(v, LoRAParam) else v
    return jax.tree.map(off, params, is_leaf=_is_var)


def merged(params):
    """`params` with each adapted kernel W [..., in, out] replaced by W + A @ B * scale (in W's
    dtype, the sum in fp32) and its adapters zeros: the same model with no adapter term."""
    flat = dict(nnx.to_flat_state(params))
    out = []
    for path, v in flat.items():
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            a, b = flat[path[:-1] + ("lora_a",)], flat[path[:-1] + ("lora_b",)]
            delta = jnp.einsum("...ir,...ro->...io", a.get_value(), b.get_value()) * a.get_metadata()["scale"]
            w = v.get_value()
            v = v.replace((w.astype(jnp.float32) + delta).astype(w.dtype))
        elif isinstance(v, LoRAParam):
            v = v.replace(jnp.zeros_like(v.get_value()))
        out.append((path, v))
    return nnx.from_flat_state(out)


def adapters(params):
    """The adapter matrices of `params` alone (what a LoRA checkpoint saves: the base is read
    from its own path again)."""
    return nnx.filter_state(params, LoRAParam)


def with_adapters(params, saved):
    """`params` with its adapter matrices replaced by `saved`'s (an `adapters` state of the same
    model), the base arrays themselves."""
    flat = dict(nnx.to_flat_state(params))
    for path, v in nnx.to_flat_state(saved):
        if not isinstance(flat.get(path), LoRAParam):
            raise ValueError(f"saved adapter {'/'.join(map(str, path))} has no adapter in the model")
        flat[path] = flat[path].replace(v.get_value())
    return nnx.from_flat_state(list(flat.items()))


# Elements of each base array the fingerprint reads: enough that two fine-tunes of one model differ.
_FINGERPRINT_ELEMENTS = 256


def base_fingerprint(params) -> str:
    """sha256 over every base (non-adapter) array's path, dtype, shape and the bytes of its first
    _FINGERPRINT_ELEMENTS elements: cheap at 7B (a few KB leave the devices) and the same on any
    mesh, it tells the base a run's adapters were trained on from another checkpoint of the same
    architecture (a config hash cannot)."""
    h = hashlib.sha256()
    for path, v in nnx.to_flat_state(params):
        if isinstance(v, LoRAParam):
            continue
        x = v.get_value()
        head = to_host(jax.jit(lambda a: a.reshape(-1)[:_FINGERPRINT_ELEMENTS])(x))
        h.update(f"{'/'.join(map(str, path))}:{x.dtype}:{x.shape}:".encode())
        h.update(head.tobytes())
    return h.hexdigest()
