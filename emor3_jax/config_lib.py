"""Checks a run config at start-up and turns it into the objects the run needs.

Every problem is reported before anything is built, naming the flag to set: `validate` runs one
function per config section (SECTION_CHECKS) and lists all their messages at once. A hub id in
hf_path / tokenizer_path, or a hub data set's split in data.train / data.test
(`fuyyy74/EmoSet2k@train`), is downloaded by `resolve_hub_ids`, which the entry points call
before they validate; validation itself downloads nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from etils import epath
from ml_collections import ConfigDict

from emor3_jax.core import paths
from emor3_jax.core.sharding import MESH_AXES
from emor3_jax.data.encode import CUTS
from emor3_jax.data.processing import RESIZES, largest_image_tokens
from emor3_jax.data.sources import SOURCES, overlap, split_files
from emor3_jax.data.sources import cold_start as cold_start_data
from emor3_jax.data.synthetic import DETAILS, FEELINGS
from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.task import JUDGES, longest_reflection_prompt
from emor3_jax.models import lora
from emor3_jax.models.api import KV_DTYPES, ModelConfig, preset
from emor3_jax.models.qwen25_vl.config import DTYPES
from emor3_jax.models.qwen25_vl.ragged_decode import LANES
from emor3_jax.models.qwen25_vl.stack import REMAT_POLICIES
from emor3_jax.models.qwen25_vl.text import DECODE_IMPLS
from emor3_jax.rl import grpo, rollout_weights
from emor3_jax.rl.advantages import ESTIMATORS
from emor3_jax.rl.experience import MICRO_BATCH_WEIGHTINGS
from emor3_jax.rl.learner import SCHEDULES

# The validation value that picks the best checkpoint (eval.best_by), read by trainer._validate:
# greedy or sampled (eval.sampled_temperature / top_p) held-out accuracy, or the sampled
# validation's mean reward without reflection (the official run's validation score).
BEST_BY = ("greedy_accuracy", "sampled_accuracy", "sampled_reward")
# model.preset: the architecture without hf_path (models.api.preset); builtin_tokenizer: the
# tokenizer built into the workdir without tokenizer_path / hf_path (factory.load_tokenizer).
PRESETS = ("tiny", "3b", "7b")
BUILTIN_TOKENIZERS = ("test", "qwen")


def _positive(x) -> bool:
    return x > 0


def _at_least(low):
    return lambda x: x >= low


def _open_unit(x) -> bool:
    return 0 < x < 1


def _unit(x) -> bool:
    return 0 < x <= 1


# (field, test, rule): the range of each numeric field of configs/qwen_vl.py on its own; each
# section's function in SECTION_CHECKS checks the fields that constrain each other (batch sizes,
# pixels, buckets) separately.
RANGES = (
    ("seed", _at_least(0), "must be >= 0"),
    ("gpu_memory_fraction", _unit, "must be in (0, 1] (the share of each GPU's memory XLA preallocates)"),
    ("data.synthetic_train", _at_least(1), "must be >= 1 (records of the synthetic train split)"),
    ("data.synthetic_test", _at_least(1), "must be >= 1 (records of the synthetic test split)"),
    ("data.image_size", _at_least(28), "must be >= 28 (one merged 2x2 patch of 14 pixels)"),
    ("data.min_pixels", _at_least(28 * 28), "must be >= 784 (one merged 2x2 patch of 14 pixels)"),
    ("data.max_pixels", _at_least(28 * 28), "must be >= 784 (one merged 2x2 patch of 14 pixels)"),
    ("lora.rank", _at_least(0), "must be >= 0 (0: full fine-tuning)"),
    ("lora.alpha", _positive, "must be > 0 (the adapters' term is scaled by alpha / rank)"),
    ("lora.lr_multiplier", _positive, "must be > 0 (a LoRA run's learning rates are the phases' times it)"),
    ("lora.dropout", lambda x: 0 <= x < 1, "must be in [0, 1) (the probability an adapter's input element is zeroed)"),
    ("cold_start.steps", _at_least(0), "must be >= 0 (0: no cold start)"),
    ("cold_start.batch_size", _at_least(1), "must be >= 1"),
    ("cold_start.learning_rate", _positive, "must be > 0"),
    ("cold_start.warmup_steps", _at_least(0), "must be >= 0"),
    ("rl.steps", _at_least(0), "must be >= 0 (0: derive from rl.epochs)"),
    ("rl.epochs", _at_least(0), "must be >= 0 (0 with rl.steps=0: no GRPO)"),
    ("rl.learning_rate", _positive, "must be > 0"),
    ("rl.warmup_steps", _at_least(0), "must be >= 0"),
    ("rl.weight_decay", _at_least(0), "must be >= 0"),
    ("rl.b1", _open_unit, "must be in (0, 1)"),
    ("rl.b2", _open_unit, "must be in (0, 1)"),
    ("rl.grad_clip", _positive, "must be > 0 (the global gradient norm to clip to)"),
    ("rl.kl_coef", _at_least(0), "must be >= 0 (0: no KL penalty)"),
    ("rl.clip_low", lambda x: 0 <= x < 1, "must be in [0, 1)"),
    ("rl.clip_high", _at_least(0), "must be >= 0"),
    ("rl.dual_clip", lambda x: x > 1, "must be > 1"),
    ("rl.temperature", _positive, "must be > 0"),
    ("rl.top_p", _unit, "must be in (0, 1]"),
    ("rl.max_prompt_len", _at_least(1), "must be >= 1"),
    ("sampling.prefill_group", _at_least(0), "must be >= 0 (prompts per prefill group; 0: sampling.max_rows // n)"),
    ("sampling.page_size", _at_least(0), "must be >= 0 (entries per KV cache page; 0: one contiguous row per slot)"),
    ("sampling.kv_pages", _at_least(0), "must be >= 0 (pages in the KV cache pool; 0: enough that no row waits)"),
    ("rl.max_response_len", _at_least(1), "must be >= 1"),
    ("rl.max_skipped_steps", _at_least(0), "must be >= 0 (0: a non-finite gradient stops the run)"),
    ("reward.w_accuracy", _at_least(0), "must be >= 0"),
    ("reward.w_coherence", _at_least(0), "must be >= 0"),
    ("reward.w_consistency", _at_least(0), "must be >= 0"),
    ("reward.w_format", _at_least(0), "must be >= 0"),
    ("reward.reflection_max_tokens", _at_least(1), "must be >= 1"),
    ("reward.reflection_temperature", _positive, "must be > 0"),
    ("reward.reflection_top_p", _unit, "must be in (0, 1]"),
    ("reward.threads", _at_least(1), "must be >= 1"),
    ("eval.every", _at_least(1), "must be >= 1 (GRPO steps between evaluations)"),
    ("eval.num_examples", _at_least(1), "must be >= 1 (held-out records to evaluate)"),
    ("eval.batch_size", _at_least(1), "must be >= 1"),
    ("eval.sampled_temperature", _positive, "must be > 0"),
    ("eval.sampled_top_p", _unit, "must be in (0, 1]"),
    ("checkpoint.every", _at_least(1), "must be >= 1 (steps between checkpoints)"),
    ("checkpoint.keep", _at_least(1), "must be >= 1 (checkpoints kept)"),
    ("guard.max_norm_ratio", lambda x: x > 1, "must be > 1 (factor one step may change the parameter norm by)"),
    ("guard.min_logprob", lambda x: x < 0, "must be < 0 (the lowest response-token log-prob allowed)"),
    ("log.samples_every", _at_least(1), "must be >= 1 (GRPO steps between logged samples)"),
    ("log.num_samples", _at_least(0), "must be >= 0"),
)


def _get(c: ConfigDict, path: str):
    for key in path.split("."):
        c = c[key]
    return c


# A Hugging Face hub id: owner/name (huggingface_hub's rules for the characters), no more parts.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# What a snapshot of each flag's repo downloads: the model (config, weights, tokenizer,
# processor), the tokenizer alone, or a data set's parquet files (both splits: one download).
# Skips other formats (*.bin, *.pt, *.gguf) of the weights.
HUB_FILES = {
    "hf_path": ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
    "tokenizer_path": ["*.json", "*.txt", "*.model", "*.jinja"],
    "data.train": ["*.parquet"],
    "data.test": ["*.parquet"],
}


def is_hub_id(value: str) -> bool:
    """Whether `value` reads as a Hugging Face hub id (`Qwen/Qwen2.5-VL-3B-Instruct`) and is not
    a local path that exists."""
    return bool(_HUB_ID.match(value)) and ".." not in value and not os.path.exists(value)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE


def hub_snapshot(repo_id: str, flag: str) -> str:
    """The local directory of hub repo `repo_id` (huggingface_hub's snapshot_download into the
    HF cache: downloaded once, then read from the cache): a model repo for hf_path /
    tokenizer_path, a data set repo for data.train / data.test. Offline (HF_HUB_OFFLINE=1) it
    reads the cache alone. Raises ValueError in one line naming --config.<flag> when the repo is
    neither cached nor reachable, or not on the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline, data = _hub_offline(), flag.startswith("data.")
    local = f"give a local {'snapshot folder' if data else 'checkpoint dir'} with --config.{flag}=/local/dir"
    local += "@<split>" if data else ""
    try:
        return snapshot_download(
            repo_id,
            repo_type="dataset" if data else "model",
            allow_patterns=HUB_FILES[flag],
            local_files_only=offline,
        )
    except GatedRepoError as e:
        raise ValueError(
            f"--config.{flag}={repo_id!r}: the hub repo is gated; accept its terms and log in (hf auth login, or "
            f"HF_TOKEN), or {local}"
        ) from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"--config.{flag}={repo_id!r}: no such repo on the Hugging Face hub; {local}") from e
    except (LocalEntryNotFoundError, ConnectionError, OSError) as e:
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub cannot be reached (no network?)"
        raise ValueError(
            f"--config.{flag}={repo_id!r} is a Hugging Face hub id that is not in the local cache and {why}; "
            f"{local} (or download it once where the hub can be reached)"
        ) from e


def _hub_data_id(c: ConfigDict, flag: str) -> tuple[str, str] | None:
    """(repo id, split) when --config.<flag> (data.train / data.test) names a split of a hub data
    set, `owner/name@split` (emoset_parquet data); else None."""
    path, split = split_files.parse(_get(c, flag))
    if c.data.source != "emoset_parquet" or split is None or "://" in path or not is_hub_id(path):
        return None
    return path, split


def resolve_hub_ids(c: ConfigDict, data_flags: Sequence[str] = ("data.train", "data.test")) -> None:
    """Replaces a hub id in c.hf_path / c.tokenizer_path by its local snapshot directory, and a
    hub data set's split `owner/name@split` in `data_flags` by `<its snapshot>@split`
    (hub_snapshot), so everything after reads local files as before; a local path (or a URI) is
    left as it is. The one place hub ids are resolved (downloaded): the entry points
    (train.main, trainer.Run.checked, eval.run_eval) call it before they validate. Every flag
    that cannot be resolved is named in one ValueError (a data set repo once, for its first flag:
    data.train and data.test name the same one)."""
    errors = []
    for flag in ("hf_path", "tokenizer_path"):
        value = c[flag]
        if value and not os.path.isdir(value) and "://" not in value and is_hub_id(value):
            try:
                c[flag] = hub_snapshot(value, flag)
            except ValueError as e:
                errors.append(str(e))
    snapshots = {}  # repo id -> its snapshot, or None when it failed (named once, for the first flag)
    for flag in data_flags:
        hub = _hub_data_id(c, flag)
        if hub and hub[0] not in snapshots:
            try:
                snapshots[hub[0]] = hub_snapshot(hub[0], flag)
            except ValueError as e:
                snapshots[hub[0]] = None
                errors.append(str(e))
        if hub and snapshots[hub[0]]:
            c.data[flag.split(".")[1]] = f"{snapshots[hub[0]]}@{hub[1]}"
    if errors:
        raise ValueError(errors[0] if len(errors) == 1 else "\n".join(errors))


def _model_path_problem(flag: str, value: str) -> str | None:
    """Why `value` of --config.<flag> (after resolve_hub_ids) is unusable, or None."""
    if epath.Path(value).is_dir():  # local or a URI (gs://...)
        if flag == "hf_path" and not epath.Path(value, "config.json").is_file():
            return f"--config.hf_path={value!r} has no config.json (expected a Hugging Face checkpoint dir)"
        return None
    if "://" not in value and is_hub_id(value):  # only a caller that skipped resolve_hub_ids gets here
        return (
            f"--config.{flag}={value!r} is a Hugging Face hub id not yet resolved to a local snapshot "
            f"(config_lib.resolve_hub_ids, run before validation); or give a local path with --config.{flag}=/local/dir"
        )
    return (
        f"--config.{flag}={value!r} is neither a local directory nor a Hugging Face hub id (owner/name, e.g. "
        f"Qwen/Qwen2.5-VL-3B-Instruct) nor an existing gs:// directory; give a local path with "
        f"--config.{flag}=/local/dir"
    )


def _listing(what: str, errors: list[str]) -> str:
    """One line for one problem, one line each for several."""
    return f"{what}: {errors[0]}" if len(errors) == 1 else f"{what}:\n  " + "\n  ".join(errors)


def _failed(*checks: tuple[bool, str]) -> list[str]:
    """The message of each (condition, message) whose condition is False."""
    return [message for ok, message in checks if not ok]


def _choices(c: ConfigDict, flags: Sequence[tuple[str, Sequence]]) -> list[str]:
    """A message for each (flag, registry) whose value in `c` is not one of the registry's names."""
    return [
        f"--config.{flag}={_get(c, flag)!r} must be one of {tuple(registry)}"
        for flag, registry in flags
        if _get(c, flag) not in registry
    ]


def _section(path: str) -> str:
    """The section a field is in: "rl" for rl.steps, "" for a top-level field (seed)."""
    return path.split(".")[0] if "." in path else ""


def _out_of_range(c: ConfigDict, section: str) -> list[str]:
    """A message for each RANGES field of `section` whose value in `c` breaks its rule."""
    return [
        f"--config.{path}={_get(c, path)!r} {rule}"
        for path, ok, rule in RANGES
        if _section(path) == section and not ok(_get(c, path))
    ]


def _top_level(c: ConfigDict) -> list[str]:
    """The run's files: its workdir, tokenizer, weights and data paths, and something to train."""
    errors = _failed((bool(c.workdir), "set --config.workdir (where checkpoints and logs go)"))
    errors += _choices(c, [("builtin_tokenizer", BUILTIN_TOKENIZERS)])
    for flag in ("hf_path", "tokenizer_path"):
        problem = _model_path_problem(flag, c[flag]) if c[flag] else None
        errors += [problem] if problem else []
    return (
        errors
        + _failed(
            (
                c.model.preset == "tiny" or bool(c.hf_path) or c.model.init_random,
                f"variant {c.variant!r} needs --config.hf_path=<local Hugging Face checkpoint dir or hub id, e.g. "
                "Qwen/Qwen2.5-VL-3B-Instruct> (or --config.model.init_random=True: random weights at the "
                f"{c.model.preset} preset's shapes)",
            ),
            (
                c.rl.steps > 0 or c.rl.epochs > 0 or c.cold_start.steps > 0,
                "nothing to train: set --config.cold_start.steps, --config.rl.steps or --config.rl.epochs",
            ),
        )
        + _data_files(c)
    )


def _rule_axes(rule) -> tuple:
    """The mesh axes a logical_axis_rules entry [logical, None | axis | (axes...)] maps to."""
    target = rule[1]
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _mesh(c: ConfigDict) -> list[str]:
    """mesh and logical_axis_rules: the axes in order, their sizes, rules that name mesh axes."""
    mesh = tuple(tuple(a) for a in c.mesh)
    names, sizes = tuple(name for name, _ in mesh), [size for _, size in mesh]
    bad_rules = [list(rule) for rule in c.logical_axis_rules if set(_rule_axes(rule)) - set(MESH_AXES)]
    return _failed(
        (names == MESH_AXES, f"--config.mesh={mesh}: the axes must be {MESH_AXES}, in that order"),
        (
            all(x >= 1 or x == -1 for x in sizes) and sizes.count(-1) <= 1,
            f"--config.mesh={mesh}: sizes must be >= 1, and at most one -1 (the rest)",
        ),
        (not bad_rules, f"--config.logical_axis_rules: {bad_rules} name axes outside the mesh's {MESH_AXES}"),
    )


def _model(c: ConfigDict) -> list[str]:
    """model: the preset, vision buckets that hold an image (the weights: _top_level)."""
    d = c.data
    try:  # the largest image data.resize makes: two_stage rounds past data.max_pixels
        pixels, bounds = (d.min_pixels, d.max_pixels), tuple(d.checkpoint_pixels)
        image_patches = 4 * largest_image_tokens(d.resize, pixels, bounds if d.resize == "two_stage" else pixels)
    except (ValueError, TypeError):  # bad data.* values, which _data reports
        image_patches = 0
    return _choices(c, [("model.preset", PRESETS), ("model.remat_policy", REMAT_POLICIES)]) + _failed(
        (
            not c.model.vision_buckets or max(c.model.vision_buckets) >= image_patches,
            f"--config.model.vision_buckets={tuple(c.model.vision_buckets)} must reach one image at "
            f"data.max_pixels ({image_patches} patches, data.resize={d.resize!r})",
        ),
    )


def _lora(c: ConfigDict) -> list[str]:
    """lora: targets the adapters can take, dropout only with adapters, the base's dtype, the
    reference (the base itself) in it (rank, alpha and dropout's range: RANGES)."""
    lo = c.lora
    unknown = sorted(set(lo.targets) - set(lora.TARGETS))
    return _failed(
        (
            not lo.rank or (bool(lo.targets) and not unknown),
            f"--config.lora.targets={tuple(lo.targets)} must be a non-empty selection of {tuple(lora.TARGETS)}",
        ),
        (
            lo.rank or not lo.dropout,
            f"--config.lora.dropout={lo.dropout} with --config.lora.rank=0: dropout acts on the adapters' inputs, "
            "and full fine-tuning has none; set lora.rank > 0 or lora.dropout=0",
        ),
        (
            c.model.base_dtype in DTYPES,
            f"--config.model.base_dtype={c.model.base_dtype!r} must be one of {DTYPES}",
        ),
        (
            not lo.rank or c.rl.reference_dtype in ("", c.model.base_dtype),
            f"--config.rl.reference_dtype={c.rl.reference_dtype!r} with --config.lora.rank={lo.rank}: the reference "
            f"is the base itself, in --config.model.base_dtype={c.model.base_dtype!r}; set rl.reference_dtype='' "
            "(or to the base's dtype)",
        ),
    )


def _data_path_problem(flag: str, source: str, path: str, what: str) -> str | None:
    """Why `path`, --config.<flag> (`what` it holds, for the message), is unusable for `source`,
    or None. emoset_parquet takes a file, a folder read whole, or one split of either
    (`<path>@<split>`, split_files)."""
    if source != "emoset_parquet" or not path:
        ok = bool(path) and epath.Path(path).exists()
        return None if ok else f"--config.{flag}={path!r} does not exist ({what})"
    folder, split = split_files.parse(path)
    if split is not None and "://" not in folder and is_hub_id(folder):  # a caller that skipped resolve_hub_ids
        return (
            f"--config.{flag}={path!r} is a Hugging Face hub data set not yet resolved to a local snapshot "
            "(config_lib.resolve_hub_ids, run before validation)"
        )
    try:
        split_files.parquet_source_files(path)
    except (FileNotFoundError, ValueError) as e:
        return f"--config.{flag}={path!r} ({what}): {e}"
    return None


def _data_files(c: ConfigDict) -> list[str]:
    """data: the files the source reads (train, test, annotations), that the two splits share
    none (unless data.allow_train_test_overlap), and the cold start's records."""
    errors, d = [], c.data
    if d.source != "synthetic":
        for split in ("train", "test"):
            path, ann = d[split], d[f"annotations_{split}"]
            problem = _data_path_problem(f"data.{split}", d.source, path, f"the {d.source} data for the {split} split")
            errors += [problem] if problem else []
            if d.source == "folder":
                errors += _failed(
                    (
                        bool(ann) and epath.Path(ann).is_file(),
                        f"--config.data.annotations_{split}={ann!r}: the JSONL/CSV annotation file is missing",
                    )
                )
        if not errors and not d.allow_train_test_overlap:
            files = [overlap.split_data_files(d.source, d[s], d[f"annotations_{s}"]) for s in ("train", "test")]
            shared = overlap.shared_files(*files)
            errors += [overlap.shared_files_message(shared)] if shared else []
    if d.cold_start:
        path = d.cold_start
        errors += _failed(
            (
                epath.Path(path).is_dir() or (epath.Path(path).is_file() and path.endswith(cold_start_data.SUFFIXES)),
                f"--config.data.cold_start={path!r} must be an existing .jsonl, .json (an array) or .parquet file "
                "(or a dir of .parquet) with image, problem and response (or ShareGPT-style messages) per record",
            ),
            (
                c.cold_start.steps > 0,
                f"--config.data.cold_start={path!r} is set but --config.cold_start.steps=0: set the steps to train "
                "on it",
            ),
        )
    return errors


def _data(c: ConfigDict) -> list[str]:
    """data: the source, the labels, bad-record tolerance, image sizes (its files: _top_level)."""
    d, sides, bounds = c.data, tuple(c.data.image_sides), tuple(c.data.checkpoint_pixels)
    choices = [("data.source", SOURCES), ("data.resize", RESIZES), ("data.synthetic_detail", DETAILS)]
    return _choices(c, choices) + _failed(
        (
            len(bounds) == 2 and 28 * 28 <= bounds[0] <= bounds[1],
            f"--config.data.checkpoint_pixels={bounds} must be (min, max) pixels with 784 <= min <= max (the "
            "checkpoint processor's, which data.resize='two_stage' rounds within)",
        ),
        (
            len(d.labels) >= 2 and len(set(d.labels)) == len(d.labels),
            f"--config.data.labels={list(d.labels)} must be at least two distinct labels",
        ),
        (0 <= d.max_bad_fraction < 1, f"--config.data.max_bad_fraction={d.max_bad_fraction} not in [0, 1)"),
        (0 <= d.unfaithful_share <= 1, f"--config.data.unfaithful_share={d.unfaithful_share} must be in [0, 1]"),
        (
            d.source == "synthetic" or d.synthetic_detail == "size",
            f"--config.data.synthetic_detail={d.synthetic_detail!r}: only the synthetic source draws a detail "
            "(leave it 'size')",
        ),
        (d.min_pixels <= d.max_pixels, "--config.data.min_pixels must be <= max_pixels"),
        (
            sides == () or (len(sides) == 2 and 28 <= sides[0] <= sides[1]),
            f"--config.data.image_sides={sides} must be () or (min, max) pixels with 28 <= min <= max",
        ),
    )


def _cold_start(c: ConfigDict) -> list[str]:
    """cold_start: the judge's teaching batch and the judge check after the cold start."""
    rows, judge = c.cold_start.judge_batch_size, c.cold_start.judge_records
    unknown = sorted(set(c.data.labels) - set(FEELINGS))
    return _failed(
        (
            rows >= 0 and (rows == 0 or (c.data.source == "synthetic" and not c.data.cold_start)),
            f"--config.cold_start.judge_batch_size={rows} must be >= 0, and 0 unless data.source is synthetic and "
            "data.cold_start is unset (the reflection questions are written from the synthetic truth; the tiny "
            "config teaches its judge by default: pass --config.cold_start.judge_batch_size=0 for other data)",
        ),
        (judge >= 0, f"--config.cold_start.judge_records={judge} must be >= 0 (0: no judge check)"),
        (
            judge == 0 or not unknown,
            f"--config.cold_start.judge_records={judge}: the judge check asks about synthetic images, whose "
            f"vocabulary has no words for the labels {unknown} of --config.data.labels (set judge_records=0)",
        ),
        (
            judge == 0 or c.reward.reflection_max_tokens <= max(c.sampling.gen_buckets),
            f"--config.cold_start.judge_records={judge}: the judge answers up to "
            f"--config.reward.reflection_max_tokens={c.reward.reflection_max_tokens} tokens, past the largest "
            f"--config.sampling.gen_buckets {tuple(c.sampling.gen_buckets)} (set judge_records=0 or add a bucket)",
        ),
    )


def _rl(c: ConfigDict) -> list[str]:
    """rl: the group and batch sizes that divide each other, the packed row length, the registries,
    the rollout copy's settings."""
    rl = c.rl
    rows = rl.update_batch * rl.num_generations
    per_device, group = rl.micro_batch_weighting == "per_device_mean", rl.micro_batch_per_device
    errors = _failed(
        (rl.num_generations >= 2, f"--config.rl.num_generations={rl.num_generations}: GRPO needs >= 2 per prompt"),
        (
            rl.rollout_batch >= 1 and rl.update_batch >= 1 and rl.rollout_batch % rl.update_batch == 0,
            f"--config.rl.rollout_batch={rl.rollout_batch} must be a multiple of update_batch={rl.update_batch}",
        ),
        (
            rl.micro_batch >= 1 and rows % rl.micro_batch == 0,
            f"--config.rl.micro_batch={rl.micro_batch} must divide update_batch * num_generations = {rows}",
        ),
        (
            not per_device or group >= 1 and rl.micro_batch % group == 0,
            f"--config.rl.micro_batch_per_device={group} must be >= 1 and divide --config.rl.micro_batch="
            f"{rl.micro_batch} (a micro-batch holds whole loss groups)",
        ),
        (
            not per_device or group < 1 or rl.loss_devices >= 1 and rows % (rl.loss_devices * group) == 0,
            f"--config.rl.loss_devices={rl.loss_devices} x --config.rl.micro_batch_per_device={group} must "
            f"divide update_batch * num_generations = {rows}",
        ),
        (
            not rl.packing or rl.pack_length >= rl.max_prompt_len + rl.max_response_len,
            f"--config.rl.pack_length={rl.pack_length} must hold the longest row, rl.max_prompt_len + "
            f"rl.max_response_len = {rl.max_prompt_len + rl.max_response_len} (or set --config.rl.packing=False)",
        ),
    ) + _choices(
        c,
        [
            ("rl.schedule", SCHEDULES),
            ("rl.advantage", ESTIMATORS),
            ("rl.loss_mode", grpo.MODES),
            ("rl.kl_kind", grpo.KL_KINDS),
            ("rl.micro_batch_weighting", MICRO_BATCH_WEIGHTINGS),
            ("rl.reference_dtype", ("", "float32", "bfloat16")),
            ("rl.rollout_dtype", ("", "float32", "bfloat16")),
            ("rl.rollout_sharding", rollout_weights.LAYOUTS),
        ],
    )
    return errors + _rollout_weights(c)


def _rollout_weights(c: ConfigDict) -> list[str]:
    """rl.rollout_dtype / rl.rollout_sharding: a layout only for a copy, a tensor layout only
    over a tensor axis, and old log-probs recomputed when the copy rounds the weights."""
    rl = c.rl
    tensor = dict((name, size) for name, size in c.mesh).get("tensor")
    return _failed(
        (
            bool(rl.rollout_dtype) or rl.rollout_sharding == "fsdp",
            f"--config.rl.rollout_sharding={rl.rollout_sharding!r} lays out a rollout copy, but "
            "--config.rl.rollout_dtype='' makes none (rollouts sample with the training model): set "
            "rl.rollout_dtype (e.g. 'bfloat16') or rl.rollout_sharding='fsdp'",
        ),
        (
            rl.rollout_sharding != "tensor" or tensor != 1,
            "--config.rl.rollout_sharding='tensor' splits the copy over the mesh's tensor axis, which is 1 in "
            f"--config.mesh={tuple(tuple(a) for a in c.mesh)}: the copy would be whole on every device; say "
            "'replicated', or give the mesh a tensor axis > 1",
        ),
        # The sampler's log-probs are the copy's: with bf16 weights the first mini-batch's ratio
        # is no longer 1 and bf16 rounding enters the PPO clipping, which the official run never
        # lets happen (EasyR1 recomputes old log-probs with the fp32 actor, spec section 5).
        (
            rl.recompute_old_logprobs or rl.rollout_dtype in ("", c.model.param_dtype),
            f"--config.rl.rollout_dtype={rl.rollout_dtype!r} with --config.rl.recompute_old_logprobs=False: the old "
            f"log-probs would be the {rl.rollout_dtype} copy's, not the {c.model.param_dtype} policy's (the first "
            "update's ratio off 1 by the rounding, which then enters the clipping); set "
            "rl.recompute_old_logprobs=True (the official run) or rl.rollout_dtype=''",
        ),
    )


def _reward(c: ConfigDict) -> list[str]:
    """reward: the registries, and a weight to learn from."""
    r = c.reward
    return _choices(
        c,
        [
            ("reward.compat", rewards.COMPATS),
            ("reward.coherence_target", rewards.COHERENCE_TARGETS),
            ("reward.reflection", rewards.REFLECTIONS),
            ("reward.no_span", rewards.NO_SPAN),
            ("reward.judge", JUDGES),
            ("reward.reflection_cut", CUTS),
        ],
    ) + _failed(
        (
            r.w_accuracy + r.w_coherence + r.w_consistency + r.w_format > 0,
            "--config.reward.w_accuracy/w_coherence/w_consistency/w_format are all 0: no reward to learn from",
        )
    )


def _sampling(c: ConfigDict) -> list[str]:
    """sampling: buckets that increase and reach the longest prompt and response; decode slots;
    a KV cache dtype and pages the decode kernel reads."""
    s, rl = c.sampling, c.rl
    errors = _choices(c, [("sampling.kv_cache_dtype", KV_DTYPES)])
    decode, page = DECODE_IMPLS.get(c.model.attention_impl), s.page_size
    errors += _failed(
        (
            not page or decode != "gpu",
            f"--config.sampling.page_size={page} with --config.model.attention_impl={c.model.attention_impl!r}: its "
            "decode kernel (jax's Pallas GPU decode attention) reads contiguous rows, not pages; use page_size=0",
        ),
        (
            not page or decode != "tpu" or page % LANES == 0,
            f"--config.sampling.page_size={page} with --config.model.attention_impl={c.model.attention_impl!r}: the "
            f"TPU decode kernel reads a page as one block, a multiple of {LANES} entries",
        ),
        (
            page or not s.kv_pages,
            f"--config.sampling.kv_pages={s.kv_pages} sizes a paged KV cache: set sampling.page_size too",
        ),
        (
            not page or page < 0 or all(b % page == 0 for b in s.prompt_buckets),
            f"--config.sampling.page_size={page}: every prompt bucket must be whole pages (a prompt's rows share "
            f"them), got sampling.prompt_buckets={tuple(s.prompt_buckets)}",
        ),
    )
    errors += _failed(
        (
            s.kv_cache_dtype != "int8" or DECODE_IMPLS.get(c.model.attention_impl) != "gpu",
            f"--config.sampling.kv_cache_dtype='int8' with --config.model.attention_impl={c.model.attention_impl!r}: "
            "its decode kernel (jax's Pallas GPU decode attention) takes no scales; on GPUs use attention_impl "
            "'xla' or 'cudnn' (XLA decode reads the int8 cache), or kv_cache_dtype=''",
        ),
        (
            max(s.prompt_buckets, default=0) >= rl.max_prompt_len,
            f"--config.sampling.prompt_buckets={tuple(s.prompt_buckets)} must reach rl.max_prompt_len",
        ),
        (
            max(s.prompt_buckets, default=0) >= longest_reflection_prompt(c),
            f"--config.sampling.prompt_buckets={tuple(s.prompt_buckets)} must reach "
            f"{longest_reflection_prompt(c)} = 2 * rl.max_prompt_len - 3, the longest image reflection prompt "
            f"with --config.reward.reflection_cut={c.reward.reflection_cut!r} (its image counts as one token "
            "against rl.max_prompt_len, as in the official run); add a bucket, or set reward.reflection_cut='expanded'",
        ),
        (
            max(s.gen_buckets, default=0) >= rl.max_response_len,
            f"--config.sampling.gen_buckets={tuple(s.gen_buckets)} must reach rl.max_response_len",
        ),
        (
            s.max_rows == 0 or s.max_rows >= rl.num_generations,
            f"--config.sampling.max_rows={s.max_rows} (decode slots) must be 0 (one per row) or >= rl.num_generations",
        ),
    )
    for name in ("prompt_buckets", "gen_buckets"):
        b = tuple(s[name])
        errors += _failed(
            (
                len(b) >= 1 and all(x >= 1 for x in b) and list(b) == sorted(set(b)),
                f"--config.sampling.{name}={b} must be increasing positive lengths",
            )
        )
    return errors


def _eval(c: ConfigDict) -> list[str]:
    """eval: the validation value that picks the best checkpoint."""
    return _choices(c, [("eval.best_by", BEST_BY)])


# Each section's checks besides its RANGES fields (choices from a registry, fields that
# constrain each other); "" is the top level (every path the run reads or writes), None a
# section with ranges only. `validate` runs them in this order.
SECTION_CHECKS = {
    "": _top_level,
    "mesh": _mesh,
    "model": _model,
    "lora": _lora,
    "data": _data,
    "cold_start": _cold_start,
    "rl": _rl,
    "reward": _reward,
    "sampling": _sampling,
    "eval": _eval,
    "checkpoint": None,
    "guard": None,
    "log": None,
}


def _section_errors(c: ConfigDict, section: str) -> list[str]:
    """Every problem in `section` of `c`, one message each naming its --config flag: the
    section's own checks (SECTION_CHECKS), then its RANGES fields out of range."""
    check = SECTION_CHECKS[section]
    return (check(c) if check else []) + _out_of_range(c, section)


# The sections that fix a run's shapes and programs: what --compile_for and --dry_run build
# (they read no data or weights and write no checkpoint). data: its pixel limits size the
# vision program; reward: which reflections run, and how long.
SHAPE_SECTIONS = ("mesh", "model", "lora", "data", "cold_start", "rl", "reward", "sampling", "eval")


def validate_shapes(c: ConfigDict) -> None:
    """Raises ValueError listing every bad value of `c` in SHAPE_SECTIONS at once, each naming
    its flag: `validate` without the top level (paths, weights, outputs), so a 3b config
    without workdir, hf_path or data passes."""
    errors = [message for section in SHAPE_SECTIONS for message in _section_errors(c, section)]
    if errors:
        raise ValueError(_listing("bad config", errors))


def validate(c: ConfigDict) -> None:
    """Raises ValueError listing every bad or missing value of `c`, of every section at once.
    Downloads nothing: a hub id in hf_path or tokenizer_path must have been resolved to its
    local snapshot first (resolve_hub_ids; the entry points call it before this)."""
    errors = [message for section in SECTION_CHECKS for message in _section_errors(c, section)]
    if errors:
        raise ValueError(_listing("bad config", errors))


def validate_eval(c: ConfigDict, names: list[str], samples: int) -> None:
    """Raises ValueError listing every bad value an evaluation of data sets `names` with
    `samples` sampled runs would use. Downloads nothing: a hub id in tokenizer_path must have
    been resolved first (resolve_hub_ids; eval.run_eval calls it before this)."""
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
            problem = _data_path_problem(f"eval.datasets.{name}.path", ds.source, ds.path, f"data set {name!r}")
            need(problem is None, problem or "")
        if ds.source == "folder":
            need(
                bool(ds.annotations) and epath.Path(ds.annotations).is_file(),
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
    need(
        c.reward.compat in rewards.COMPATS,
        f"--config.reward.compat={c.reward.compat!r} must be one of {rewards.COMPATS}",
    )
    if c.tokenizer_path:
        problem = _model_path_problem("tokenizer_path", c.tokenizer_path)
        need(problem is None, problem or "")
    if errors:
        raise ValueError(_listing("bad evaluation settings", errors))


# Fields a resumed run may change: they extend the run, move files, or change how often it logs,
# evaluates and saves, not what a step computes. A name covers every field under it.
RESUMABLE = (
    "workdir",
    "scratch_dir",
    "hf_path",
    "tokenizer_path",
    "data.train",
    "data.test",
    "data.annotations_train",
    "data.annotations_test",
    "data.allow_train_test_overlap",  # refuses a run at start-up, never changes a step
    "cold_start.steps",
    "cold_start.judge_records",  # measured after the cold start, not trained on
    "rl.steps",
    "rl.epochs",
    "eval.every",
    "eval.datasets",  # read by `python -m emor3_jax.eval` only
    "checkpoint",
    "guard",  # bounds of the divergence guard: they stop a run, never change a step
    "log",
    "reward.threads",
    "compile_cache_dir",  # where compiled programs persist, not what they compute
    "gpu_memory_fraction",
)


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _covered(field: str, names: Sequence[str]) -> bool:
    return any(field == n or field.startswith(n + ".") for n in names)


def resume_changes(saved_json: str, c: ConfigDict, accepted: Sequence[str] = ()) -> list[str]:
    """Compares the config a checkpoint was saved with (`saved_json`, `ConfigDict.to_json()`)
    with the run's config `c`.

    Returns one line per allowed change ("rl.steps: 30 -> 60 (may change on resume)"), to
    print. Raises ValueError naming every other changed field with its old and new value
    and the --accept_changes value that accepts them; `accepted` are the field names the
    user accepted (see `check_accepted`). A field only one side has came with a code change
    no flag can undo: it is reported, not refused.
    """
    old, new = _flat(json.loads(saved_json)), _flat(json.loads(c.to_json()))
    allowed, refused = [], []
    for field in sorted(set(old) | set(new)):
        before, after = old.get(field, _ABSENT), new.get(field, _ABSENT)
        if before == after:
            continue
        change = f"{field}: {_show(before)} -> {_show(after)}"
        if _ABSENT in (before, after):
            allowed.append(f"{change} (field added or removed by a code change)")
        elif _covered(field, RESUMABLE):
            allowed.append(f"{change} (may change on resume)")
        elif field in accepted:
            allowed.append(f"{change} (accepted by --accept_changes)")
        else:
            refused.append((field, change))
    if refused:
        raise ValueError(
            "the config differs from the one the checkpoint was saved with: "
            + "; ".join(change for _, change in refused)
            + f". Resume with them anyway: --accept_changes={','.join(f for f, _ in refused)}; "
            "or start over with a fresh --config.workdir"
        )
    return allowed


def check_accepted(accepted: Sequence[str], c: ConfigDict) -> None:
    """Raises ValueError when --accept_changes names a field the config does not have."""
    fields = _flat(json.loads(c.to_json()))
    unknown = [name for name in accepted if name not in fields]
    if unknown:
        raise ValueError(f"--accept_changes={','.join(accepted)}: no config field {unknown} (e.g. rl.learning_rate)")


def compile_cache_dir(c: ConfigDict) -> str | None:
    """Where compiled programs persist (core.accelerator): compile_cache_dir, "" for
    <workdir>/compile_cache (a run resumed in its workdir finds its programs), None when "off"
    or there is no workdir."""
    if c.compile_cache_dir == "off" or not (c.compile_cache_dir or c.workdir):
        return None
    return c.compile_cache_dir or paths.join(c.workdir, "compile_cache")


def reference_dtype(c: ConfigDict) -> str:
    """The GRPO reference's weights dtype: rl.reference_dtype, "" = model.param_dtype; with LoRA
    the base's (the reference is the base itself)."""
    return c.model.base_dtype if c.lora.rank else c.rl.reference_dtype or c.model.param_dtype


def runtime_fields(c: ConfigDict) -> dict:
    """The ModelConfig fields the run chooses (dtypes, attention, remat, vision buckets), not
    the checkpoint."""
    return dict(
        param_dtype=c.model.base_dtype if c.lora.rank else c.model.param_dtype,
        compute_dtype=c.model.compute_dtype,
        attention_impl=c.model.attention_impl,
        remat=c.model.remat,
        remat_policy=c.model.remat_policy,
        unroll_layers=c.model.unroll_layers,
        vision_buckets=tuple(int(n) for n in c.model.vision_buckets),
        lora_rank=c.lora.rank,
        lora_alpha=float(c.lora.alpha),
        lora_targets=tuple(c.lora.targets),
    )


def model_config(c: ConfigDict, vocab_size: int, special_ids: dict[str, int]) -> ModelConfig:
    """The architecture: from the HF checkpoint, or model.preset (tiny: sized to the tokenizer)."""
    runtime = runtime_fields(c)
    if c.hf_path:
        return ModelConfig.from_hf_dir(c.hf_path, **runtime)
    return preset(c.model.preset, vocab_size=vocab_size, special_ids=special_ids, **runtime)
