"""megatron-patch: Llama / Qwen on upstream megatron-core, with HF <-> Megatron checkpoint tools."""

from setuptools import find_packages, setup

setup(
    name="megatron-patch",
    version="0.1.0",
    description="Pretrain and fine-tune Llama and Qwen on upstream megatron-core; exact HF <-> Megatron conversion",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # The tested matrix (README "Tested versions"): Python 3.11 + megatron-core 0.16.1, Python 3.12 + 0.19.2.
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_patch", "megatron_patch.*", "toolkits", "toolkits.*"]),
    install_requires=[
        # torch is a floor, never a pin: GPU users keep the CUDA build they have (NGC containers).
        "torch>=2.6",
        # 0.16 is the oldest release tested; 0.20 may change what the CPU runtime and torch_dist reading rely on.
        "megatron-core>=0.16,<0.20",
        "safetensors",
        "transformers>=4.45,<6",  # config.json shapes of 4.x (rope_scaling) and 5.x (rope_parameters)
        "tokenizers",
        "tqdm",
        "numpy",
        "psutil",  # megatron-core's torch_dist saving needs it
    ],
    extras_require={
        # six: imported by Megatron-LM's trainer (scripts/test_megatron_lm.sh runs tests against a checkout).
        # liger-kernel: its Triton kernels are tested on CPU through Triton's interpreter (tests/test_liger.py);
        # peft: LoRA adapters are checked against HF + peft and exported in its format (tests/test_lora.py).
        "test": ["pytest", "triton", "matplotlib", "tensorboard", "six", "liger-kernel", "peft"],
        # Without Transformer Engine, Liger's SwiGLU / cross-entropy kernels are the fused path (fusions/liger.py).
        "gpu": ["liger-kernel"],
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["mpatch-convert=toolkits.checkpoint.__main__:main"]},
)
