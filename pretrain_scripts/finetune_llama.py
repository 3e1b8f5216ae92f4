"""Thin entry point: one rank of the fine-tuning job (launched by finetune_llama.sh / torchrun)."""

from megatron_bdlora.launch.entry import main

if __name__ == "__main__":
    main()
