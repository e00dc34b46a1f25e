#!/usr/bin/env bash
# For whoever has an NVIDIA GPU: build candor with `--features cuda`, run the golden tests, and
# time training and generation on the GPU with `candor bench` (published shapes with random
# weights, so nothing is downloaded). Everything lands in one folder: env.txt (GPU, driver,
# nvcc), build.log, golden-tests.log, one BENCH.json and BENCH.log per benchmark, summary.txt.
#
#   scripts/gpu-check.sh [OUT_DIR]     # default gpu-check-YYYYmmdd-HHMMSS
#
# nvcc must be on PATH (or run scripts/setup-cuda.sh and use the CUDA_ROOT/PATH it prints);
# without nvidia-smi, set CUDA_COMPUTE_CAP (e.g. 90 for H100/H200, 80 for A100).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

{
    echo "candor $(git rev-parse --short HEAD 2>/dev/null || echo '(not a git checkout)')"
    nvidia-smi || echo "nvidia-smi: not available"
    nvcc --version
} >"$out/env.txt" 2>&1

echo "== cargo build --release --features cuda"
cargo build --release --features cuda 2>&1 | tee "$out/build.log"

# The golden tests run on the device CANDOR_TEST_DEVICE names (tests/common: `test_device`),
# against the same PyTorch/transformers/TRL values as on the CPU.
echo "== cargo test --release --features cuda (golden tests)"
CANDOR_TEST_DEVICE=cuda cargo test --release --features cuda --test golden_llama_tiny --test golden_architectures 2>&1 \
    | tee "$out/golden-tests.log"

candor=target/release/candor
failed=()
# bench NAME ARGS...: one `candor bench` on the GPU, its JSON in NAME.json, its log in NAME.log.
bench() {
    local name="$1"
    shift
    echo "== $name: candor $* --device cuda --json"
    if "$candor" "$@" --device cuda --json >"$out/$name.json" 2>"$out/$name.log"; then
        cat "$out/$name.json"
        echo "$name: ok" >>"$out/summary.txt"
    else
        echo "$name: FAILED (see $name.log)" | tee -a "$out/summary.txt"
        failed+=("$name")
    fi
}
: >"$out/summary.txt"
shape=qwen2.5-0.5b
bench train-dpo-f32 bench train --shape "$shape" --objective dpo --batch-size 4 --seq-len 256 --steps 3
bench train-dpo-bf16 bench train --shape "$shape" --objective dpo --batch-size 4 --seq-len 256 --steps 3 --dtype bf16
bench train-sft-bf16 bench train --shape "$shape" --objective sft --batch-size 8 --seq-len 512 --steps 3 --dtype bf16
bench train-dpo-lora-bf16 bench train --shape "$shape" --objective dpo --batch-size 4 --seq-len 256 --steps 3 \
    --dtype bf16 --lora-r 16 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
bench generate-f32 bench generate --shape "$shape" --batch-size 8 --max-new-tokens 64
bench generate-bf16 bench generate --shape "$shape" --batch-size 8 --max-new-tokens 64 --dtype bf16

echo "results in $out"
cat "$out/summary.txt"
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
