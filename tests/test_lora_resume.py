"""A LoRA run (lora.rank=8, lora.dropout=0.1) on test_train's very small config: its checkpoints
hold the fp32 adapters alone (params and reference), not the bf16 base, which never changes from
its random init; SIGTERM in the cold start and in GRPO, then resume, reaches the uninterrupted
run's params and logs bit for bit (the dropout masks keyed by seed, step and micro-batch, so
the resumed steps drop out what the lost ones did)."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from emor3_jax import config_lib, trainer
from emor3_jax.core import sharding
from emor3_jax.core.checkpoint import Checkpointer
from emor3_jax.load import load_step
from emor3_jax.models.api import create_model
from emor3_jax.models.qwen25_vl.config import ModelConfig
from tests.test_train import _metrics, small_config

# ~1.6 min of CI (two LoRA runs and a kill/resume): slow, listed in tests/README.md
pytestmark = pytest.mark.slow

LORA = {"lora.rank": 8, "lora.dropout": 0.1}


def _checkpoint(workdir) -> tuple[int, dict, dict]:
    """(step, {path: host array} of the model load.load_step puts together (the adapters saved
    onto the base drawn again), {tree: [leaf paths of params and ref]} of what the step holds)
    of workdir/ckpt."""
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:1])
    model, _, _, step = load_step(os.path.join(workdir, "ckpt"), None, mesh, sharding.DEFAULT_RULES)
    reader = ocp.CheckpointManager(
        os.path.join(workdir, "ckpt"),
        item_names=("state", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    saved = reader.item_metadata(step)["state"]
    trees = {name: [] for name in saved}  # the leaf paths of params and ref
    for name in {"params", "ref"} & set(saved):
        trees[name] = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(dict(saved[name]))[0]]
    reader.close()
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    return step, {"/".join(map(str, p)): np.asarray(v) for p, v in leaves}, trees


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_reference")
    trainer.run(small_config(workdir, **LORA))
    return workdir


def test_a_lora_run_saves_its_adapters_alone_over_its_random_base(lora_run):
    """The last checkpoint: params and reference hold adapters alone; loaded, the base is
    create_model's draw of the run's seed bit for bit, in bf16; the adapters moved (B away from
    its zeros)."""
    step, params, trees = _checkpoint(lora_run)
    assert {"params", "opt", "ref"} == set(trees)
    for name in ("params", "ref"):
        assert trees[name] and all("['lora_a']" in p or "['lora_b']" in p for p in trees[name]), trees[name][:3]
    c = small_config(lora_run, **LORA)
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:1])
    ck = Checkpointer(os.path.join(lora_run, "ckpt"), keep=10, async_save=False)
    cfg = ModelConfig.from_hf_dict(ck.read_meta(step)["model"], **config_lib.runtime_fields(c))
    ck.close()
    init = nnx.state(create_model(cfg, mesh, sharding.DEFAULT_RULES, seed=c.seed))
    moved = []
    for p, v in jax.tree_util.tree_leaves_with_path(init):
        name = "/".join(map(str, p))
        if "lora_" in name:
            moved += [] if np.array_equal(params[name], np.asarray(v)) else [name]
        else:
            assert params[name].dtype == np.asarray(v).dtype == jnp.bfloat16, name
            np.testing.assert_array_equal(params[name], np.asarray(v), err_msg=name)
    assert any("lora_b" in name for name in moved)


def test_sigterm_in_the_cold_start_and_in_grpo_then_resume_is_the_uninterrupted_lora_run(
    lora_run, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "interrupted"
    checkpoint = trainer.Run._checkpoint

    def sigterm_at(step):
        def hooked(self, due, state):
            if self.meta["global_step"] == step:
                signal.raise_signal(signal.SIGTERM)
            return checkpoint(self, due, state)

        monkeypatch.setattr(trainer.Run, "_checkpoint", hooked)

    for step in (2, 5):  # cold start step 2, GRPO step 2
        sigterm_at(step)
        with pytest.raises(SystemExit):
            trainer.run(small_config(workdir, **LORA))
        assert f"SIGTERM: saved step {step} to " in capsys.readouterr().out
    monkeypatch.setattr(trainer.Run, "_checkpoint", checkpoint)
    trainer.run(small_config(workdir, **LORA))
    assert "resuming from" in capsys.readouterr().out
    step, params, _ = _checkpoint(workdir)
    ref_step, ref_params, _ = _checkpoint(lora_run)
    assert step == ref_step and params.keys() == ref_params.keys()
    for k in params:
        np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)
    assert _metrics(workdir) == _metrics(lora_run)
