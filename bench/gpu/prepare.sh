#!/usr/bin/env bash
# Fills a git-ignored folder (default .gpu) with what bench/gpu/run.sh needs
# on a GPU machine that has no Rust, LLVM or ../shared: smelt built with the
# `llvm` feature (release, stripped, xz-compressed, with any shared library
# it needs that such a machine may lack), the fixtures, and
# ../shared/bench's model and anchor scripts.
#
#   bench/gpu/prepare.sh [DIR]      # then carry DIR and run bench/gpu/run.sh DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-.gpu}
SHARED=${SHARED:-../shared}
cargo build --release --features llvm --bin smelt
rm -rf "$D" && mkdir -p "$D/fixtures"
strip -o "$D/smelt" target/release/smelt
xz -T2 -6 -f "$D/smelt"
for f in "$SHARED"/fixtures/tiny-*; do
  n=$(basename "$f")
  mkdir -p "$D/fixtures/$n"
  cp "$f"/{config.json,model.safetensors,tokenizer.json,reference.safetensors,reference.json,model.onnx,model-kv.onnx} "$D/fixtures/$n/"
done
cp "$SHARED"/bench/{make_models.py,anchors_gpu.py} "$SHARED"/fixtures/gen/gen_fixtures.py "$D/"
# Shared libraries LLVM pulls in that a GPU machine's image may lack; run.sh
# puts them behind the system's own (LD_LIBRARY_PATH is only a fallback
# there: it loads them only when the system has none).
mkdir -p "$D/lib"
for l in libffi.so.8 libz.so.1 libzstd.so.1; do
  p=$(ldd target/release/smelt | awk -v l="$l" '$1 == l { print $3 }')
  [ -n "$p" ] && cp -L "$p" "$D/lib/"
done
du -sh "$D"
