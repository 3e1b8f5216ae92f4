from setuptools import find_packages, setup

# GGUF -> HF conversion (tools/prepare_smollm2.py, the real-model demo and tests).
REAL = ["gguf>=0.10,<1", "accelerate>=1.0,<2"]

setup(
    name="megatron-bdlora",
    version="0.1.0",
    description="Block-Diagonal LoRA (BD-LoRA) for Llama on Megatron-Core tensor parallelism",
    packages=find_packages(include=["megatron_bdlora", "megatron_bdlora.*"]),
    python_requires=">=3.10",
    # torch is deliberately pinned by the Makefile before this package is installed:
    # a bare `torch` requirement here would pull the CUDA build on a CPU machine.
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "transformers>=4.56",
        "peft>=0.19",
        "safetensors>=0.4",
        "datasets>=3.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "wandb>=0.18",
        "tensorboard>=2.14",  # --tensorboard-dir (torch.utils.tensorboard writes through it)
        "matplotlib>=3.8",
    ],
    extras_require={
        "real": REAL,
        "dev": ["pytest>=8", "pytest-timeout>=2.3", *REAL],  # the real-model tests convert GGUF
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],  # megatron-core 0.16.1's pin
    },
    # vLLM loads it in every process; inert unless MEGATRON_BDLORA_VLLM=1 (megatron_bdlora/serving/).
    entry_points={"vllm.general_plugins": ["megatron_bdlora = megatron_bdlora.serving.vllm_plugin:register"]},
)
