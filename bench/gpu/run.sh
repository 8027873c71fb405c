#!/usr/bin/env bash
# The GPU check: correctness first, then the benchmark, on a machine with an
# NVIDIA GPU, python3 (torch, transformers, numpy) and no Rust or LLVM.
# Needs the folder bench/gpu/prepare.sh fills (default .gpu): a prebuilt
# `smelt` (with the llvm feature, xz-compressed), the fixtures, and
# ../shared/bench's make_models.py, gen_fixtures.py and anchors_gpu.py.
#
#   bench/gpu/run.sh [PREPARED_DIR]        # from the repository root
#
# Env: OUT (results folder, default /tmp/smelt-gpu-out), MODELS (benchmark
# models, default "llama3.2-1b llama3.1-8b"), SKIP_FIXTURES=1, SKIP_BENCH=1,
# SKIP_ANCHORS=1, COMPILE_MODELS (passed to anchors_gpu.py).
set -uo pipefail
G=$(realpath "${1:-.gpu}")
OUT=${OUT:-/tmp/smelt-gpu-out}
W=${WORK:-/tmp/smelt-gpu}
MODELS=${MODELS:-"llama3.2-1b llama3.1-8b"}
HERE=$(dirname "$(realpath "$0")")
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open('$G/smelt.xz'), open('$W/smelt','wb'))" || exit 1
chmod +x "$W/smelt"
S="$W/smelt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$S --version

status=0
if [ -z "${SKIP_FIXTURES:-}" ]; then
  stamp "fixtures, f32 weights (abs err <= 1e-3, greedy exact)"
  python3 "$HERE/check_fixtures.py" "$S" "$G/fixtures" "$W/fx" 2>&1 | tee "$OUT/fixtures-f32.txt" || status=1
  stamp "fixtures, bf16 weights (relative logits err <= 2e-2)"
  python3 "$HERE/check_fixtures.py" "$S" "$G/fixtures" "$W/fx" --weight-dtype bf16 2>&1 | tee "$OUT/fixtures-bf16.txt" || status=1
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  for m in $MODELS; do
    stamp "make $m"
    python3 "$HERE/make_weights.py" "$G" "$W/models" "$m" || { status=1; continue; }
    stamp "compile $m"
    /usr/bin/time -v "$S" compile "$W/models/$m" -o "$W/$m.smelt" --target cuda --weight-dtype bf16 --gpu-arch sm_90a \
      2> "$OUT/compile-$m.time" | tee "$OUT/compile-$m.txt" || { status=1; tail -5 "$OUT/compile-$m.time"; continue; }
    grep -E 'Elapsed|Maximum resident' "$OUT/compile-$m.time"
    rm -rf "$W/models/$m"
    stamp "bench $m"
    "$S" bench "$W/$m.smelt" --device cuda --prompt 512 --ctx 512 --reps 20 --json | tee "$OUT/bench-$m.json" || status=1
    SMELT_PROFILE=1 "$S" bench "$W/$m.smelt" --device cuda --prompt 1 --ctx 512 --reps 3 > "$OUT/profile-$m.txt" 2>&1
    rm -rf "$W/$m.smelt"
  done
fi

if [ -z "${SKIP_ANCHORS:-}" ]; then
  stamp "anchors (PyTorch eager, transformers static-cache compiled generate)"
  OUT="$OUT" MODELS=$(echo $MODELS | tr ' ' ,) COMPILE_MODELS=${COMPILE_MODELS:-llama3.2-1b,llama3.1-8b} \
    python3 "$G/anchors_gpu.py" 2>&1 | grep -v Warning | tail -20
fi

stamp "summary"
python3 "$HERE/table.py" "$OUT"
exit $status
