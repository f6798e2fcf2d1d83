#!/usr/bin/env bash
# The GPU checks of the speed-and-memory work, on the lent machine (after benchmarks/gpu/fetch.sh here). One device
# command may run 10 minutes, so they come in two calls on the same warm machine:
#   device run, carry [".gpu"], timeout_s 420:  bash benchmarks/gpu/run.sh imports gpu-tests memory
#   device run, carry [".gpu"], timeout_s 480:  bash benchmarks/gpu/run.sh vs-trl
# (no stage named = all four). Logs and JSON land in $OUT (or /tmp/lora-dpo-gpu); each stage has its own time limit
# and a failing stage does not stop the next:
#   imports    versions, and that every package imports (seconds)
#   gpu-tests  the GPU-marked tests (bf16 + paged 8-bit AdamW end to end)
#   memory     2×2048-token pairs on a random Llama-3-8B-shaped model (built once into .gpu-cache, ~16 GB on disk):
#              measured peak vs `lora-dpo estimate`, sdpa and flex_attention
#   vs-trl     lora-dpo vs TRL on that model: pairs/s, peak memory, MFU, losses of both (benchmarks/vs_trl.py)
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/lora-dpo-gpu}
mkdir -p "$out" /tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORA_DPO_CACHE=$PWD/.gpu-cache LORA_DPO_BENCH_TOKENIZER=$PWD/.gpu/tokenizer \
  LORA_DPO_TEST_TOKENIZER=$PWD/.gpu/tokenizer  # the device has no demo-model package
if [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
fi
cp -r .gpu/site/. /tmp/site/ 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
stage() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T), limit ${limit}s)"; \
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -40; echo "=== $name: exit ${PIPESTATUS[0]}"; }
want=" ${*:-imports gpu-tests memory vs-trl} "
on() { [[ $want == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
on imports && stage imports 60 python3 -c "
import torch, transformers, peft, bitsandbytes, trl, datasets, lora_dpo
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__,
      'trl', trl.__version__, 'datasets', datasets.__version__)"
on gpu-tests && stage gpu-tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py
on memory && stage memory 220 python3 benchmarks/memory.py --model llama3-8b-random --prompt-tokens 1024 \
  --completion-tokens 1024 --batch 1 --steps 3 --attn sdpa,flex_attention --json "$out/memory.json"
on vs-trl && stage vs-trl 460 python3 benchmarks/vs_trl.py --model llama3-8b-random --batch 4 --steps 6 --repeats 1 \
  --short-prompt 64 --long-prompt 1024 --completion 256 --json "$out/vs_trl.json"
echo "=== done $(date +%T)"
