"""Data: tokenizers, sources, processing, prompts."""
