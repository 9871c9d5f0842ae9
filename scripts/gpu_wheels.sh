#!/usr/bin/env bash
# On a CPU machine WITH PyPI: fetch/build everything scripts/gpu_check.sh installs on the lent GPU machine,
# which has Python 3.12, torch (CUDA), triton and transformers but no network and none of the rest.
# Output: .whl/gpu/ (git-ignored; pass it to the device tool as carry=[".whl/gpu"]).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
OUT=.whl/gpu
mkdir -p "$OUT"
plat=(--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform any)
# binary wheels for CPython 3.12 (pure-Python ones too)
for pkg in megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.0 einops hjson py-cpuinfo msgpack psutil \
           safetensors pyyaml; do
  pip download -q --no-deps "${plat[@]}" -d "$OUT" "$pkg" || { echo "gpu_wheels: could not fetch $pkg" >&2; exit 1; }
done
# pure-Python sdists -> wheels built here (they build the same on any Python 3)
pip wheel -q --no-deps -w "$OUT" deepspeed==0.19.8 "antlr4-python3-runtime==4.9.3"
# mamba-ssm / causal-conv1d: sources only (their CUDA parts build on the GPU machine, or are skipped)
# (their setup.py runs even for a download; the SKIP flags let it pass on a CPU torch)
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$OUT" mamba-ssm==2.3.2.post1 causal-conv1d || \
  echo "gpu_wheels: mamba-ssm / causal-conv1d sources not fetched; gpu_check runs the references" >&2
du -sh "$OUT"
