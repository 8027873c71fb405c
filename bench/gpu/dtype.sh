#!/usr/bin/env bash
# bf16 activations on a benchmark model, on a machine with an NVIDIA GPU and
# the folder bench/gpu/prepare.sh fills (default .gpu): makes MODEL's
# checkpoint on the GPU, compiles it for sm_90a with bf16 weights and f32
# activations (`--weight-dtype bf16`) and with bf16 activations
# (`--dtype bf16`), runs both on one 64-token input and compares the logits,
# generates 8 tokens with each and benches both (prefill 512, decode after
# 512 cached).
#
#   bench/gpu/dtype.sh [PREPARED_DIR]      # from the repository root
#
# Env: MODEL (default llama3.2-1b).
set -u
export PYTHONUNBUFFERED=1
G=$(realpath "${1:-.gpu}")
W=${WORK:-/tmp/smelt-gpu}
MODEL=${MODEL:-llama3.2-1b}
HERE=$(dirname "$(realpath "$0")")
mkdir -p "$W"
. "$HERE/env.sh" > /dev/null
[ -d "$W/models/$MODEL" ] || timeout 200 python3 "$HERE/make_weights.py" "$G" "$W/models" "$MODEL" 2>&1 | tail -1
python3 -c "
import json, numpy as np; from safetensors.numpy import save_file
vocab = min(json.load(open('$W/models/$MODEL/config.json'))['vocab_size'], 128000)
save_file({'input_ids': (np.arange(64, dtype=np.int64).reshape(1, 64) * 7919 % vocab)}, '$W/in.safetensors')"
for mode in f32act bf16act; do
  o="--weight-dtype bf16"; [ $mode = bf16act ] && o="--dtype bf16"
  timeout 120 "$S" compile "$W/models/$MODEL" -o "$W/$mode.smelt" --target cuda --gpu-arch sm_90a $o | tail -1
  timeout 60 "$S" run "$W/$mode.smelt" --inputs "$W/in.safetensors" --outputs "$W/$mode-out.safetensors" > /dev/null
  timeout 60 "$S" generate "$W/$mode.smelt" --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 8 --json 2>&1 | tail -1 | cut -c1-200
  timeout 120 "$S" bench "$W/$mode.smelt" --device cuda --prompt 512 --ctx 512 --reps 10 --json 2>/dev/null | tail -1 \
    | sed "s/^/$mode /" | cut -c1-300
done
python3 - "$W" "$MODEL" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file
w, model = sys.argv[1:3]
a = load_file(f"{w}/f32act-out.safetensors")["logits"].astype(np.float64)
b = load_file(f"{w}/bf16act-out.safetensors")["logits"].astype(np.float64)
print(f"{model}, 64 tokens: bf16 vs f32 activations (bf16 weights both): norm rel "
      f"{np.linalg.norm(a - b) / np.linalg.norm(a):.2e}, max abs {np.abs(a - b).max():.3e} of max "
      f"{np.abs(a).max():.3f}, top-1 agree {(a.argmax(-1) == b.argmax(-1)).mean():.3f}")
PY
