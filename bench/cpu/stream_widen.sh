#!/usr/bin/env bash
# Per-core streaming rate of f32 and bf16-pair weight reads (see
# stream_widen.c): median GB/s of ROUNDS interleaved rounds, one thread.
# Usage: bench/cpu/stream_widen.sh [ROUNDS]   (needs gcc and AVX-512; AVX512-BF16 for bf16-dp)
set -euo pipefail
cd "$(dirname "$0")"
rounds="${1:-5}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
configs="0:2:2 0:1:4 0:2:4 1:1:2 1:1:4 1:2:4 1:4:4"   # widen:lines:streams
# vdpbf16ps (WIDEN=2) where the CPU has AVX512-BF16.
grep -qw avx512_bf16 /proc/cpuinfo && configs="$configs 2:2:4"
for c in $configs; do
  IFS=: read -r w l s <<<"$c"
  gcc -O2 -march=native -DWIDEN="$w" -DLINES="$l" -DSTREAMS="$s" stream_widen.c -o "$out/sw-$w-$l-$s"
done
for r in $(seq "$rounds"); do
  for c in $configs; do
    IFS=: read -r w l s <<<"$c"
    echo "$c $("$out/sw-$w-$l-$s")"
  done
done | python3 -c '
import sys, statistics
runs = {}
for line in sys.stdin:
    c, gbs = line.split()
    runs.setdefault(c, []).append(float(gbs))
print("weights  lines/step  streams  GB/s (median)  rounds")
for c in sorted(runs):
    w, l, s = c.split(":")
    kind = ["f32", "bf16", "bf16-dp"][int(w)]
    print(f"{kind:8s} {l:>10s} {s:>8s} {statistics.median(runs[c]):14.1f}  {runs[c]}")
'
