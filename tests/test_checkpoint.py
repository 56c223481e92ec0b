"""Checkpoint restore survives damaged files: the newest intact step is restored, each skipped
step is named with its cause in one line, and a directory with no intact step fails clearly."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax.core.checkpoint import Checkpointer, CheckpointError, error_line

MODEL = {"hidden_size": 8}


def _state(step):
    return {"params": {"w": jnp.arange(1000.0) * step, "b": jnp.full((3,), float(step))}}


def _abstract(meta):
    """The abstract state for a step's metadata (the trainer's depends on the phase)."""
    sd = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sd), _state(1))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Steps 1, 2, 3, each saved with params = step * (something)."""
    d = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
    ck = Checkpointer(d, keep=5, async_save=False)
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"phase": "cold_start", "step": step, "model": MODEL})
    ck.close()
    return d


def _copy(pristine, tmp_path):
    d = str(tmp_path / "ckpt")
    shutil.copytree(pristine, d)
    return d


def _largest_array_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty(path):
    open(path, "w").close()


# (damage to step 3, words its one-line reason must contain)
DAMAGE = {
    "truncated array file": (lambda s: _truncate(_largest_array_file(s)), "OUT_OF_RANGE"),
    "emptied array file": (lambda s: _empty(_largest_array_file(s)), "OUT_OF_RANGE"),
    "deleted array file": (lambda s: os.remove(_largest_array_file(s)), "FAILED_PRECONDITION"),
    "deleted _METADATA": (lambda s: os.remove(os.path.join(s, "state", "_METADATA")), "state/_METADATA is missing"),
    "emptied _METADATA": (lambda s: _empty(os.path.join(s, "state", "_METADATA")), "state/_METADATA unreadable"),
    "emptied meta": (lambda s: _empty(os.path.join(s, "meta", "metadata")), "metadata unreadable (JSONDecodeError"),
    "deleted state dir": (lambda s: shutil.rmtree(os.path.join(s, "state")), "state/ is missing"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_to_the_newest_intact_one(pristine, tmp_path, case):
    d = _copy(pristine, tmp_path)
    damage, words = DAMAGE[case]
    damage(os.path.join(d, "3"))
    ck = Checkpointer(d, keep=5, async_save=False)
    try:
        got = ck.restore_newest_intact(_abstract, MODEL)
        assert got.step == 2 and got.meta["step"] == 2
        np.testing.assert_array_equal(got.state["params"]["w"], np.arange(1000.0) * 2)
        ((step, why),) = got.skipped
        assert step == 3 and words in why and "\n" not in why and len(why) <= 300, why
        # The damaged step is kept aside, and the run can save step 3 again.
        assert ck.all_steps() == [1, 2] and os.path.isdir(os.path.join(d, "3.corrupt"))
        ck.save(3, _state(30), {"phase": "cold_start", "step": 3, "model": MODEL})
        ck.wait()
        state, meta = ck.restore(3, _abstract(None), MODEL)
        np.testing.assert_array_equal(state["params"]["w"], np.arange(1000.0) * 30)
    finally:
        ck.close()


def test_intact_latest_step_is_restored_without_skips(pristine, tmp_path):
    ck = Checkpointer(_copy(pristine, tmp_path), keep=5, async_save=False)
    got = ck.restore_newest_intact(_abstract, MODEL)
    ck.close()
    assert got.step == 3 and got.skipped == []
    np.testing.assert_array_equal(got.state["params"]["b"], np.full(3, 3.0))


def test_no_steps_restores_nothing(tmp_path):
    ck = Checkpointer(str(tmp_path / "empty"), keep=5, async_save=False)
    assert ck.restore_newest_intact(_abstract, MODEL) is None
    ck.close()


def test_every_step_damaged_is_one_clear_error_naming_each_cause(pristine, tmp_path):
    d = _copy(pristine, tmp_path)
    _truncate(_largest_array_file(os.path.join(d, "3")))
    os.remove(os.path.join(d, "2", "state", "_METADATA"))
    _empty(os.path.join(d, "1", "meta", "metadata"))
    ck = Checkpointer(d, keep=5, async_save=False)
    with pytest.raises(CheckpointError) as err:
        ck.restore_newest_intact(_abstract, MODEL)
    ck.close()
    msg = str(err.value)
    assert "\n" not in msg and "--config.workdir" in msg
    assert "step 3: ValueError: OUT_OF_RANGE" in msg
    assert "step 2: state/_METADATA is missing" in msg
    assert "step 1: metadata unreadable (JSONDecodeError" in msg
    assert sorted(os.listdir(d)) == ["1", "2", "3"]  # nothing moved when nothing is restored


def test_another_model_is_not_mistaken_for_damage(pristine, tmp_path):
    d = _copy(pristine, tmp_path)
    ck = Checkpointer(d, keep=5, async_save=False)
    with pytest.raises(ValueError, match=r"checkpoint of another model \(differs in \['hidden_size'\]\)"):
        ck.restore_newest_intact(_abstract, {"hidden_size": 16})
    ck.close()
    assert sorted(os.listdir(d)) == ["1", "2", "3"]


def test_a_different_tree_is_a_bug_not_damage(pristine, tmp_path):
    """Asking for another structure must raise, not skip (and move aside) every step."""
    d = _copy(pristine, tmp_path)
    ck = Checkpointer(d, keep=5, async_save=False)

    def extra(meta):
        a = _abstract(meta)
        return {**a, "ref": a["params"]}

    with pytest.raises(ValueError, match="tree structures do not match"):
        ck.restore_newest_intact(extra, MODEL)
    ck.close()
    assert sorted(os.listdir(d)) == ["1", "2", "3"]


def test_partial_restore_of_a_damaged_step_says_which_steps_exist(pristine, tmp_path):
    d = _copy(pristine, tmp_path)
    os.remove(os.path.join(d, "3", "state", "_METADATA"))
    ck = Checkpointer(d, keep=5, async_save=False)
    expect = r"3: state/_METADATA is missing; read another step \(on disk: \[1, 2, 3\]\)"
    with pytest.raises(CheckpointError, match=expect):
        ck.restore_subtree(3, {"params": _abstract(None)["params"]})
    ck.close()


def test_error_line_takes_the_root_cause_skipping_stop_iteration():
    try:
        try:
            try:
                raise StopIteration(0)
            except StopIteration:
                raise ValueError("OUT_OF_RANGE: byte range [0, 8) of a 4-byte value\nmore detail")
        except ValueError as e:
            raise Exception("Encountered error while reading array: TensorStore({...})") from e
    except Exception as e:
        assert error_line(e) == "ValueError: OUT_OF_RANGE: byte range [0, 8) of a 4-byte value"


def test_the_trainers_state_falls_back_past_a_damaged_step(tmp_path, ours_fp32):
    """nnx params, optax state and a phase-dependent tree (GRPO adds the reference), as the
    trainer saves them, with the trainer's own arrays as the abstract state."""
    from flax import nnx

    from emor3_jax.rl.learner import Learner, OptimizerSettings, make_optimizer

    graphdef, params = nnx.split(ours_fp32)
    settings = OptimizerSettings.constant(1e-3, weight_decay=0.01)
    learner = Learner(graphdef, make_optimizer(settings)[0])
    opt = learner.init(params)
    d = str(tmp_path / "ckpt")
    ck = Checkpointer(d, keep=5, async_save=False)
    ck.save(1, {"params": params, "opt": opt}, {"phase": "cold_start", "model": MODEL})
    ck.save(2, {"params": params, "opt": opt, "ref": params}, {"phase": "grpo", "model": MODEL})
    ck.save(3, {"params": params, "opt": opt, "ref": params}, {"phase": "grpo", "model": MODEL})
    os.remove(os.path.join(d, "3", "state", "_METADATA"))

    def abstract_for(meta):
        return {"params": params, "opt": opt} | ({"ref": params} if meta["phase"] == "grpo" else {})

    got = ck.restore_newest_intact(abstract_for, MODEL)
    assert (got.step, [s for s, _ in got.skipped]) == (2, [3]) and set(got.state) == {"params", "opt", "ref"}
    for a, b in zip(jax.tree.leaves(got.state["ref"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # Step 2 damaged too: back to the cold-start step, whose tree has no reference.
    _truncate(_largest_array_file(os.path.join(d, "2")))
    ck._mngr.reload()
    got = ck.restore_newest_intact(abstract_for, MODEL)
    ck.close()
    assert got.step == 1 and set(got.state) == {"params", "opt"} and "OUT_OF_RANGE" in got.skipped[0][1]


def _per_layer_tree(model) -> dict:
    """The model's parameters as the earlier layout saved them: one subtree per layer
    (`layers/0/...`, `visual/blocks/0/...`) instead of stacked arrays."""
    from flax import nnx

    tree: dict = {}
    for path, v in nnx.to_flat_state(nnx.state(model)):
        arr = np.asarray(v[...])
        cut = 1 if path[0] == "layers" else 2 if path[:2] == ("visual", "blocks") else None
        pieces = [(path, arr)] if cut is None else [(path[:cut] + (str(i),) + path[cut:], a) for i, a in enumerate(arr)]
        for p, a in pieces:
            node = tree
            for k in p[:-1]:
                node = node.setdefault(k, {})
            node[p[-1]] = a
    return tree


def test_a_checkpoint_of_the_per_layer_layout_is_refused_as_another_model(tmp_path, ours_fp32, mesh1):
    """A run's step saved before the layers were stacked (its architecture without
    `param_layout`): export/eval (load_step) and resume both refuse it in one line, before
    Orbax meets the other tree; a step of the current layout loads."""
    import json

    from flax import nnx

    from emor3_jax.core import sharding
    from emor3_jax.load import load_step
    from emor3_jax.models.api import architecture

    cfg, config = ours_fp32.cfg, json.dumps({"model": {"param_dtype": "float32"}})
    d = str(tmp_path / "ckpt")
    ck = Checkpointer(d, keep=5, async_save=False)
    ck.save(1, {"params": _per_layer_tree(ours_fp32)}, {"phase": "grpo", "model": cfg.to_hf_dict(), "config": config})
    with pytest.raises(ValueError, match=r"1: checkpoint of another model \(differs in \['param_layout'\]"):
        load_step(d, 1, mesh1, sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"checkpoint of another model \(differs in \['param_layout'\]\)"):
        ck.restore_newest_intact(lambda meta: {"params": nnx.state(ours_fp32)}, architecture(cfg))
    ck.save(2, {"params": nnx.state(ours_fp32)}, {"phase": "grpo", "model": architecture(cfg), "config": config})
    ck.close()
    model, _, _, step = load_step(d, 2, mesh1, sharding.DEFAULT_RULES)
    assert step == 2
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(ours_fp32))):
        np.testing.assert_array_equal(a, b)
