# rlp-dist on an NVIDIA PyTorch image (CUDA, NCCL, torch built by NVIDIA; Python 3.12).
#
#   docker build -t rlp-dist:latest .
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/opt/rlp-dist/runs" rlp-dist:latest \
#       torchrun --nproc_per_node 8 launch/pretrain.py +model=qwen3_1_7b run.dir=runs/q17b
#
# The base image's torch is kept: our package is installed with --no-deps (setup.py pins the CPU
# build torch==2.13.0 for our CPU machines) and its other dependencies are listed here, under the
# image's pip constraints (/etc/pip/constraint.txt), so nothing replaces NVIDIA's torch.
# mamba-ssm and causal-conv1d compile CUDA kernels against that torch (MAX_JOBS bounds the memory).
# More in docs/operations.md.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ARG MAX_JOBS=8
# TOKENIZERS_PARALLELISM trips the "sensitive data" rule; nothing secret is set here.
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    WANDB_MODE=offline \
    MAX_JOBS=${MAX_JOBS}

WORKDIR /opt/rlp-dist

# Dependencies first (a layer that survives edits of the source): setup.py's, pinned to the versions
# our CI runs with.
RUN pip install \
        "deepspeed==0.19.8" \
        "megatron-core==0.16.1" \
        "psutil==7.2.2" \
        "transformers==5.24.0" \
        "hydra-core==1.3.8" \
        "wandb==0.31.0" \
        "safetensors==0.8.0" \
        "tokenizers==0.23.3" \
        "tqdm==4.70.1" \
        "einops==0.8.2" \
        "matplotlib==3.11.2" \
        "ninja==1.13.2" \
        "pytest==9.2.0"

# CUDA kernels for the hybrid (Mamba2) backbone, built against the image's torch and CUDA.
RUN pip install --no-build-isolation "causal-conv1d==1.7.0" \
    && pip install --no-build-isolation "mamba-ssm==2.3.2.post1"

COPY . /opt/rlp-dist
# Editable: launch/ and conf/ are read from the source tree.
RUN pip install --no-deps -e /opt/rlp-dist \
    && python -m rlp_dist.ops.smoke

# Imports the stack, composes the tiny config, runs a CUDA matmul, requires mamba-ssm/causal-conv1d.
HEALTHCHECK --interval=10m --timeout=120s --start-period=60s --retries=1 \
    CMD ["python", "-m", "rlp_dist.ops.smoke", "--gpu"]

CMD ["python", "-m", "rlp_dist.ops.smoke", "--gpu"]
