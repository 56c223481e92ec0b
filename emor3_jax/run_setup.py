"""A training run's set-up, apart from its loop (as MaxText's setup_train_loop is apart from
its train_step): the tokenizer and its special ids, the model config, the run-time objects
(factory.py: mesh, rules, sampler, encoder), the task, the data store, the model's parameters,
the checkpoints, logs and preemption flag, built in this order by `set_up`, which
`trainer.Run.__init__` only assigns.

The GRPO reference is not among them: it is the cold start's result, copied when GRPO starts.
"""

from __future__ import annotations

import dataclasses
import json

import jax
from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from emor3_jax import config_lib, factory
from emor3_jax.core import paths
from emor3_jax.core import profile as run_profile
from emor3_jax.core.checkpoint import PreemptionFlag
from emor3_jax.core.metrics import MetricWriter
from emor3_jax.core.workdir_lock import WorkdirLock
from emor3_jax.data import pipeline, store
from emor3_jax.data.encode import Encoder
from emor3_jax.emo_r3 import rewards
from emor3_jax.emo_r3.task import EmoR3
from emor3_jax.models import lora
from emor3_jax.models.api import architecture, create_model, load_hf
from emor3_jax.run_checkpoints import RunCheckpoints, base_record


@dataclasses.dataclass
class RunSetup:
    """Everything a run is built with; each field becomes the trainer's attribute of its name."""

    prof: run_profile.Profile  # programs compiled and seconds per phase and step
    scratch: paths.Scratch  # local copies of URI files; removed by Run.close()
    vocab: int  # the tokenizer's size: a sampled id at or past it is a diverged model's
    rt: factory.Runtime  # tokenizer, special ids, model config, mesh and rules, sampler
    encoder: Encoder
    task: EmoR3
    data_dir: str  # the data store (data/store.py)
    bad: dict  # bad records skipped per split ({split: {seen, bad}})
    dropped: dict  # prompts over rl.max_prompt_len, dropped per split (not raised mid-run)
    test_records: list[dict]  # the eval.num_examples held-out records
    graphdef: nnx.GraphDef
    params: nnx.State
    ckpts: RunCheckpoints
    writer: MetricWriter
    preempt: PreemptionFlag
    key: jax.Array  # the run's root key; each draw folds in its global step
    rl_steps: int  # GRPO steps (0: the cold start alone)


def set_up(c: ConfigDict, lock: WorkdirLock | None = None) -> RunSetup:
    """Builds the run `c` describes (a validated config); `lock`: the workdir lock held, which
    the checkpoints check before each save. The data store's and the model's building are
    timed as the profile's phases "data_build" and "model_init"."""
    prof = run_profile.Profile()
    scratch = paths.Scratch(c.scratch_dir)
    epath.Path(c.workdir).mkdir(parents=True, exist_ok=True)
    tok = factory.load_tokenizer(c, scratch)
    special = factory.check_tokenizer(tok, c.tokenizer_path or c.hf_path or f"the {c.builtin_tokenizer} tokenizer")
    cfg = config_lib.model_config(c, len(tok), special)
    rt = factory.build(c, tok, special, cfg, *factory.mesh_and_rules(c))
    encoder = rt.encoder(c.data.labels, c.rl.max_prompt_len)
    task = EmoR3.from_config(c)
    dropped = {}
    with prof.phase("data_build"):
        data_dir, bad = store.build(
            c,
            lambda r: task.prompt_length(encoder, r),
            dropped,
            is_set_answer=rewards.format_score,
            scratch=scratch,
        )
        if c.cold_start.steps:
            _check_answers(c, data_dir)
        test_records = store.test_records(data_dir, c.eval.num_examples)
    with prof.phase("model_init"):
        model = _model(c, rt, scratch)
    graphdef, params = nnx.split(model)
    base = None
    if c.lora.rank:  # its checkpoints hold the adapters and this record of the base
        base = base_record(json.loads(c.to_json()), architecture(cfg), lora.base_fingerprint(params))
    # Keyword arguments run in order: checkpoints, logs, flag and key as they always were built.
    return RunSetup(
        prof=prof,
        scratch=scratch,
        vocab=len(tok),
        rt=rt,
        encoder=encoder,
        task=task,
        data_dir=data_dir,
        bad=bad,
        dropped=dropped,
        test_records=test_records,
        graphdef=graphdef,
        params=params,
        ckpts=RunCheckpoints(c, architecture(cfg), lock, base),
        writer=MetricWriter(c.workdir),
        preempt=PreemptionFlag(),
        key=jax.random.key(c.seed),
        rl_steps=_rl_steps(c, data_dir),
    )


def _model(c: ConfigDict, rt: factory.Runtime, scratch: paths.Scratch):
    """hf_path's weights, or (without hf_path, or with model.init_random) random weights from
    `seed` at the shapes of hf_path's config or model.preset."""
    if c.hf_path and not c.model.init_random:
        hf = scratch.local(c.hf_path, "hf")  # safetensors are memory-mapped: a local copy
        return load_hf(hf, rt.mesh, rt.rules, seed=c.seed, **config_lib.runtime_fields(c))
    shapes = f"{c.hf_path}'s config.json" if c.hf_path else f"the {c.model.preset} preset"
    print(f"model: RANDOM weights (seed {c.seed}) at the shapes of {shapes}; no checkpoint weights read")
    return create_model(rt.cfg, rt.mesh, rt.rules, seed=c.seed)


def _rl_steps(c: ConfigDict, data_dir: str) -> int:
    """rl.steps, else rl.epochs times the full batches of rl.rollout_batch prompts in the
    training split (at least one step); rl.steps = rl.epochs = 0: none, the cold start alone.
    As the official run counts them: its data loader drops each epoch's last partial batch
    (drop_last, EasyR1 verl/trainer/data_loader.py:60-67) and it trains len(loader) x epochs
    steps (verl/trainer/ray_trainer.py:243): EmoSet-2k's 2,100 prompts in batches of 512 give
    4 x 20 = 80 steps (not 20 x 2,100 // 512 = 82)."""
    steps = store.train_size(data_dir) // c.rl.rollout_batch * c.rl.epochs
    return c.rl.steps or (max(1, steps) if c.rl.epochs else 0)


def _check_answers(c: ConfigDict, data_dir: str) -> None:
    """The cold start trains on reference answers: a data set without them stops here."""
    train = pipeline.open_split(data_dir, store.NAME, store.cold_start_split(c))
    missing = [r["id"] for r in (train[i] for i in range(len(train))) if not r["answer"]]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(train)} training records have no reference answer (e.g. id "
            f"{missing[0]!r}), which the cold start trains on: pass --config.cold_start.steps=0, "
            "--config.data.cold_start with SET responses, or --config.data.annotations_train with an "
            "'answer' per record"
        )
