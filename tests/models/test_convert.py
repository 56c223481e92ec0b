"""HF checkpoint load -> export -> transformers reload, and the errors bad checkpoints raise."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from qwen_fixtures import CASES, make_batch
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from emor3_jax.core import sharding
from emor3_jax.models.qwen25_vl.convert import load_hf, save_hf, weight_table

RULES = sharding.DEFAULT_RULES
FP32 = dict(param_dtype="float32", compute_dtype="float32")


def _hf_logits(model, batch):
    ids = torch.tensor(batch["input_ids"])
    tt = (ids == model.config.image_token_id).long()
    grid = torch.tensor(batch["image_grid_thw"])
    pos, _ = model.model.get_rope_index(
        ids, image_grid_thw=grid, mm_token_type_ids=tt, attention_mask=torch.tensor(batch["attention_mask"])
    )
    with torch.no_grad():
        return model(
            input_ids=ids,
            attention_mask=torch.tensor(batch["attention_mask"]),
            position_ids=pos,
            mm_token_type_ids=tt,
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_grid_thw=grid,
        ).logits.numpy()


def _keys(path):
    return set(load_file(os.path.join(path, "model.safetensors")))


def test_export_reloads_in_transformers_with_same_logits_config_and_keys(hf_tiny, hf_tiny_dir, mesh1, tmp_path):
    model = load_hf(hf_tiny_dir, mesh1, RULES, **FP32)
    out = str(tmp_path / "export")
    with open(os.path.join(hf_tiny_dir, "chat_template.jinja"), "w") as f:
        f.write("{{ messages }}")  # a file export must carry over from the source
    save_hf(model, out, like=hf_tiny_dir)
    with open(os.path.join(out, "config.json")) as a, open(os.path.join(hf_tiny_dir, "config.json")) as b:
        assert json.load(a) == json.load(b)
    assert _keys(out) == _keys(hf_tiny_dir)
    assert os.path.isfile(os.path.join(out, "chat_template.jinja"))

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    batch = make_batch(*CASES["mixed_batch"][:1], np.random.default_rng(1))
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(_hf_logits(reloaded, batch)[real], _hf_logits(hf_tiny, batch)[real])


def test_export_without_source_writes_a_config_transformers_reads(hf_tiny_dir, mesh1, tmp_path):
    model = load_hf(hf_tiny_dir, mesh1, RULES, **FP32)
    out = str(tmp_path / "plain")
    save_hf(model, out, dtype="bfloat16", max_shard_bytes=60_000)  # several shards + index
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    src = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_tiny_dir).config
    for a, b in ((reloaded.config.text_config, src.text_config), (reloaded.config.vision_config, src.vision_config)):
        for field in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
            "rms_norm_eps",
            "num_key_value_heads",
            "num_hidden_layers",
            "depth",
            "fullatt_block_indexes",
            "num_heads",
            "out_hidden_size",
            "window_size",
            "rope_parameters",
        ):
            assert getattr(a, field, None) == getattr(b, field, None), field
    # Round trip of the sharded bf16 export through our loader.
    again = load_hf(out, mesh1, RULES, **FP32)
    emb = np.asarray(again.embed_tokens[...])
    np.testing.assert_allclose(emb, np.asarray(model.embed_tokens[...]), rtol=1e-2, atol=1e-3)


def test_tied_embeddings_load_and_export(mesh1, tmp_path):
    from qwen_fixtures import hf_model

    hf = hf_model(seed=3, tie=True)
    src = str(tmp_path / "tied")
    hf.save_pretrained(src)
    assert "lm_head.weight" not in _keys(src)
    model = load_hf(src, mesh1, RULES, **FP32)
    assert model.lm_head is None
    out = str(tmp_path / "tied_out")
    save_hf(model, out, like=src)
    assert _keys(out) == _keys(src)
    batch = make_batch(*CASES["one_image"][:1], np.random.default_rng(2))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_array_equal(_hf_logits(reloaded, batch), _hf_logits(hf, batch))


def test_weight_table_covers_every_hub_key_both_ways(hf_tiny_dir, ours_fp32):
    table = weight_table(ours_fp32.cfg)
    assert {e.hf_key for e in table} == _keys(hf_tiny_dir)
    assert len({(e.path, e.layer) for e in table}) == len(table)
    # a stacked parameter has one hub key per layer, in layer order; the others one key each
    layers: dict[tuple, list] = {}
    for e in table:
        layers.setdefault(e.path, []).append(e.layer)
    cfg = ours_fp32.cfg
    for path, got in layers.items():
        vision, text = path[:2] == ("visual", "blocks"), path[0] == "layers"
        want = list(range(cfg.vision.depth)) if vision else list(range(cfg.text.num_layers)) if text else [None]
        assert got == want, path


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing keys ['model.layers.1.mlp.up_proj.weight']"),
        (
            lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((88, 64), np.float32)}),
            "unmapped keys ['model.layers.2.mlp.up_proj.weight']",
        ),
        (
            lambda t: t.update({"visual.blocks.0.attn.qkv.weight": np.zeros((120, 41), np.float32)}),
            "visual.blocks.0.attn.qkv.weight has shape (120, 41), expected (120, 40)",
        ),
    ],
    ids=["missing", "extra", "shape"],
)
def test_bad_checkpoint_names_the_problem(hf_tiny_dir, mesh1, tmp_path, edit, message):
    bad = _broken_copy(hf_tiny_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as err:
        load_hf(bad, mesh1, RULES, **FP32)
    assert message in str(err.value)


def test_checkpoint_of_another_model_type_is_refused(hf_tiny_dir, mesh1, tmp_path):
    bad = tmp_path / "qwen2_vl"
    shutil.copytree(hf_tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type is 'qwen2_vl', expected 'qwen2_5_vl'"):
        load_hf(str(bad), mesh1, RULES)


def test_missing_weights_and_pickles_are_refused(hf_tiny_dir, mesh1, tmp_path):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(os.path.join(hf_tiny_dir, "config.json"), empty)
    (empty / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="only pickled weights found"):
        load_hf(str(empty), mesh1, RULES)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(str(tmp_path), mesh1, RULES)


def test_export_refuses_a_source_of_another_architecture(hf_tiny_dir, mesh1, tmp_path):
    model = load_hf(hf_tiny_dir, mesh1, RULES, **FP32)
    other = tmp_path / "other"
    shutil.copytree(hf_tiny_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="another architecture"):
        save_hf(model, str(tmp_path / "out"), like=str(other))
