"""On-device sampling: prefill once per prompt, fork n ways, decode in one jitted loop."""
