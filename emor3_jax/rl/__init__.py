"""RL math and loop for EMO-R3: advantages, GRPO losses, rewards, rollouts, learner."""
