#!/usr/bin/env bash
# The GPU checks of the speed-and-memory work, on the lent machine (after benchmarks/gpu/fetch.sh here).
# A session has ~15 minutes of device time, the machine's start included, so the kit is one call that ends on its
# own before a deadline, most important stage first, and a second call for whatever the deadline left out (each
# vs-TRL worker spends most of its time loading the 8B model and compiling: ~50 s each on the H200):
#   device run, carry [".gpu"], timeout_s 540:  KIT_DEADLINE=500 bash benchmarks/gpu/run.sh
#   (at once, same warm machine, the model cache is still there; it prints this line for the stages it skipped)
#   device run, carry [".gpu"], timeout_s = device time left − 60, KIT_DEADLINE = that − 30:
#     KIT_DEADLINE=... bash benchmarks/gpu/run.sh <skipped stages>
# Stages (no stage named = all, in this order); each has its own time limit, cut to the time left, and a failing
# stage does not stop the next. Everything is logged to $OUT/kit.log, raw results to $OUT/*.json (written after every
# worker, so a stage its time limit stops keeps what ran):
#   model      a random Llama-3-8B-shaped model, built once into .gpu-cache (~16 GB on disk; seconds to a minute)
#   short      lora-dpo vs TRL, short prompts (prompt ~1/5 of the tokens): pairs/s, peak memory, MFU, both losses,
#              every timed step's seconds, lora-dpo's host_wait_share per timed step (near 0: the GPU waited for
#              the host, lora_dpo/pace.py), the Python full garbage collections, the torch.compile graphs
#              (recompiles) and the CUDA allocator's cudaMalloc / cudaFree / retries that fell in the timed steps
#              (the suspects for a slow or uneven one); lora-dpo on its
#              default kernel (attn_implementation auto: flex_attention on Ampere+), TRL on sdpa; two untimed steps
#              (flex compiles its kernels in the first ones), two alternated repeats (TRL's step times varied ~4×
#              within one run on the H200). First: the short target (≥ 1.5×; 1.45× in the third run, 1.91× in the fourth)
#   long-compile  the long stage with train.compile (lora-dpo alone, as short-compile): on short steps, where the
#              host sets the pace, it gave +36 % pairs/s in the fourth run; whether it gains (or loses) where the GPU
#              sets the pace decides whether train.compile can be on by default on CUDA
#   gpu-tests  the GPU-marked tests: bf16 + paged 8-bit AdamW, fp16 + GradScaler, flex_attention training,
#              prefix sharing on a CUDA 4-bit base (sdpa, sdpa_causal and flex) against the plain forward, offloaded
#              embeddings and activations, folded LoRA dropout and the fused LoRA forward under bf16/fp16 autocast,
#              the lean RMSNorm in bf16, the log-prob gradient computed in forward under bf16 autocast, training
#              steps under torch's sync debug mode (no wait for the GPU between micro-batches), a pre-quantized
#              checkpoint reloaded, the fused AdamW against its foreach form (21 tests: ~180 s on the H200, most
#              of it loading and compiling)
#   profile-loop  what the training loop adds to a step beyond its forward and backward: at both shapes,
#              lora-dpo's defaults alone, with the loop's work around each step (results and gradient norm read
#              back, clipping, fused AdamW: `loop`), with a new pair length every timed step and then the same
#              lengths again (`vary`: a cost paid once per new shape, a kernel loaded or a GEMM heuristic run on
#              first use, shows as "new lengths" slower than "lengths seen"), and both. (The fourth run's ~0.3 s
#              between profiled and trained steps was the recompute: profile_step.py did not checkpoint then)
#   long       the short stage on long prompts (prompt ~2/3 of the tokens), one repeat
#   short-compile  the short stage with lora-dpo's train.compile (attention and MLP blocks through torch.compile;
#              they compile during the two untimed steps): what the host's share of a short step costs (lora-dpo
#              alone, one repeat: targets.py compares it with the short stage's TRL run, the same data and settings)
#   profile-default  the profile stage below on lora-dpo's defaults only (packed, flex_attention): steps at
#              the short- and long-prompt shapes of fixed lengths, and the 16 + 2 × 16 host floor, in one process.
#              The fourth run: 0.51 s at the short shape, 0.52 s at the floor (the GPU busy 10 %), 0.71 s at the
#              long shape: short steps are the host's
#   profile    lora-dpo steps timed and one under torch.profiler (one model load), at the short- and long-prompt
#              shapes: packed on flex with lora-dpo's fused LoRA forward and with peft's own (lora_dpo/lora_forward.py:
#              its GPU gain), with down_proj's base GEMM first (recomputed in backward: lora_forward.base_gemm_last's
#              gain), and concatenated (TRL's rows) on sdpa: s/step per row token, the busiest kernels, and CPU
#              against GPU time (whether the step waits on the host); a third shape of 16 + 2 × 16 tokens, whose
#              GPU work is negligible, times the host's own cost of a step (Python, dispatch, launches): a long-
#              prompt step that takes about as long is host-bound
#   long-offload  the long stage with lora-dpo keeping embeddings and checkpointed inputs in CPU memory
#              (model.offload_embeddings, train.offload_activations; TRL has neither): the memory ratio and its cost
#              (lora-dpo alone, compared with the long stage's TRL run)
#   long-b16   the long stage at 16 pairs per step, 4 steps: the memory ratio where activations, not the 4-bit
#              weights both sides hold, make most of the peak
#   losses     both trainers in fp32 on the GPU, 3 small steps, short prompts: the losses must agree as on a CPU
#              (in bf16 they drift apart by rounding after step 1, so the speed stages cannot judge them)
#   losses-long   the same, long prompts (one stage each: together they overran one stage's limit on the H200)
#   memory     2×2048-token pairs (1024 prompt + 2 × 1024), default kernel: measured peak vs `lora-dpo estimate`
#   short-causal  the short stage with lora-dpo on sdpa_causal (no mask; flash kernel)
#   long-sdpa  the long stage with lora-dpo on sdpa (its dense 4-D mask; measured 2.3× slower than flex on an H200)
#   ckpt       the memory stage with all, half (train.gradient_checkpointing_layers 0.5), auto (the fewest that
#              fit this GPU) and no layers checkpointed: s/step and peak of each, and the planner's prediction
#   offload    the memory stage with nothing, the embedding table (model.offload_embeddings), the checkpointed
#              layers' inputs (train.offload_activations) and both in CPU memory: the peak each saves (predicted:
#              1 GiB; layers × tokens × hidden × 2 bytes) and what it costs per step (offload.json)
#   profile-kernels  the profile stage on sdpa (dense mask) and sdpa_causal (no mask), each also on the
#              memory-efficient kernel (the T4's), 2 pairs per step: what decides whether auto should pick sdpa_causal
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/lora-dpo-gpu}
mkdir -p "$out" /tmp/site
log=$out/kit.log
start=$SECONDS
deadline=${KIT_DEADLINE:-100000}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORA_DPO_CACHE=${LORA_DPO_CACHE:-$PWD/.gpu-cache}
if [ -d .gpu/tokenizer ]; then  # the device has no demo-model package: fetch.sh saved its tokenizer
  export LORA_DPO_BENCH_TOKENIZER=$PWD/.gpu/tokenizer LORA_DPO_TEST_TOKENIZER=$PWD/.gpu/tokenizer
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ -d .gpu/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/wheels/*.whl
  fi
  cp -r .gpu/site/. /tmp/site/ 2>/dev/null
} 2>&1 | tee -a "$log"
export PYTHONPATH=/tmp/site:$PWD
python3 -c "
import torch, transformers, peft, bitsandbytes, trl, datasets, lora_dpo
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')
print('transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__,
      'trl', trl.__version__, 'datasets', datasets.__version__)" 2>&1 | tee -a "$log" || exit 1

skipped=()
stage() {  # stage NAME LIMIT MIN_NEEDED command...
  local name=$1 limit=$2 need=$3 left=$((deadline - (SECONDS - start)))
  shift 3
  if ((left < need)); then skipped+=("$name"); echo "=== $name: skipped, ${left}s left of the deadline" | tee -a "$log"
    return; fi
  ((limit > left)) && limit=$left
  echo "=== $name ($(date +%T), limit ${limit}s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}
want=" ${*:-model short long-compile gpu-tests profile-loop long short-compile profile-default profile long-offload long-b16 losses losses-long memory short-causal long-sdpa ckpt offload profile-kernels} "
on() { [[ $want == *" $1 "* ]]; }
# KIT_* variables shrink the kit for a smoke run on a CPU (e.g. KIT_MODEL=demo KIT_WORDS=16 KIT_TOKENS=32)
model="--model ${KIT_MODEL:-llama3-8b-random}"
w=${KIT_WORDS:-256}  # words per completion; prompts: long 4w (prompt ~2/3 of the tokens), short w/2 (~1/5)
m=${KIT_TOKENS:-1024}  # the memory stage's pairs: m prompt tokens + 2 × m completion tokens
steps=${KIT_STEPS:-7}
vs_trl="python3 benchmarks/vs_trl.py $model --batch 4 --steps $steps --warmup 2 --repeats 1 --checkpointing \
  --completion $w"
memory="python3 benchmarks/memory.py $model --prompt-tokens $m --completion-tokens $m --batch 1 --steps 3"
on model && stage model 240 30 python3 benchmarks/vs_trl.py $model --build-only
on short && stage short 240 150 $vs_trl --datasets short --short-prompt $((w / 2)) --repeats 2 --json "$out/short.json"
profile="python3 benchmarks/profile_step.py $model --steps 2 --rows 15 --shapes $((w / 2))x$w,$((4 * w))x$w,16x16"
on profile-default && stage profile-default 150 75 $profile --settings packed:flex_attention
on profile-loop && stage profile-loop 150 75 $profile --settings \
  packed:flex_attention,packed:flex_attention:loop,packed:flex_attention:vary,packed:flex_attention:vary:loop \
  --shapes $((w / 2))x$w,$((4 * w))x$w --steps 3 --rows 10
on short-compile && stage short-compile 240 90 $vs_trl --datasets short --short-prompt $((w / 2)) --compile \
  --trainers ours --json "$out/short-compile.json"
on long && stage long 240 120 $vs_trl --datasets long --long-prompt $((4 * w)) --json "$out/long.json"
on long-compile && stage long-compile 240 90 $vs_trl --datasets long --long-prompt $((4 * w)) --compile \
  --trainers ours --json "$out/long-compile.json"
on profile && stage profile 240 90 $profile --settings packed:flex_attention,packed:flex_attention:peft,packed:flex_attention:base-first,concatenated:sdpa
on long-offload && stage long-offload 180 90 $vs_trl --datasets long --long-prompt $((4 * w)) --offload both \
  --trainers ours --json "$out/long-offload.json"
on gpu-tests && stage gpu-tests 180 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
  tests/test_train.py tests/test_optim.py
on long-b16 && stage long-b16 240 150 $vs_trl --datasets long --long-prompt $((4 * w)) --batch 16 --steps 4 \
  --warmup 2 --json "$out/long-b16.json"
losses="python3 benchmarks/vs_trl.py $model --precision fp32 --batch 2 --steps 3 --repeats 1 --completion $((w / 4))"
on losses && stage losses 180 60 $losses --datasets short --short-prompt $((w / 8)) --json "$out/losses-short.json"
on losses-long && stage losses-long 180 60 $losses --datasets long --long-prompt $w --json "$out/losses-long.json"
on memory && stage memory 150 60 $memory --json "$out/memory.json"
on short-causal && stage short-causal 200 90 $vs_trl --datasets short --short-prompt $((w / 2)) --attn sdpa_causal \
  --json "$out/short-causal.json"
on long-sdpa && stage long-sdpa 240 120 $vs_trl --datasets long --long-prompt $((4 * w)) --attn sdpa \
  --json "$out/long-sdpa.json"
on ckpt && stage ckpt 240 150 $memory --checkpointing on,0.5,auto,off --json "$out/ckpt.json"
on offload && stage offload 200 60 $memory --offload off,embeddings,activations,both --json "$out/offload.json"
on profile-kernels && stage profile-kernels 240 90 $profile --batch 2 \
  --settings packed:sdpa,packed:sdpa_causal,packed:sdpa:efficient,packed:sdpa_causal:efficient
echo "=== done after $((SECONDS - start))s" | tee -a "$log"
python3 benchmarks/gpu/targets.py "$out" 2>&1 | tee -a "$log"
if ((${#skipped[@]})); then
  echo "=== next call (KIT_DEADLINE: the device time left, less ~90 s): KIT_DEADLINE=... bash benchmarks/gpu/run.sh ${skipped[*]}" | tee -a "$log"
fi
