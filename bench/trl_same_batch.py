"""TRL's side of the same-batch check in bench/grpo_vs_trl.py; runs in TRL's venv, not ours.

Reads a batch that emor3_jax sampled (prompt and completion ids, masks, the image rows and
grids, the rewards), builds a GRPOTrainer with the reference script's settings on the same
checkpoint, and with TRL's own code computes: the advantages from the rewards, the reference
log-probs, the loss (`GRPOTrainer._compute_loss`), one AdamW step after clipping, and the loss
again on the same batch (old log-probs = before the step). Writes them as JSON.

    .venv-trl/bin/python -m bench.trl_same_batch --batch batch.npz --model-dir DIR \\
        --trl-script ../shared/bench/trl_grpo_cpu.py --out trl_batch.json
"""

import os

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--trl-script", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location("trl_grpo_cpu", args.trl_script)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    from trl import GRPOConfig, GRPOTrainer

    b = {k: torch.from_numpy(v) for k, v in np.load(args.batch).items()}
    n = int(b["group_size"])
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,  # as the reference script: fp32 (TRL's default would autocast to bf16)
        fp16=False,
        per_device_train_batch_size=b["completion_ids"].shape[0],
        num_generations=n,
        max_completion_length=b["completion_ids"].shape[1],
        beta=0.01,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=2e-6,
        weight_decay=0.0,
        max_grad_norm=1.0,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=args.model_dir,
        reward_funcs=ref.boxed_reward,
        args=config,
        train_dataset=ref.make_dataset(n, 224, False),
        processing_class=ref.load_processor(args.model_dir, False),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    model = trainer.model
    model.train()

    # TRL's advantages: rewards standardised within each group (scale_rewards="group").
    rewards = b["rewards"].double().view(-1, n)
    std = rewards.std(dim=1, keepdim=True)
    advantages = ((rewards - rewards.mean(dim=1, keepdim=True)) / (std + 1e-4)).view(-1).float()

    input_ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    attention = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
    mm_types = (input_ids == model.config.image_token_id).long()  # M-RoPE needs it (transformers 5.24)
    vision = dict(
        pixel_values=b["pixel_values"],
        image_grid_thw=b["image_grid_thw"],
        num_images=[1] * input_ids.shape[0],
        mm_token_type_ids=mm_types,
    )
    length = b["completion_ids"].shape[1]
    with torch.no_grad():
        ref_logps = trainer._get_per_token_logps_and_entropies(
            trainer.ref_model, input_ids, attention, length, **vision
        )[0]
        # The plain transformers forward, to tell apart what TRL's log-prob path itself adds.
        logits = trainer.ref_model(
            input_ids=input_ids, attention_mask=attention, **{k: v for k, v in vision.items() if k != "num_images"}
        ).logits[:, -length - 1 : -1]
        plain = torch.log_softmax(logits.double(), -1).gather(-1, b["completion_ids"][..., None])[..., 0]
    inputs = dict(
        prompt_ids=b["prompt_ids"],
        prompt_mask=b["prompt_mask"],
        completion_ids=b["completion_ids"],
        completion_mask=b["completion_mask"],
        advantages=advantages,
        ref_per_token_logps=ref_logps,
        **vision,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    loss_before = trainer._compute_loss(model, inputs)
    loss_before.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    inputs["old_per_token_logps"] = ref_logps  # the policy before the step (= the reference here)
    with torch.no_grad():
        loss_after = trainer._compute_loss(model, inputs)
    out = {
        "advantages": advantages.tolist(),
        "ref_logps": ref_logps.tolist(),
        "plain_logps": plain.tolist(),
        "loss_before": float(loss_before),
        "loss_after": float(loss_after),
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"TRL same batch: loss {out['loss_before']:.6g} -> {out['loss_after']:.6g}")


if __name__ == "__main__":
    main()
