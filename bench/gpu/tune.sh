#!/usr/bin/env bash
# The GPU tuning check (issue 7's GPU half), on a machine with an NVIDIA GPU
# and the folder bench/gpu/prepare.sh fills (default .gpu):
#   1. make one benchmark checkpoint (weights drawn on the GPU) and compile it
#      for cuda with bf16 weights, untuned (--no-tuning);
#   2. `smelt tune --target cuda --budget TUNE_BUDGET` on it (every variant
#      is checked against the reference interpreter on the GPU first; the
#      table of defaults, winners and speedups is printed);
#   3. recompile with the database (it must say how many GPU kernels use
#      measured parameters), and compile once more to show the choices are
#      the same (the two plans' kernel lists are compared);
#   4. `smelt bench` of the untuned and tuned artifacts, alternately
#      (ROUNDS rounds), then a table of decode and prefill medians.
#
#   bench/gpu/tune.sh [PREPARED_DIR]      # from the repository root
#
# Env: OUT (default /tmp/smelt-gpu-out), MODEL (default llama3.2-1b),
# TUNE_BUDGET (default 120), ROUNDS (default 3).
set -uo pipefail
G=$(realpath "${1:-.gpu}")
OUT=${OUT:-/tmp/smelt-gpu-out}
W=${WORK:-/tmp/smelt-gpu}
MODEL=${MODEL:-llama3.2-1b}
TUNE_BUDGET=${TUNE_BUDGET:-120}
ROUNDS=${ROUNDS:-3}
HERE=$(dirname "$(realpath "$0")")
mkdir -p "$OUT" "$W"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }

# cuBLAS is one of the variants the tuner times (found as run.sh finds it).
. "$HERE/env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
DB="$W/tuning.json"
rm -f "$DB"

stamp "make and compile $MODEL (untuned)"
[ -d "$W/models/$MODEL" ] || timeout 200 python3 "$HERE/make_weights.py" "$G" "$W/models" "$MODEL" || exit 1
C=(compile "$W/models/$MODEL" --target cuda --weight-dtype bf16 --gpu-arch sm_90a)
timeout 300 "$S" "${C[@]}" -o "$W/untuned.smelt" --no-tuning || exit 1

stamp "smelt tune --target cuda --budget $TUNE_BUDGET"
timeout $(( TUNE_BUDGET + 180 )) "$S" tune "$W/untuned.smelt" --target cuda --budget "$TUNE_BUDGET" \
  --prompt 512 --db "$DB" | tee "$OUT/tune-table.txt"

stamp "recompile with the database, twice"
timeout 300 "$S" "${C[@]}" -o "$W/tuned.smelt" --tuning-db "$DB" 2>&1 | grep -E 'tuning:|compiled' || exit 1
timeout 300 "$S" "${C[@]}" -o "$W/tuned2.smelt" --tuning-db "$DB" 2>&1 | grep -E 'tuning:' || exit 1
python3 - "$W/tuned.smelt" "$W/tuned2.smelt" <<'PY'
import json, sys
a, b = (json.load(open(f"{d}/manifest.json"))["cuda"]["kernels"] for d in sys.argv[1:3])
key = lambda ks: [(k["symbol"], (k.get("tuning") or {}).get("params")) for k in ks]
print("same kernel choices in both tuned compiles:", key(a) == key(b))
measured = [k for k in a if (k.get("tuning") or {}).get("source") == "measured"]
print(f"{len(measured)} kernels use measured parameters")
PY

stamp "bench untuned vs tuned, $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  for a in untuned tuned; do
    timeout 120 "$S" bench "$W/$a.smelt" --device cuda --prompt 512 --ctx 512 --reps 10 --json 2>/dev/null \
      | tail -1 | sed "s/^/$a /" >> "$OUT/tune-bench.txt"
  done
done
python3 - "$OUT/tune-bench.txt" <<'PY'
import json, statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    j = json.loads(js)
    rows.setdefault(name, []).append((j["decode_ms"][0], j["prefill_ms"][0]))
print(f"{'artifact':10s} {'decode ms':>10s} {'prefill ms':>11s}")
med = {}
for name, v in rows.items():
    med[name] = (st.median(x[0] for x in v), st.median(x[1] for x in v))
    print(f"{name:10s} {med[name][0]:10.3f} {med[name][1]:11.2f}")
if "untuned" in med and "tuned" in med:
    u, t = med["untuned"], med["tuned"]
    print(f"speedup    {u[0] / t[0]:9.3f}x {u[1] / t[1]:10.3f}x")
PY
