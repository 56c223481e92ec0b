"""Held-out evaluation (accuracy, format, reflective scores) and its reports; the CLI is
`python -m emor3_jax.eval`."""
