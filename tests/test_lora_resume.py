"""A LoRA run (lora.rank=8) on test_train's very small config: its checkpoints hold the bf16
base and the fp32 adapters and no reference (the base is the reference); the base never
changes from its random init; SIGTERM in the cold start and in GRPO, then resume, reaches the
uninterrupted run's params and logs bit for bit."""

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
from emor3_jax.models.api import create_model
from emor3_jax.models.qwen25_vl.config import ModelConfig
from emor3_jax.models.qwen25_vl.model import abstract_model
from tests.test_train import _metrics, small_config

# ~1.6 min of CI (two LoRA runs and a kill/resume): slow, listed in tests/README.md
pytestmark = pytest.mark.slow

LORA = {"lora.rank": 8}


def _checkpoint(workdir, step=None) -> tuple[int, dict, dict]:
    """(step, {path: host array} of the params, the names of the checkpoint's trees) of the latest
    (or the given) step of workdir/ckpt."""
    ck = Checkpointer(os.path.join(workdir, "ckpt"), keep=10, async_save=False)
    try:
        step = ck.latest_step() if step is None else step
        meta = ck.read_meta(step)
        cfg = ModelConfig.from_hf_dict(meta["model"], param_dtype="bfloat16", lora_rank=8)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), nnx.state(abstract_model(cfg))
        )
        params = ck.restore_subtree(step, {"params": abstract})["params"]
        reader = ocp.CheckpointManager(
            os.path.join(workdir, "ckpt"),
            item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
        trees = set(reader.item_metadata(step)["state"].keys())
        reader.close()
        flat = {"/".join(map(str, p)): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
        return step, flat, trees
    finally:
        ck.close()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_reference")
    trainer.run(small_config(workdir, **LORA))
    return workdir


def test_a_lora_run_saves_the_adapters_and_keeps_its_random_base(lora_run):
    """The last checkpoint: no reference tree; the base is create_model's draw of the run's seed
    bit for bit, in bf16; the adapters moved (B away from its zeros)."""
    step, params, trees = _checkpoint(lora_run)
    assert "ref" not in trees and {"params", "opt"} <= trees
    c = small_config(lora_run, **LORA)
    ck = Checkpointer(os.path.join(lora_run, "ckpt"), keep=10, async_save=False)
    cfg = ModelConfig.from_hf_dict(ck.read_meta(step)["model"], **config_lib.runtime_fields(c))
    ck.close()
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1), ("tensor", 1)], jax.devices()[:1])
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
