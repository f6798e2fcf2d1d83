#!/usr/bin/env bash
# Lays into .gpu/ (git-ignored) what the lent GPU machine lacks, for benchmarks/gpu/run.sh to use there.
# Run here, on a machine that reaches PyPI, before the device call; then call the device with carry [".gpu"].
#
# The GPU machine's image has torch, transformers, peft, accelerate, pyarrow, pandas, tokenizers, safetensors, but
# no bitsandbytes, trl, datasets (and its dill / multiprocess) or gguf, and it reaches no registry. Versions are
# pinned to the ones installed here; peft too (the image's own may be another version). bitsandbytes is unpacked
# with only its CUDA 13 libraries: the whole wheel alone is ~43 MB of the 64 MiB a device call may carry.
#     bash benchmarks/gpu/fetch.sh                 # the packages above
#     bash benchmarks/gpu/fetch.sh transformers    # also carry this machine's transformers (13 MB) and others
set -euo pipefail
cd "$(dirname "$0")/../.."
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
pins=()
for pkg in bitsandbytes trl datasets dill multiprocess gguf peft "$@"; do pins+=("$pkg==$(version "$pkg")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels "${pins[@]}"
# bitsandbytes: unpacked, without the libraries for other CUDA versions, ROCm and XPU
python3 -m zipfile -e .gpu/wheels/bitsandbytes-*.whl .gpu/site
rm -f .gpu/wheels/bitsandbytes-*.whl
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' -delete
# the random Llama-3-8B-shaped model needs a tokenizer whose ids fit its vocabulary: the demo model's
python3 - <<'PY'
from transformers import AutoTokenizer
from lora_dpo.model import demo_gguf_path, gguf_to_hf_dir
AutoTokenizer.from_pretrained(gguf_to_hf_dir(demo_gguf_path())).save_pretrained(".gpu/tokenizer")
PY
echo "fetched: ${pins[*]}"
du -sh .gpu
