"""megatron-patch: Llama / Qwen on upstream megatron-core, with HF <-> Megatron checkpoint tools."""

from setuptools import find_packages, setup

setup(
    name="megatron-patch",
    version="0.1.0",
    description="Pretrain and fine-tune Llama and Qwen on upstream megatron-core; exact HF <-> Megatron conversion",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_patch", "megatron_patch.*", "toolkits", "toolkits.*"]),
    install_requires=[
        # torch is a floor, never a pin: GPU users keep the CUDA build they have (NGC containers).
        "torch>=2.6",
        "megatron-core>=0.15",
        "safetensors",
        "transformers>=4.45",
        "tokenizers",
        "tqdm",
        "numpy",
        "psutil",  # megatron-core's torch_dist saving needs it
    ],
    extras_require={
        "test": ["pytest", "triton", "matplotlib", "tensorboard"],
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["mpatch-convert=toolkits.checkpoint.__main__:main"]},
)
