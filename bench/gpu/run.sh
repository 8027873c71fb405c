#!/usr/bin/env bash
# The GPU check: correctness first, then the benchmark, on a machine with an
# NVIDIA GPU, python3 (torch, transformers, numpy) and no Rust or LLVM.
# Needs the folder bench/gpu/prepare.sh fills (default .gpu): a prebuilt
# `smelt` (with the llvm feature, xz-compressed), the fixtures, and
# ../shared/bench's make_models.py, gen_fixtures.py and anchors_gpu.py.
#
#   bench/gpu/run.sh [PREPARED_DIR]        # from the repository root
#
# Phases (each stage under its own time limit, so one failure cannot eat a
# short device lease):
#   1. in the background: the benchmark checkpoints are made (weights drawn
#      on the GPU) and compiled for sm_90a with bf16 weights, twice: with
#      generated weight-product kernels and with `--gpu-gemm cublas`;
#   2. meanwhile every fixture is compiled for cuda and checked against its
#      references, with f32 and with bf16 weights, then again with
#      `--gpu-gemm cublas` (check_fixtures.py);
#   3. alone on the GPU: `smelt bench` per model (prefill 512 tokens, decode
#      after 512 cached; the cublas artifact with fewer repetitions), then
#      PyTorch eager and (time permitting)
#      transformers' static-cache compiled generate (anchors_gpu.py);
#   4. the summary table (table.py).
# Results: every log in OUT/results.tgz (written on exit), the table in
# OUT/summary.txt.
# Env: OUT (default /tmp/smelt-gpu-out), MODELS (default
# "llama3.2-1b llama3.1-8b"), BUDGET (seconds the whole run may take,
# default 480), SKIP_FIXTURES=1, SKIP_BENCH=1, SKIP_ANCHORS=1, SKIP_CUBLAS=1.
# cuBLAS is loaded at run time: libcublas from the system or from
# PyTorch's nvidia wheels (put on LD_LIBRARY_PATH below).
set -uo pipefail
G=$(realpath "${1:-.gpu}")
OUT=${OUT:-/tmp/smelt-gpu-out}
W=${WORK:-/tmp/smelt-gpu}
MODELS=${MODELS:-"llama3.2-1b llama3.1-8b"}
BUDGET=${BUDGET:-480}
HERE=$(dirname "$(realpath "$0")")
R="$W/results"
mkdir -p "$OUT" "$W" "$R"
trap 'tar czf "$R/results.tgz" -C "$R" . 2>/dev/null' EXIT
export PYTHONUNBUFFERED=1
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
stamp() { echo "== [$(elapsed)s] $*"; }
left() { echo $(( BUDGET - $(elapsed) )); }
# A stage's time limit: N seconds, or what the budget has left (less a margin).
lim() { local l=$(( $(left) - 20 )); [ "$l" -lt "$1" ] && echo $(( l > 5 ? l : 5 )) || echo "$1"; }

. "$HERE/env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
$S --version

status=0
if [ -z "${SKIP_BENCH:-}" ]; then
  stamp "background: make and compile $MODELS"
  (
    timeout 200 python3 "$HERE/make_weights.py" "$G" "$W/models" $MODELS > "$R/make.txt" 2>&1
    for m in $MODELS; do
      ( /usr/bin/time -v timeout 300 "$S" compile "$W/models/$m" -o "$W/$m.smelt" --target cuda \
          --weight-dtype bf16 --gpu-arch sm_90a > "$R/compile-$m.txt" 2> "$R/compile-$m.time"
        [ -z "${SKIP_CUBLAS:-}" ] && timeout 240 "$S" compile "$W/models/$m" -o "$W/$m-cublas.smelt" --target cuda \
          --weight-dtype bf16 --gpu-arch sm_90a --gpu-gemm cublas > "$R/compile-$m-cublas.txt" 2>&1
        rm -rf "$W/models/$m" ) &
    done
    wait
  ) &
  BG=$!
fi

if [ -z "${SKIP_FIXTURES:-}" ]; then
  stamp "fixtures, f32 weights (abs err <= 1e-3, greedy exact)"
  timeout $(lim 120) python3 "$HERE/check_fixtures.py" "$S" "$G/fixtures" "$W/fx" 2>&1 | tee "$R/fixtures-f32.txt" || status=1
  stamp "fixtures, bf16 weights (relative logits err <= 2e-2)"
  timeout $(lim 90) python3 "$HERE/check_fixtures.py" "$S" "$G/fixtures" "$W/fx" --weight-dtype bf16 2>&1 \
    | tee "$R/fixtures-bf16.txt" || status=1
  stamp "fixtures, bf16 activations (--dtype bf16; relative logits err <= 2e-2)"
  timeout $(lim 90) python3 "$HERE/check_fixtures.py" "$S" "$G/fixtures" "$W/fx" --dtype bf16 2>&1 \
    | tee "$R/fixtures-bf16-act.txt" || status=1
  if [ -z "${SKIP_CUBLAS:-}" ]; then
    stamp "fixtures, --gpu-gemm cublas, f32 then bf16 weights"
    timeout $(lim 90) python3 "$HERE/check_fixtures.py" "$S" "$G/fixtures" "$W/fx" --gpu-gemm cublas 2>&1 \
      | tee "$R/fixtures-cublas.txt" || status=1
    timeout $(lim 60) python3 "$HERE/check_fixtures.py" "$S" "$G/fixtures" "$W/fx" --weight-dtype bf16 \
      --gpu-gemm cublas 2>&1 | tee "$R/fixtures-bf16-cublas.txt" || status=1
  fi
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  stamp "waiting for the benchmark models"
  while kill -0 $BG 2>/dev/null && [ "$(left)" -gt 90 ]; do sleep 2; done
  cat "$R/make.txt"
  for m in $MODELS; do
    cat "$R/compile-$m.txt"; grep -E 'Elapsed|Maximum resident|Command exited' "$R/compile-$m.time"
    [ -d "$W/$m.smelt" ] || { echo "no artifact for $m"; tail -3 "$R/compile-$m.time"; status=1; continue; }
    stamp "bench $m"
    timeout $(lim 90) "$S" bench "$W/$m.smelt" --device cuda --prompt 512 --ctx 512 --reps 10 --json | tee "$R/bench-$m.json" || status=1
    SMELT_PROFILE=1 timeout $(lim 40) "$S" bench "$W/$m.smelt" --device cuda --prompt 1 --ctx 512 --reps 2 > "$R/profile-$m.txt" 2>&1
    head -25 "$R/profile-$m.txt"
    if [ -z "${SKIP_CUBLAS:-}" ]; then
      cat "$R/compile-$m-cublas.txt" 2>/dev/null
      if [ -d "$W/$m-cublas.smelt" ]; then
        stamp "bench $m, --gpu-gemm cublas"
        timeout $(lim 60) "$S" bench "$W/$m-cublas.smelt" --device cuda --prompt 512 --ctx 512 --reps 5 --json \
          | tee "$R/bench-$m-cublas.json" || status=1
      else
        echo "no cublas artifact for $m"; status=1
      fi
    fi
  done
fi

if [ -z "${SKIP_ANCHORS:-}" ] && [ "$(left)" -gt 40 ]; then
  # transformers' compiled generate takes minutes to warm up: only when the budget allows.
  compile=""
  [ "$(left)" -gt 200 ] && compile="llama3.2-1b"
  [ "$(left)" -gt 330 ] && compile="llama3.2-1b,llama3.1-8b"
  stamp "anchors: PyTorch eager${compile:+, compiled generate for $compile}"
  OUT="$R" MODELS=$(echo $MODELS | tr ' ' ,) COMPILE_MODELS="${compile:-none}" SKIP_CEILINGS=1 \
    timeout $(( $(left) - 10 )) python3 "$G/anchors_gpu.py" 2>&1 | grep '^{' | tail -12
fi

stamp "summary"
python3 "$HERE/table.py" "$R" | tee "$OUT/summary.txt"
exit $status
