"""A LoRA checkpoint holds its adapters alone and the record of its base (run_checkpoints.py);
load.load_step puts them back onto the base read again from its path, and refuses a base
with other weights or another config, or none at all, naming the step and the flag."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from qwen_fixtures import hf_config, hf_model
from transformers import Qwen2_5_VLForConditionalGeneration

from configs.qwen_vl import get_config
from emor3_jax.core import sharding
from emor3_jax.load import load_step
from emor3_jax.models import lora
from emor3_jax.models.api import architecture
from emor3_jax.run_checkpoints import RunCheckpoints, base_record
from tests.models.test_lora_export import adapted  # noqa: F401  (a module fixture: hf_tiny with adapters)

RULES = sharding.DEFAULT_RULES


@pytest.fixture(scope="module")
def saved(adapted, hf_tiny_dir, tmp_path_factory):  # noqa: F811
    """workdir/ckpt/3: `adapted`'s adapters saved as a LoRA run over hf_tiny_dir saves them."""
    c = get_config("tiny")
    c.workdir = str(tmp_path_factory.mktemp("lora_ckpt"))
    c.hf_path, c.model.base_dtype = hf_tiny_dir, "float32"
    c.lora.rank, c.lora.alpha, c.lora.targets = adapted.cfg.lora_rank, adapted.cfg.lora_alpha, tuple(lora.TARGETS)
    state = nnx.state(adapted)
    record = base_record(json.loads(c.to_json()), architecture(adapted.cfg), lora.base_fingerprint(state))
    ckpts = RunCheckpoints(c, architecture(adapted.cfg), base=record)
    ckpts.save({"global_step": 3}, {"params": lora.adapters(state)}, {})
    ckpts.close()
    return os.path.join(c.workdir, "ckpt")


def _flat(model) -> dict:
    return {"/".join(map(str, p)): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


def test_the_checkpoint_holds_the_adapters_alone_and_loads_back_onto_its_base(saved, adapted, mesh1):  # noqa: F811
    model, meta, _, step = load_step(saved, None, mesh1, RULES, compute_dtype="float32")
    assert step == 3 and meta["base"]["path"] == json.loads(meta["config"])["hf_path"]
    ours, theirs = _flat(model), _flat(adapted)
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    from orbax.checkpoint import CheckpointManager, JsonCheckpointHandler, StandardCheckpointHandler

    reader = CheckpointManager(
        saved,
        item_names=("state", "meta"),
        item_handlers={"state": StandardCheckpointHandler(), "meta": JsonCheckpointHandler()},
    )
    tree = reader.item_metadata(3)["state"]["params"]
    reader.close()
    leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(dict(tree))[0]]
    assert leaves and all("['lora_a']" in name or "['lora_b']" in name for name in leaves), leaves


def test_a_base_with_other_weights_is_refused(saved, mesh1, tmp_path):
    other = tmp_path / "other"
    hf_model(seed=1).save_pretrained(other)  # the same config, other weights
    with pytest.raises(ValueError, match=r"ckpt/3: its LoRA adapters were trained on the base .* whose weights differ"):
        load_step(saved, None, mesh1, RULES, base=str(other), compute_dtype="float32")


def test_a_base_of_another_config_is_refused(saved, mesh1, tmp_path):
    other = tmp_path / "wider"
    cfg = hf_config()
    cfg.text_config.intermediate_size = 96
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(other)
    with pytest.raises(ValueError, match="whose config differ"):
        load_step(saved, None, mesh1, RULES, base=str(other), compute_dtype="float32")


def test_a_missing_base_names_the_step_and_the_flag(saved, mesh1, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt/3: a LoRA checkpoint holds its adapters alone.*--base"):
        load_step(saved, None, mesh1, RULES, base=str(tmp_path / "gone"), compute_dtype="float32")
