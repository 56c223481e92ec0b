"""Checks a run config at start-up and turns it into the objects the run needs.

Every problem is reported before anything is built, naming the flag to set.
"""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from emor3_jax.data.splits import SOURCES
from emor3_jax.models.qwen25_vl.config import ModelConfig, TextConfig, VisionConfig


def validate(c: ConfigDict) -> None:
    """Raises ValueError listing every bad or missing value of `c`."""
    errors = []

    def need(cond: bool, message: str):
        if not cond:
            errors.append(message)

    need(bool(c.workdir), "set --config.workdir (where checkpoints and logs go)")
    if c.variant != "tiny":
        need(bool(c.hf_path), f"variant {c.variant!r} needs --config.hf_path=<local Hugging Face checkpoint dir>")
    if c.hf_path:
        need(
            os.path.isfile(os.path.join(c.hf_path, "config.json")),
            f"--config.hf_path={c.hf_path!r} has no config.json (expected a local HF checkpoint dir)",
        )
    if c.tokenizer_path:
        need(os.path.isdir(c.tokenizer_path), f"--config.tokenizer_path={c.tokenizer_path!r} is not a directory")
    need(c.data.source in SOURCES, f"--config.data.source={c.data.source!r} must be one of {SOURCES}")
    if c.data.source != "synthetic":
        for split in ("train", "test"):
            path = c.data[split]
            need(
                bool(path) and os.path.exists(path),
                f"--config.data.{split}={path!r} does not exist (the {c.data.source} data for the {split} split)",
            )
            if c.data.source == "folder":
                ann = c.data[f"annotations_{split}"]
                need(
                    bool(ann) and os.path.isfile(ann),
                    f"--config.data.annotations_{split}={ann!r}: the JSONL/CSV annotation file is missing",
                )
    need(
        len(c.data.labels) >= 2 and len(set(c.data.labels)) == len(c.data.labels),
        f"--config.data.labels={list(c.data.labels)} must be at least two distinct labels",
    )
    need(0 <= c.data.max_bad_fraction < 1, f"--config.data.max_bad_fraction={c.data.max_bad_fraction} not in [0, 1)")
    share = c.data.unfaithful_share
    need(
        0 <= share <= 1 and (share == 0 or c.data.source == "synthetic"),
        f"--config.data.unfaithful_share={share} must be in [0, 1], and 0 unless data.source is synthetic",
    )
    need(c.data.min_pixels <= c.data.max_pixels, "--config.data.min_pixels must be <= max_pixels")
    rl = c.rl
    need(rl.num_generations >= 2, f"--config.rl.num_generations={rl.num_generations}: GRPO needs >= 2 per prompt")
    need(
        rl.rollout_batch >= 1 and rl.update_batch >= 1 and rl.rollout_batch % rl.update_batch == 0,
        f"--config.rl.rollout_batch={rl.rollout_batch} must be a multiple of update_batch={rl.update_batch}",
    )
    rows = rl.update_batch * rl.num_generations
    need(
        rl.micro_batch >= 1 and rows % rl.micro_batch == 0,
        f"--config.rl.micro_batch={rl.micro_batch} must divide update_batch * num_generations = {rows}",
    )
    need(rl.learning_rate > 0, f"--config.rl.learning_rate={rl.learning_rate} must be > 0")
    need(rl.schedule in ("constant", "warmup_constant", "cosine"), f"--config.rl.schedule={rl.schedule!r} unknown")
    need(rl.advantage in ("grpo", "drgrpo", "rloo"), f"--config.rl.advantage={rl.advantage!r} unknown")
    need(rl.loss_mode in ("token", "seq"), f"--config.rl.loss_mode={rl.loss_mode!r} must be token or seq")
    need(rl.kl_kind in ("k1", "k2", "k3", "low_var_kl"), f"--config.rl.kl_kind={rl.kl_kind!r} unknown")
    need(
        0 <= rl.clip_low < 1 and rl.clip_high >= 0 and rl.dual_clip > 1,
        "--config.rl.clip_low in [0, 1), clip_high >= 0 and dual_clip > 1 are required",
    )
    need(rl.temperature > 0 and 0 < rl.top_p <= 1, "--config.rl.temperature > 0 and top_p in (0, 1] are required")
    need(
        max(c.sampling.prompt_buckets) >= rl.max_prompt_len,
        f"--config.sampling.prompt_buckets={tuple(c.sampling.prompt_buckets)} must reach rl.max_prompt_len",
    )
    need(
        max(c.sampling.gen_buckets) >= rl.max_response_len,
        f"--config.sampling.gen_buckets={tuple(c.sampling.gen_buckets)} must reach rl.max_response_len",
    )
    need(
        c.sampling.max_rows == 0 or c.sampling.max_rows >= rl.num_generations,
        f"--config.sampling.max_rows={c.sampling.max_rows} must be 0 (all at once) or >= rl.num_generations",
    )
    need(
        c.rl.steps > 0 or c.rl.epochs > 0 or c.cold_start.steps > 0,
        "nothing to train: set --config.cold_start.steps, --config.rl.steps or --config.rl.epochs",
    )
    r = c.reward
    need(r.compat in ("robust", "emo_r3_code"), f"--config.reward.compat={r.compat!r} must be robust or emo_r3_code")
    need(r.coherence_target in ("label", "own_answer"), f"--config.reward.coherence_target={r.coherence_target!r}")
    need(r.judge in ("policy", "reference"), f"--config.reward.judge={r.judge!r} must be policy or reference")
    need(c.cold_start.steps >= 0 and c.cold_start.batch_size >= 1, "--config.cold_start.steps/batch_size invalid")
    need(c.checkpoint.every >= 1 and c.checkpoint.keep >= 1, "--config.checkpoint.every and keep must be >= 1")
    need(c.eval.every >= 1 and c.eval.batch_size >= 1, "--config.eval.every and batch_size must be >= 1")
    if errors:
        raise ValueError("bad config:\n  " + "\n  ".join(errors))


def validate_eval(c: ConfigDict, names: list[str], samples: int) -> None:
    """Raises ValueError listing every bad value an evaluation of data sets `names` with
    `samples` sampled runs would use."""
    errors = []

    def need(cond: bool, message: str):
        if not cond:
            errors.append(message)

    need(bool(names), "--datasets: name at least one data set")
    for name in names:
        if name not in c.eval.datasets:
            errors.append(f"--datasets: no data set {name!r} in config.eval.datasets (have {sorted(c.eval.datasets)})")
            continue
        ds, flag = c.eval.datasets[name], f"--config.eval.datasets.{name}"
        need(ds.source in SOURCES, f"{flag}.source={ds.source!r} must be one of {SOURCES}")
        if ds.source == "synthetic":
            need(ds.split in ("train", "test"), f"{flag}.split={ds.split!r} must be train or test (synthetic)")
            need(ds.num_examples > 0, f"{flag}.num_examples={ds.num_examples}: synthetic needs how many to draw")
        elif ds.source in SOURCES:
            need(bool(ds.path) and os.path.exists(ds.path), f"{flag}.path={ds.path!r} does not exist")
        if ds.source == "folder":
            need(
                bool(ds.annotations) and os.path.isfile(ds.annotations),
                f"{flag}.annotations={ds.annotations!r}: the JSONL/CSV annotation file is missing",
            )
        if ds.source == "emoset118k":
            need(ds.split in ("train", "val", "test"), f"{flag}.split={ds.split!r} must be train, val or test")
        labels = list(ds.labels)
        need(
            len(labels) >= 2
            and len(set(labels)) == len(labels)
            and all(x and x == x.strip().lower() and "," not in x for x in labels),
            f"{flag}.labels={labels} must be at least two distinct lower-case labels without commas",
        )
        need(ds.num_examples >= 0, f"{flag}.num_examples={ds.num_examples} must be >= 0 (0: all)")
    need(samples >= 1, f"--samples={samples} must be >= 1")
    need(c.eval.batch_size >= 1, f"--config.eval.batch_size={c.eval.batch_size} must be >= 1")
    need(
        c.eval.sampled_temperature > 0 and 0 < c.eval.sampled_top_p <= 1,
        "--config.eval.sampled_temperature > 0 and sampled_top_p in (0, 1] are required",
    )
    need(
        max(c.sampling.gen_buckets) >= c.rl.max_response_len,
        f"--config.sampling.gen_buckets={tuple(c.sampling.gen_buckets)} must reach rl.max_response_len",
    )
    need(c.reward.compat in ("robust", "emo_r3_code"), f"--config.reward.compat={c.reward.compat!r} unknown")
    if c.tokenizer_path:
        need(os.path.isdir(c.tokenizer_path), f"--config.tokenizer_path={c.tokenizer_path!r} is not a directory")
    if errors:
        raise ValueError("bad evaluation settings:\n  " + "\n  ".join(errors))


def runtime_fields(c: ConfigDict) -> dict:
    """The ModelConfig fields the run chooses (dtypes, attention, remat), not the checkpoint."""
    return dict(
        param_dtype=c.model.param_dtype,
        compute_dtype=c.model.compute_dtype,
        attention_impl=c.model.attention_impl,
        remat=c.model.remat,
    )


def model_config(c: ConfigDict, vocab_size: int, special_ids: dict[str, int]) -> ModelConfig:
    """The architecture: from the HF checkpoint, or the tiny one sized to the tokenizer."""
    runtime = runtime_fields(c)
    if c.hf_path:
        return ModelConfig.from_hf_dir(c.hf_path, **runtime)
    t = c.model.tiny
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=t.num_layers,
        num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads,
        mrope_section=tuple(t.mrope_section),
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=special_ids["<|im_end|>"],
    )
    vision = VisionConfig(
        depth=t.vision_depth,
        hidden_size=t.vision_hidden_size,
        intermediate_size=t.vision_intermediate_size,
        num_heads=t.vision_heads,
        out_hidden_size=t.hidden_size,
        fullatt_block_indexes=(t.vision_depth - 1,),
    )
    return ModelConfig(
        text=text,
        vision=vision,
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        **runtime,
    )
