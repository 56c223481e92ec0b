"""Run-time plumbing: mesh and sharding rules, several hosts, checkpoints, metrics, loading a
policy from a checkpoint path, and the factory that builds what a run needs."""
