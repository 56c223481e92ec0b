"""Start-up checks of a run config: every numeric field out of range is refused naming its
flag; a resumed run's config is compared with the one its checkpoint was saved with."""

import json

import pytest

from configs.qwen_vl import get_config
from emor3_jax import config_lib
from emor3_jax.data.tokenizers import QWEN_SPECIAL_TOKENS


def _config(**overrides):
    c = get_config("tiny")
    c.workdir = "/tmp/unused"
    for path, value in overrides.items():
        node = c
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


# One out-of-range value per field of config_lib.RANGES.
BAD = {
    "seed": -1,
    "gpu_memory_fraction": 1.5,
    "data.synthetic_train": 0,
    "data.synthetic_test": 0,
    "data.image_size": 27,
    "data.min_pixels": 783,
    "data.max_pixels": 783,
    "lora.rank": -1,
    "lora.alpha": 0.0,
    "lora.lr_multiplier": 0.0,
    "lora.dropout": 1.0,
    "cold_start.steps": -3,
    "cold_start.batch_size": 0,
    "cold_start.learning_rate": -1e-3,
    "cold_start.warmup_steps": -1,
    "rl.steps": -5,
    "rl.epochs": -2,
    "rl.learning_rate": -5e-5,
    "rl.warmup_steps": -1,
    "rl.weight_decay": -0.01,
    "rl.b1": 1.0,
    "rl.b2": 0.0,
    "rl.grad_clip": 0.0,
    "rl.kl_coef": -0.01,
    "rl.clip_low": 1.0,
    "rl.clip_high": -0.1,
    "rl.dual_clip": 1.0,
    "rl.temperature": 0.0,
    "rl.top_p": 1.5,
    "rl.max_prompt_len": 0,
    "rl.max_response_len": 0,
    "rl.max_skipped_steps": -1,
    "reward.w_accuracy": -0.8,
    "reward.w_coherence": -0.1,
    "reward.w_consistency": -0.1,
    "reward.w_format": -0.1,
    "reward.reflection_max_tokens": 0,
    "reward.reflection_temperature": 0.0,
    "reward.reflection_top_p": 0.0,
    "reward.threads": 0,
    "eval.every": 0,
    "eval.num_examples": 0,
    "eval.batch_size": 0,
    "eval.sampled_temperature": -0.6,
    "eval.sampled_top_p": 1.01,
    "sampling.prefill_group": -1,
    "sampling.page_size": -1,
    "sampling.kv_pages": -1,
    "checkpoint.every": 0,
    "checkpoint.keep": 0,
    "guard.max_norm_ratio": 1.0,
    "guard.min_logprob": 0.0,
    "log.samples_every": 0,
    "log.num_samples": -1,
}
# Numeric fields checked together with others in `validate` (or by validate_eval), not in RANGES.
CROSS_CHECKED = {
    "cold_start.judge_records",  # >= 0, and the judge's answers fit sampling.gen_buckets
    "cold_start.judge_batch_size",  # >= 0, 0 unless synthetic without data.cold_start
    "data.max_bad_fraction",
    "data.unfaithful_share",  # in [0, 1] (the synthetic generator alone reads it)
    "rl.num_generations",
    "rl.rollout_batch",
    "rl.update_batch",
    "rl.micro_batch",  # divides update_batch * num_generations (by_share / equal)
    "rl.micro_batch_per_device",  # per_device_mean: >= 1, divides rl.micro_batch
    "rl.loss_devices",  # per_device_mean: >= 1, x micro_batch_per_device divides the step's rows
    "sampling.max_rows",
    "rl.pack_length",  # with rl.packing: holds rl.max_prompt_len + rl.max_response_len
    "sampling.prompt_buckets",
    "sampling.gen_buckets",
    "model.vision_buckets",  # must hold one image at data.max_pixels; ModelConfig checks the steps
    "data.checkpoint_pixels",  # (min, max) with 784 <= min <= max
    "mesh",
    "eval.datasets.test.num_examples",
    "eval.datasets.emotion6.num_examples",
}


def test_the_default_configs_are_valid():
    c = _config()
    before = c.to_json()
    config_lib.validate(c)  # raises ValueError listing every bad value
    assert c.to_json() == before  # and changes nothing (no hub id to resolve in the tiny config)


def test_every_numeric_field_has_a_range_check():
    flat = config_lib._flat(json.loads(_config().to_json()))

    def numeric(v):
        if isinstance(v, list):
            return bool(v) and all(numeric(x) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def mesh_like(v):  # [[axis, size], ...]
        return isinstance(v, list) and all(isinstance(x, list) and numeric(x[1:]) for x in v)

    fields = {k for k, v in flat.items() if numeric(v) or (k == "mesh" and mesh_like(v))}
    ranged = {path for path, _, _ in config_lib.RANGES}
    assert fields - ranged - CROSS_CHECKED == set(), "add a range to config_lib.RANGES"
    assert set(BAD) == ranged, "test every entry of config_lib.RANGES"


@pytest.mark.parametrize("path", sorted(BAD))
def test_out_of_range_value_is_refused_naming_its_flag(path):
    with pytest.raises(ValueError) as err:
        config_lib.validate(_config(**{path: BAD[path]}))
    assert f"--config.{path}={BAD[path]!r} must be" in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sampling.prompt_buckets": (192, 96, 320)}, "prompt_buckets=(192, 96, 320) must be increasing"),
        ({"sampling.gen_buckets": (0, 48)}, "--config.sampling.gen_buckets=(0, 48) must be increasing positive"),
        ({"mesh": (("data", 0), ("fsdp", -1), ("tensor", 1))}, "--config.mesh=(('data', 0), ('fsdp', -1), ('tens"),
        ({"mesh": (("data", -1), ("fsdp", -1), ("tensor", 1))}, "at most one -1"),
        ({"mesh": (("fsdp", -1), ("data", 1), ("tensor", 1))}, "the axes must be ('data', 'fsdp', 'tensor'), in that"),
        ({"logical_axis_rules": [["embed", "model"]]}, "--config.logical_axis_rules: [['embed', 'model']] name axes"),
        ({"cold_start.judge_batch_size": -1}, "--config.cold_start.judge_batch_size=-1 must be >= 0"),
        ({"data.source": "folder", "cold_start.judge_batch_size": 4}, "0 unless data.source is synthetic"),
        ({"reward.no_span": "half"}, "--config.reward.no_span='half' must be one of ('neutral', 'zero')"),
        ({"cold_start.judge_records": -1}, "--config.cold_start.judge_records=-1 must be >= 0"),
        (
            {"data.labels": ("anger", "disgust", "fear", "joy", "sadness", "surprise")},
            "synthetic images, whose vocabulary has no words for the labels ['joy', 'surprise']",
        ),
        ({"rl.pack_length": 360}, "--config.rl.pack_length=360 must hold the longest row, rl.max_prompt_len + "),
        ({"data.resize": "twice"}, "--config.data.resize='twice' must be one of ('one_stage', 'two_stage')"),
        ({"data.checkpoint_pixels": (5000, 4000)}, "--config.data.checkpoint_pixels=(5000, 4000) must be (min, max)"),
        ({"reward.reflection_cut": "left"}, "--config.reward.reflection_cut='left' must be one of ('unexpanded', 'exp"),
        (  # the tiny job's buckets reach 320 = rl.max_prompt_len, not an official image reflection's 637
            {"reward.compat": "emo_r3_code", "reward.reflection_cut": "unexpanded"},
            "--config.sampling.prompt_buckets=(96, 128, 192, 320) must reach 637 = 2 * rl.max_prompt_len - 3",
        ),
        (  # tiny: micro-batches of 16 rows, 4 x 8 = 32 rows per optimizer step
            {"rl.micro_batch_weighting": "per_device_mean", "rl.micro_batch_per_device": 3},
            "--config.rl.micro_batch_per_device=3 must be >= 1 and divide --config.rl.micro_batch=16",
        ),
        (
            {"rl.micro_batch_weighting": "per_device_mean", "rl.loss_devices": 3},
            "--config.rl.loss_devices=3 x --config.rl.micro_batch_per_device=4 must divide update_batch",
        ),
        (
            {"reward.w_accuracy": 0.0, "reward.w_coherence": 0.0, "reward.w_consistency": 0.0, "reward.w_format": 0.0},
            "no reward to learn from",
        ),
    ],
)
def test_fields_that_constrain_each_other(overrides, message):
    with pytest.raises(ValueError) as err:
        config_lib.validate(_config(**overrides))
    assert message in str(err.value)


def test_every_section_with_a_range_is_checked():
    """validate runs the sections of SECTION_CHECKS: a RANGES field of another section would
    never be checked."""
    sections = {path.split(".")[0] if "." in path else "" for path, _, _ in config_lib.RANGES}
    assert sections - set(config_lib.SECTION_CHECKS) == set()


def test_errors_of_several_sections_come_in_one_exception_one_line_each():
    c = _config(
        **{
            "workdir": "",
            "data.labels": ("anger",),
            "rl.kl_kind": "k9",
            "eval.best_by": "loss",
            "log.num_samples": -1,
        }
    )
    with pytest.raises(ValueError) as err:
        config_lib.validate(c)
    lines = str(err.value).splitlines()
    assert lines[0] == "bad config:" and len(lines) == 6, lines  # not stopped at the first section's error
    assert lines[1:] == [
        "  set --config.workdir (where checkpoints and logs go)",
        "  --config.data.labels=['anger'] must be at least two distinct labels",
        "  --config.rl.kl_kind='k9' must be one of ('k1', 'k2', 'k3', 'low_var_kl')",
        f"  --config.eval.best_by='loss' must be one of {config_lib.BEST_BY}",
        "  --config.log.num_samples=-1 must be >= 0",
    ]


def test_shape_only_validation_passes_a_3b_config_without_paths():
    """--compile_for and --dry_run read no data, weights or workdir: the 3b and 7b configs as
    they come (no workdir, hf_path or data.train) pass the shape checks, not the full ones."""
    for variant in ("3b", "7b"):
        c = get_config(variant)
        config_lib.validate_shapes(c)
        with pytest.raises(ValueError, match="set --config.workdir"):
            config_lib.validate(c)


def test_shape_only_validation_refuses_every_bad_shape_at_once_naming_the_flags():
    c = get_config("3b")
    c.rl.micro_batch, c.sampling.gen_buckets, c.model.preset = 0, (2048, 32), "13b"
    c.mesh = (("data", 0), ("fsdp", -1), ("tensor", 1))
    with pytest.raises(ValueError) as err:
        config_lib.validate_shapes(c)
    lines = str(err.value).splitlines()
    assert lines[0] == "bad config:" and len(lines) == 5, lines
    for flag in ("mesh", "model.preset", "rl.micro_batch", "sampling.gen_buckets"):
        assert sum(f"--config.{flag}=" in line for line in lines) == 1, (flag, lines)
    c = get_config("3b")
    c.gpu_memory_fraction = 0.0  # a run-time setting, not a shape: the full check's business
    config_lib.validate_shapes(c)


def test_a_bad_remat_policy_or_reference_dtype_names_its_flag():
    c = get_config("3b")
    c.model.remat_policy, c.rl.reference_dtype = "everything", "int8"
    with pytest.raises(ValueError) as err:
        config_lib.validate_shapes(c)
    assert "--config.model.remat_policy='everything' must be one of ('nothing', 'dots')" in str(err.value)
    assert "--config.rl.reference_dtype='int8' must be one of ('', 'float32', 'bfloat16')" in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rl.rollout_dtype": "float16"}, "--config.rl.rollout_dtype='float16' must be one of ('', 'float32', 'bfl"),
        (
            {"rl.rollout_dtype": "bfloat16", "rl.rollout_sharding": "model"},
            "--config.rl.rollout_sharding='model' must be one of ('fsdp', 'replicated', 'tensor')",
        ),
        (
            {"rl.rollout_sharding": "replicated"},
            "--config.rl.rollout_sharding='replicated' lays out a rollout copy, but --config.rl.rollout_dtype='' "
            "makes none",
        ),
        (
            {"rl.rollout_dtype": "bfloat16", "rl.recompute_old_logprobs": True, "rl.rollout_sharding": "tensor"},
            "--config.rl.rollout_sharding='tensor' splits the copy over the mesh's tensor axis, which is 1",
        ),
        (
            {"rl.rollout_dtype": "bfloat16", "rl.recompute_old_logprobs": False},
            "--config.rl.rollout_dtype='bfloat16' with --config.rl.recompute_old_logprobs=False: the old log-probs "
            "would be the bfloat16 copy's",
        ),
    ],
)
def test_bad_rollout_copy_settings_name_their_flag(overrides, message):
    with pytest.raises(ValueError) as err:
        config_lib.validate(_config(**overrides))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora.rank": 8, "lora.targets": ()}, "--config.lora.targets=() must be a non-empty selection of"),
        ({"lora.rank": 8, "lora.targets": ("mlp", "head")}, "--config.lora.targets=('mlp', 'head') must be"),
        ({"model.base_dtype": "int8"}, "--config.model.base_dtype='int8' must be one of"),
        ({"lora.rank": 8, "lora.dropout": -0.1}, "--config.lora.dropout=-0.1 must be in [0, 1)"),
        ({"lora.rank": 8, "lora.dropout": 1.0}, "--config.lora.dropout=1.0 must be in [0, 1)"),
        ({"lora.dropout": 0.05}, "--config.lora.dropout=0.05 with --config.lora.rank=0: dropout acts on the adapters'"),
        (
            {"lora.rank": 8, "rl.reference_dtype": "float32"},
            "--config.rl.reference_dtype='float32' with --config.lora.rank=8: the reference is the base itself",
        ),
    ],
)
def test_bad_lora_settings_name_their_flag(overrides, message):
    with pytest.raises(ValueError) as err:
        config_lib.validate(_config(**overrides))
    assert message in str(err.value)


def test_lora_puts_the_base_in_base_dtype_and_its_reference_is_the_base():
    c = _config(**{"lora.rank": 8, "lora.alpha": 32.0, "lora.targets": ("attention", "vision")})
    config_lib.validate(c)
    fields = config_lib.runtime_fields(c)
    assert (fields["param_dtype"], config_lib.reference_dtype(c)) == ("bfloat16", "bfloat16")
    assert (fields["lora_rank"], fields["lora_alpha"], fields["lora_targets"]) == (8, 32.0, ("attention", "vision"))
    full = config_lib.runtime_fields(_config())  # rank 0: model.param_dtype, base_dtype unread
    assert (full["param_dtype"], full["lora_rank"]) == ("float32", 0)


def test_rollout_copy_settings_that_are_valid():
    """A copy in the params' own dtype keeps the sampler's log-probs the policy's, so it needs
    no recompute; a tensor layout over a tensor axis of 2 (or a -1 one) is accepted."""
    config_lib.validate(_config(**{"rl.rollout_dtype": "float32", "rl.rollout_sharding": "replicated"}))
    mesh = (("data", 1), ("fsdp", -1), ("tensor", 2))
    overrides = {"rl.rollout_dtype": "bfloat16", "rl.recompute_old_logprobs": True, "rl.rollout_sharding": "tensor"}
    config_lib.validate(_config(mesh=mesh, **overrides))
    config_lib.validate(_config(mesh=(("data", 1), ("fsdp", 2), ("tensor", -1)), **overrides))


def test_the_compile_cache_defaults_to_the_workdir():
    c = _config()
    assert config_lib.compile_cache_dir(c) == "/tmp/unused/compile_cache"
    c.compile_cache_dir = "gs://bucket/cache"
    assert config_lib.compile_cache_dir(c) == "gs://bucket/cache"
    c.compile_cache_dir = "off"
    assert config_lib.compile_cache_dir(c) is None
    assert config_lib.compile_cache_dir(get_config("3b")) is None  # no workdir, nothing named


def test_negative_cold_start_steps_get_a_precise_message():
    with pytest.raises(ValueError) as err:
        config_lib.validate(_config(**{"cold_start.steps": -3}))
    assert "--config.cold_start.steps=-3 must be >= 0 (0: no cold start)" in str(err.value)
    assert "batch_size" not in str(err.value)


# ---------------------------------------------------------------- resume


def test_unchanged_config_resumes_silently():
    assert config_lib.resume_changes(_config().to_json(), _config()) == []


def test_extending_a_run_and_moving_files_may_change_on_resume():
    saved = _config().to_json()
    new = _config(
        **{
            "rl.steps": 60,
            "cold_start.steps": 100,
            "workdir": "/elsewhere",
            "checkpoint.keep": 5,
            "eval.every": 5,
            "log.samples_every": 1,
            "reward.threads": 8,
            "eval.datasets.emotion6.path": "/data/Emotion6",
        }
    )
    lines = config_lib.resume_changes(saved, new)
    assert "rl.steps: 30 -> 60 (may change on resume)" in lines
    assert "workdir: '/tmp/unused' -> '/elsewhere' (may change on resume)" in lines
    assert len(lines) == 8 and all(line.endswith("(may change on resume)") for line in lines)


def test_changed_settings_stop_the_resume_naming_fields_values_and_the_flag():
    saved = _config().to_json()
    new = _config(**{"rl.learning_rate": 1e-3, "rl.b1": 0.8, "rl.steps": 60})
    with pytest.raises(ValueError) as err:
        config_lib.resume_changes(saved, new)
    msg = str(err.value)
    assert "rl.b1: 0.9 -> 0.8; rl.learning_rate: 5e-05 -> 0.001." in msg
    assert "--accept_changes=rl.b1,rl.learning_rate" in msg and "--config.workdir" in msg
    assert "rl.steps" not in msg and "\n" not in msg
    # Accepting one still stops on the other; accepting both resumes and says so.
    with pytest.raises(ValueError, match=r"--accept_changes=rl\.b1;"):
        config_lib.resume_changes(saved, new, accepted=["rl.learning_rate"])
    lines = config_lib.resume_changes(saved, new, accepted=["rl.learning_rate", "rl.b1"])
    assert "rl.learning_rate: 5e-05 -> 0.001 (accepted by --accept_changes)" in lines


def test_a_field_referenced_elsewhere_is_refused_by_its_own_name():
    """eval.datasets.test.num_examples follows eval.num_examples: the eval set changed."""
    with pytest.raises(ValueError) as err:
        config_lib.resume_changes(_config().to_json(), _config(**{"eval.num_examples": 4}))
    assert "--accept_changes=eval.num_examples;" in str(err.value)


def test_a_field_only_one_side_has_is_reported_not_refused():
    saved = json.loads(_config().to_json())
    del saved["rl"]["dual_clip"]
    saved["rl"]["old_knob"] = 1
    lines = config_lib.resume_changes(json.dumps(saved), _config())
    assert lines == [
        "rl.dual_clip: (absent) -> 3.0 (field added or removed by a code change)",
        "rl.old_knob: 1 -> (absent) (field added or removed by a code change)",
    ]


def test_accepting_an_unknown_field_is_refused():
    config_lib.check_accepted(["rl.learning_rate"], _config())
    with pytest.raises(ValueError, match=r"--accept_changes=rl\.learning_rat: no config field \['rl\.learning_rat'\]"):
        config_lib.check_accepted(["rl.learning_rat"], _config())


@pytest.mark.parametrize("variant", ["3b", "7b"])
def test_the_real_variants_default_to_the_papers_settings(variant):
    c = get_config(variant)
    assert c.reward.compat == "emo_r3_code" and c.reward.reflection == "both"
    assert c.rl.recompute_old_logprobs is True
    assert (c.rl.max_prompt_len, c.rl.max_response_len) == (2048, 2048)
    # the rollouts sample in bf16, as the official run's vLLM does (tiny: with the training model)
    assert c.rl.rollout_dtype == "bfloat16" and get_config("tiny").rl.rollout_dtype == ""
    assert c.rl.rollout_sharding == {"3b": "replicated", "7b": "fsdp"}[variant]
    # the official update (EasyR1 examples/config.yaml:38, :53, :107; tiny keeps its own)
    assert (c.rl.micro_batch_weighting, c.rl.loss_devices, c.rl.micro_batch_per_device) == ("per_device_mean", 8, 4)
    assert c.rl.schedule == "stepwise_warmup_constant" and c.rl.warmup_steps == 0
    assert (c.eval.best_by, c.checkpoint.keep) == ("sampled_reward", 7)
    tiny = get_config("tiny")
    assert (tiny.rl.micro_batch_weighting, tiny.rl.schedule) == ("by_share", "constant")
    assert (tiny.eval.best_by, tiny.checkpoint.keep) == ("greedy_accuracy", 3)


@pytest.mark.parametrize(
    "field, value",
    [("reward.reflection", "true"), ("rl.micro_batch_weighting", "by_tokens"), ("eval.best_by", "loss")],
)
def test_a_choice_outside_its_registry_is_refused_naming_the_flag(field, value):
    c = _config()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=f"--config.{field}='{value}' must be one of"):
        config_lib.validate(c)


def test_random_weights_at_real_shapes_need_the_switch_and_the_real_tokenizer():
    c = get_config("3b")
    c.workdir, c.data.source = "/tmp/unused", "synthetic"
    with pytest.raises(ValueError, match=r"needs --config.hf_path=.*or --config.model.init_random=True"):
        config_lib.validate(c)
    c.model.init_random = True
    config_lib.validate(c)
    assert c.builtin_tokenizer == "qwen"  # the 151,665-id tokenizer the 3b preset's ids belong to
    special = {t: 151643 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    cfg = config_lib.model_config(c, 151665, special)
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.vocab_size) == (2048, 36, 151936)
    assert cfg.image_token_id == special["<|image_pad|>"]
    c.builtin_tokenizer = "gpt2"
    with pytest.raises(ValueError, match=r"--config.builtin_tokenizer='gpt2' must be one of \('test', 'qwen'\)"):
        config_lib.validate(c)


def test_the_3b_vision_buckets_hold_the_largest_two_stage_image():
    """Two stages round an image's sides to the nearest multiple of 28, past data.max_pixels:
    a vision bucket between one max_pixels image (21,396 patches) and the largest two-stage
    image (4 x 5,838 = 23,352: 154 x 27,235 pixels -> 168 x 27,244) is refused."""
    c = get_config("3b")
    c.model.vision_buckets = (1024, 22528)
    with pytest.raises(
        ValueError,
        match=r"vision_buckets=\(1024, 22528\) must reach one image at data.max_pixels "
        r"\(23352 patches, data.resize='two_stage'\)",
    ):
        config_lib.validate_shapes(c)
    c.data.resize = "one_stage"  # ours stays within max_pixels: 4 x 5,349 patches
    config_lib.validate_shapes(c)


def test_lora_dropout_is_a_training_setting_not_the_architecture():
    """Another lora.dropout on resume is refused like rl.learning_rate (accepted with
    --accept_changes=lora.dropout), never as another model: the ModelConfig, and with it the
    architecture each checkpoint records, is the same whatever the dropout."""
    lora = {"lora.rank": 8}
    saved = _config(**lora).to_json()
    new = _config(**lora, **{"lora.dropout": 0.1})
    config_lib.validate(new)
    with pytest.raises(ValueError, match=r"lora\.dropout: 0\.0 -> 0\.1\. .*--accept_changes=lora\.dropout;"):
        config_lib.resume_changes(saved, new)
    assert config_lib.resume_changes(saved, new, accepted=["lora.dropout"]) == [
        "lora.dropout: 0.0 -> 0.1 (accepted by --accept_changes)"
    ]
    assert config_lib.runtime_fields(new) == config_lib.runtime_fields(_config(**lora))
