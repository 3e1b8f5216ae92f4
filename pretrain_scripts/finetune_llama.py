"""Thin entry point: one rank of the fine-tuning job (launched by finetune_llama.sh / torchrun)."""

import warnings

warnings.filterwarnings("ignore", category=UserWarning)

from megatron_bdlora.training.trainer import main  # noqa: E402

if __name__ == "__main__":
    main()
