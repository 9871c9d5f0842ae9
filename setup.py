"""rlp-dist: RLP (Reinforcement as a Pretraining Objective) on megatron-core + DeepSpeed.

Install on a CPU machine (takes the local torch 2.13.0 CPU wheel, never a CUDA download):
    pip install torch==2.13.0 && pip install -e ".[test]"
On a CUDA cluster: pip install -e ".[gpu]" on top of the cluster's torch build.
"""

from setuptools import find_packages, setup

setup(
    name="rlp-dist",
    version="0.1.0",
    description="Multi-node RLP (reinforcement as a pretraining objective) on megatron-core and DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["rlp_dist", "rlp_dist.*"])
    + ["rlp_kernels"] + [f"rlp_kernels.{p}" for p in find_packages("kernels")],
    # The repo's top-level kernels/ folder is installed as `rlp_kernels`: transformers imports a
    # Hugging Face package called `kernels`, which a top-level `kernels` would shadow.
    package_dir={"rlp_kernels": "kernels"},
    package_data={"rlp_dist": ["assets/*.jsonl", "assets/tokenizer/*", "conf/**/*.yaml"]},
    include_package_data=True,
    install_requires=[
        # Pinned to the build that lies on disk on our CPU machines; CUDA clusters install their own
        # torch first (pip then sees the requirement satisfied by a 2.13.0+cu build).
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "megatron-core==0.16.1",
        "psutil>=5.9",  # needed by megatron-core dist_checkpointing, not declared by it
        "transformers>=5.2,<6",
        "hydra-core==1.3.8",
        "wandb==0.31.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm>=4.66",
        "numpy>=1.26",
        "einops>=0.8",
        "matplotlib>=3.8",  # rlp-dist plot
    ],
    extras_require={
        # triton: the log-prob kernel on CUDA (kernels/logprob/triton.py; torch's CUDA wheels bring it)
        "gpu": ["mamba-ssm==2.3.2.post1", "causal-conv1d>=1.5", "triton>=3.0"],
        # rlp-dist prepare-data inputs .jsonl.zst and .parquet (plain, .gz and .txt need nothing)
        "data": ["zstandard>=0.22", "pyarrow>=14"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "ninja"],
    },
    entry_points={"console_scripts": ["rlp-dist=rlp_dist.cli:main"]},
)
