"""emor3_jax: EMO-R3 (reflective RL for emotional reasoning) on Qwen2.5-VL, in JAX/Flax NNX."""
