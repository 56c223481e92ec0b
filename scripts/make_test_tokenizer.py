"""Builds a Qwen2.5-VL tokenizer offline and saves it with `save_pretrained`.

python scripts/make_test_tokenizer.py OUT_DIR            # tiny BPE for tests
python scripts/make_test_tokenizer.py OUT_DIR --qwen     # real Qwen2.5 (18.7 MB)
"""

import argparse
import os
import sys

# Run from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emor3_jax.data import tokenizers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--qwen", action="store_true", help="build the real 151,665-id tokenizer")
    parser.add_argument("--vocab-size", type=int, default=1000, help="size of the tiny tokenizer")
    args = parser.parse_args()
    if args.qwen:
        tok = tokenizers.build_qwen_tokenizer(args.out_dir)
    else:
        tok = tokenizers.build_test_tokenizer(args.out_dir, args.vocab_size)
    print(f"saved {type(tok).__name__} with {len(tok)} ids to {args.out_dir}")


if __name__ == "__main__":
    main()
