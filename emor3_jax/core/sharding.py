"""Mesh and logical-axis sharding.

Model code names logical axes only (`embed`, `mlp`, `heads`, ...). Config data maps them to
mesh axes (`data`, `fsdp`, `tensor`). A dimension whose size the mapped mesh axes do not
divide is replicated instead, and `describe_fallbacks` lists every such case so it is never
silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Parameters over fsdp (and tensor for heads/mlp/vocab when that axis is > 1); activations'
# batch over data x fsdp. The stacked layers' leading axis stays whole on every chip: each
# step of the scan over layers reads its own layer's shard.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("patch", None),
    ("seq", None),
    ("norm", None),
    ("head_dim", None),
    ("layers", None),
)

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("logical_axis_rules", default=None)


def make_mesh(shape: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh from config data, e.g. [("data", 1), ("fsdp", -1), ("tensor", 1)]; one -1 takes the rest."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(n for n, _ in shape)
    if names != MESH_AXES:
        raise ValueError(f"mesh axes must be {MESH_AXES} in that order, got {names}")
    sizes = [int(s) for _, s in shape]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(device_grid(sizes, devices), names, axis_types=(AxisType.Auto,) * len(names))


def device_grid(sizes: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """`devices` as an array of shape `sizes` (data, fsdp, tensor) laid over the hardware.

    TPU and GPU: jax's mesh_utils orders the devices so that each axis runs over physical
    neighbours (ICI rings), e.g. a tensor axis of 4 on a v5e 4x4 is a row of chips, not four
    chips in device-id order; GPUs (compile-only ones too) it orders by id, node by node, so a
    data axis that is a multiple of the nodes runs across them. Several TPU slices: the data
    axis goes across slices (DCN, the slow link; gradients cross it once a step), fsdp and
    tensor stay within each slice. CPU, and libtpu's compile-only v4 topologies that show each
    chip's two TensorCores as two devices (mesh_utils lays out one device per chip): the
    devices' own order, a chip's cores adjacent. (jax.make_mesh wraps the same call but
    splits physical axes only on v5e and refuses several slices.)"""
    from jax.experimental import mesh_utils

    one_per_chip = all(getattr(d, "core_on_chip", 0) == 0 for d in devices)
    if devices[0].platform == "cpu" or not one_per_chip:
        return np.asarray(devices).reshape(sizes)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    if sizes[0] % slices:
        raise ValueError(
            f"mesh data={sizes[0]} over {slices} slices: the data axis runs across slices, so it must be a "
            f"multiple of {slices} (e.g. --config.mesh=\"(('data',{slices}),('fsdp',-1),('tensor',1))\")"
        )
    within = (sizes[0] // slices, *sizes[1:])
    return mesh_utils.create_hybrid_device_mesh(within, (slices, 1, 1), devices, allow_split_physical_axes=True)


def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule in logical_axis_rules")


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec for an array with logical `axes`; also the dims replicated for divisibility."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    spec, fallbacks, used = [], [], set()
    for name, size in zip(axes, shape):
        mesh_axes = tuple(a for a in _mesh_axes_for(name, rules) if mesh.shape[a] > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and size % n:
            fallbacks.append(f"{name}={size} not divisible by {'x'.join(mesh_axes)}={n}")
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec), fallbacks


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)[0])


def state_shardings(abstract_state, mesh: Mesh, rules: Rules):
    """NamedSharding for every leaf of an abstract nnx.State whose variables carry `axes` metadata."""
    from flax import nnx

    def one(v):
        axes = v.get_metadata().get("axes")
        if axes is None:
            raise ValueError(f"variable of shape {v.shape} has no logical `axes` metadata")
        return v.replace(named_sharding(axes, v.shape, mesh, rules))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_with_shardings(abstract_state, mesh: Mesh, rules: Rules):
    """The abstract state with ShapeDtypeStruct leaves that carry their NamedSharding (restore targets)."""
    from flax import nnx

    def one(v):
        spec = named_sharding(v.get_metadata()["axes"], v.shape, mesh, rules)
        return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def describe_fallbacks(abstract_state, mesh: Mesh, rules: Rules) -> list[str]:
    """Every parameter dimension that is replicated because the mesh does not divide it."""
    from flax import nnx

    out = []
    for path, v in nnx.to_flat_state(abstract_state):
        _, fb = logical_to_spec(v.get_metadata()["axes"], v.shape, mesh, rules)
        out += [f"{'.'.join(map(str, path))}: {f}" for f in fb]
    return out


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
    """`jax.set_mesh(mesh)` and `axis_rules(rules)` together: where sharded code runs."""
    with jax.set_mesh(mesh), axis_rules(rules):
        yield


@contextlib.contextmanager
def axis_rules(rules: Rules):
    """Activates logical-axis rules for `constrain` inside (trace time)."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def axis_shards(name: str) -> int:
    """How many ways logical axis `name` is split under the current mesh and rules (1 outside
    `use_mesh`): e.g. the data-parallel shards of "batch"."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in _mesh_axes_for(name, rules))


def platform() -> str:
    """The platform the program being traced is built for: the current mesh's (compile_for
    builds TPU and GPU programs on a CPU host), else the default backend's."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def current_spec(axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The PartitionSpec of an array with logical `axes` under the current mesh and rules; None
    outside `jax.set_mesh` / `axis_rules` or on one device (nothing is split)."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return None
    return logical_to_spec(axes, shape, mesh, rules)[0]


def per_shard_heads(fn, q: jax.Array, q_heads: int, kvs: Sequence[tuple[jax.Array, int]], rows: Sequence[jax.Array]):
    """fn(q, *kvs, *rows) run on each device's rows and heads (shard_map) under the current mesh,
    as is outside one: for a Pallas kernel, which XLA's partitioner cannot split (it would
    gather every row onto every device).

    q's dim `q_heads` is its query heads; kvs are (array, the dim of its kv heads) pairs (keys,
    values, an int8 cache's scales): they split alike or none splits, so each device keeps
    whole groups. Dim 0 of every array is the batch; rows ([B, ...] each) split by it only;
    every other dim stays whole. fn's output is laid out like q.
    """

    def spec(x, heads: int | None, name: str | None) -> PartitionSpec | None:
        axes = ["batch"] + [None] * (x.ndim - 1)
        if heads is not None:
            axes[heads] = name
        return current_spec(axes, x.shape)

    arrays = [x for x, _ in kvs]
    q_spec = spec(q, q_heads, "heads")
    if q_spec is None:
        return fn(q, *arrays, *rows)
    kv_specs = [spec(x, d, "kv_heads") for x, d in kvs]
    if any(s[d] != q_spec[q_heads] for s, (_, d) in zip(kv_specs, kvs)):
        q_spec, kv_specs = spec(q, None, None), [spec(x, None, None) for x in arrays]
    in_specs = (q_spec, *kv_specs, *[spec(r, None, None) for r in rows])
    return jax.shard_map(fn, in_specs=in_specs, out_specs=q_spec, check_vma=False)(q, *arrays, *rows)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes, under the current mesh and rules.

    Outside `jax.set_mesh` / `axis_rules` (a plain single-device call) there is nothing to
    constrain and `x` is returned as is.
    """
    spec = current_spec(axes, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)
