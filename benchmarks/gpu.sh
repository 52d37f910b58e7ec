#!/usr/bin/env bash
# The full-size path on one GPU, in one script of at most 8 minutes:
#   1. images/s of BK-SDM-v2-small at 512x512, 20 steps, batch 16, in the GPU dtype (bf16), eager
#      and with the UNet compiled, against the reference loop measured in the same run, with
#      one batch's seconds per component (text encoder, UNet, VAE decoder);
#   2. the same for BK-SDM-small;
#   3. two rounds of cmfl-relay on the full-size architecture (random weights written on the
#      machine), 4 clients each in its own worker process on the one GPU, generation batch 16,
#      class tokens trained 1 epoch in batches of 8 (the defaults are 5 and 32; the time fits
#      8 minutes and four workers' UNet backward passes fit the GPU): round wall time, seconds
#      per phase, peak GPU memory per worker and from nvidia-smi;
#   4. one round of diffusion-lora (the federated LoRA of the full-size UNet): seconds, bytes.
# Every step writes JSON into OUT_DIR (default benchmarks/results/gpu); a step that fails or
# runs out of its time limit is recorded and the next one runs. The summary comes last.
#
#   benchmarks/gpu.sh [--dry-run] [OUT_DIR [STEP...]]
#
# STEP names the steps to run (default all): generation-bk-sdm-v2-small, round-cmfl-relay,
# round-diffusion-lora, generation-bk-sdm-small.
#
# --dry-run runs the steps at a tiny size on the CPU (the tiny preset, 2 denoising steps,
# 2 clients, compile without code generation; one generation step, as the two differ only in
# the architecture): CI runs it so that a broken script is caught without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
out="${1:-benchmarks/results/gpu}"
only=("${@:2}")
mkdir -p "$out"
: >"$out/steps.txt"
export PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # four workers share one GPU

# step NAME LIMIT_S COMMAND...: run it under a time limit; record its exit status and seconds
step() {
  local name=$1 limit=$2 start rc
  shift 2
  if [ "${#only[@]}" -gt 0 ] && [[ " ${only[*]} " != *" $name "* ]]; then
    return 0
  fi
  echo "===== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$out/steps.txt"
}

if command -v nvidia-smi >/dev/null; then
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1
fi

if [ "$dry" -eq 1 ]; then
  gen=(--images 4 --batch-size 2 --steps 2 --reference-images 1 --reference-steps 2
       --compare-compile --compile-backend eager --profile --threads 1)
  # the two generation steps differ only in --full-size, which a dry run replaces by tiny
  step generation-bk-sdm-v2-small 300 python3 -m benchmarks.generation "${gen[@]}" \
    --json "$out/generation-bk-sdm-v2-small.json" --results "$out/generation-results.json"
  fed=(--dry-run --clients 2 --set backbone.threads=1 tokens.objective=clip generation.images-per-class=1
       generation.steps=2 diffusion.eval-samples=4 diffusion.sample-steps=2)
else
  gen=(--height 512 --width 512 --images 32 --batch-size 16 --steps 20 --reference-images 2
       --compare-compile --profile)
  step generation-bk-sdm-v2-small 200 python3 -m benchmarks.generation \
    --full-size bk-sdm-v2-small "${gen[@]}" --json "$out/generation-bk-sdm-v2-small.json" --results "$out/generation-results.json"
  fed=(--arch bk-sdm-v2-small --clients 4 --set generation.batch-size=16 backbone.threads=4
       tokens.batch-size=8 tokens.epochs=1
       --weights-dir "${TMPDIR:-/tmp}/cmfl-gpu-weights")
fi
step round-cmfl-relay 200 python3 -m benchmarks.gpu_round --method cmfl-relay --rounds 2 \
  "${fed[@]}" --json "$out/round-cmfl-relay.json"
step round-diffusion-lora 170 python3 -m benchmarks.gpu_round --method diffusion-lora --rounds 1 \
  "${fed[@]}" --json "$out/round-diffusion-lora.json"
if [ "$dry" -eq 0 ]; then
  step generation-bk-sdm-small 90 python3 -m benchmarks.generation \
    --full-size bk-sdm-small "${gen[@]}" --json "$out/generation-bk-sdm-small.json" --results "$out/generation-results.json"
fi
python3 -m benchmarks.gpu_summary "$out"
