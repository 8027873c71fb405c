"""Prints the GPU check's summary table from the files bench/gpu/run.sh
wrote into OUT: fixture pass counts, and per model smelt's decode and
prefill next to PyTorch's, with achieved weight bandwidth.

Usage: python3 table.py OUT
"""
import json
import os
import sys

out = sys.argv[1]


def lines(name):
    p = os.path.join(out, name)
    return open(p).read().splitlines() if os.path.exists(p) else []


for f in ("fixtures-f32.txt", "fixtures-bf16.txt", "fixtures-bf16-act.txt", "fixtures-cublas.txt",
          "fixtures-bf16-cublas.txt"):
    summary = [l for l in lines(f) if "fixture artifacts pass" in l]
    if summary:
        print(f"{f[:-4]:<22} {summary[-1]}")

anchors = []
p = os.path.join(out, "anchors_gpu.json")
if os.path.exists(p):
    anchors = json.load(open(p))


def anchor(what, model):
    for a in anchors:
        if a.get("what") == what and a.get("model") == model and "ms" in a:
            return a
    return None


print(f"{'model':<13} {'figure':<26} {'smelt ms':>9} {'eager ms':>9} {'compiled':>9} {'smelt TB/s':>10}")
def bench(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return None
    try:
        return json.loads(open(p).read().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


for m in ("llama3.2-1b", "llama3.1-8b"):
    b = bench(f"bench-{m}.json")
    if b is None:
        continue
    wbytes = b.get("weight_bytes")
    d = b["decode_ms"][0]
    de, dc = anchor("decode_eager", m), anchor("decode_generate_static", m)
    pe = anchor("prefill_eager", m)
    bw = f"{wbytes / d / 1e9:.2f}" if wbytes else "?"
    fmt = lambda a: f"{a['ms']:.2f}" if a else "-"
    print(f"{m:<13} {'decode, 512 cached':<26} {d:>9.2f} {fmt(de):>9} {fmt(dc):>9} {bw:>10}")
    print(f"{m:<13} {'prefill, 512 tokens':<26} {b['prefill_ms'][0]:>9.2f} {fmt(pe):>9} {'-':>9} {'':>10}")
    c = bench(f"bench-{m}-cublas.json")
    if c is not None:
        # The same model with --gpu-gemm cublas: cuBLAS weight products.
        cd = c["decode_ms"][0]
        cbw = f"{wbytes / cd / 1e9:.2f}" if wbytes else "?"
        print(f"{m:<13} {'decode, 512 cached, cublas':<26} {cd:>9.2f} {fmt(de):>9} {fmt(dc):>9} {cbw:>10}")
        print(f"{m:<13} {'prefill, 512, cublas':<26} {c['prefill_ms'][0]:>9.2f} {fmt(pe):>9} {'-':>9} {'':>10}")
