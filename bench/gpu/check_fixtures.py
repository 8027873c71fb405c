"""Checks `--target cuda` artifacts of every fixture against its reference
outputs, on a machine with an NVIDIA GPU and no Rust: it runs the prebuilt
`smelt` binary (compile, run, generate) and compares with numpy.

Usage: python3 check_fixtures.py SMELT FIXTURES_DIR WORK_DIR [--weight-dtype bf16 | --dtype bf16] [--gpu-gemm cublas]

With `--gpu-gemm cublas` the weight products are cuBLAS GEMMs (the same
tolerances apply: f32 weights are multiplied in f32, no TF32).

What a pass means (../shared/fixtures/README.md; the GPU issue):
- f32 weights: logits and present key/values within 1e-3 absolute of the
  PyTorch f32 reference, greedy ids exactly equal;
- bf16 weights: max |got - want| / max |want| of the logits <= 2e-2 (greedy
  ids are reported, not required: bf16 rounding may flip near-ties);
- bf16 activations (`--dtype bf16`, weights bf16 too): ||got - want|| /
  ||want|| of the logits (and of the kv step's logits and present key/values,
  which stay f32 but are computed from bf16 values) <= 2e-2; greedy ids
  reported, not required.
Prints one line per check and a summary; exits 1 if any check fails.
"""
import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

ABS_TOL = 1e-3
CUBLAS = False
REL_TOL = 2e-2
NORM_REL = False
MODE = ""


def smelt(*args):
    r = subprocess.run([SMELT, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"smelt {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r.stdout


def err(got, want):
    got, want = got.astype(np.float64), want.astype(np.float64)
    if got.shape != want.shape:
        raise RuntimeError(f"shape {got.shape} != reference {want.shape}")
    a = float(np.max(np.abs(got - want)))
    if NORM_REL:
        return a, float(np.linalg.norm(got - want)) / max(float(np.linalg.norm(want)), 1e-30)
    return a, a / max(float(np.max(np.abs(want))), 1e-30)


def check(name, art, ref, has_kv, work):
    results = []
    inp, outp = os.path.join(work, "in.safetensors"), os.path.join(work, "out.safetensors")
    save_file({"input_ids": ref["input_ids"]}, inp)
    smelt("run", art, "--inputs", inp, "--outputs", outp)
    results.append(("logits", *err(load_file(outp)["logits"], ref["logits"])))
    if has_kv:
        feed = {}
        for k, t in ref.items():
            if k.startswith("kv.past."):
                feed["past_key_values." + k[len("kv.past."):]] = t
            elif k in ("kv.input_ids", "kv.attention_mask", "kv.position_ids"):
                feed[k[3:]] = t
        save_file(feed, inp)
        smelt("run", art, "--inputs", inp, "--outputs", outp)
        out = load_file(outp)
        a, r = err(out["logits"], ref["kv.logits"])
        for k, want in ref.items():
            if k.startswith("kv.present."):
                pa, pr = err(out["present." + k[len("kv.present."):]], want)
                a, r = max(a, pa), max(r, pr)
        results.append(("kv step", a, r))
    prompt = [int(x) for x in ref["prompt"].reshape(-1)]
    want = [int(x) for x in ref["greedy_ids"].reshape(-1)]
    out = smelt("generate", art, "--prompt-ids", ",".join(map(str, prompt)),
                "--max-new-tokens", len(want) - len(prompt), "--json")
    got = json.loads(out)["ids"]
    return results, got == want


def one(name, d, src, label, has_kv, bf16, work):
    """Compiles and checks one fixture artifact; returns (ok, row or None)."""
    ref = load_file(os.path.join(d, "reference.safetensors"))
    tag = f"{name}-{label}{MODE if bf16 else ''}{'-cublas' if CUBLAS else ''}"
    art = os.path.join(work, tag + ".smelt")
    scratch = os.path.join(work, tag)
    os.makedirs(scratch, exist_ok=True)
    # The f32 pass stores f32 weights even for a bf16 checkpoint (whose
    # default is its own type), so 1e-3 holds it to the f32 reference.
    extra = (["--dtype", "bf16"] if NORM_REL else ["--weight-dtype", "bf16"]) if bf16 else ["--weight-dtype", "f32"]
    # The references come from the model cast to its stored type in memory,
    # which rounds RoPE's frequencies too: a bf16/f16 checkpoint compiles
    # that way (`--rope-cast`, as the cargo fixture suites do).
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    stored = cfg.get("dtype") or cfg.get("torch_dtype")
    if label == "hf" and stored in ("bfloat16", "float16"):
        extra += ["--rope-cast", "bf16" if stored == "bfloat16" else "f16"]
    extra += ["--gpu-gemm", "cublas"] if CUBLAS else []
    try:
        smelt("compile", src, "-o", art, "--target", "cuda", "--gpu-arch", ARCH, *extra)
        results, greedy = check(name, art, ref, has_kv, scratch)
    except Exception as e:  # report and go on: every fixture is checked
        print(f"FAIL {name} ({label}): {e}", flush=True)
        return False, None
    ok = all((r if bf16 else a) <= (REL_TOL if bf16 else ABS_TOL) for _, a, r in results)
    ok = ok and (greedy or bf16)
    detail = ", ".join(f"{what} abs {a:.2e} rel {r:.2e}" for what, a, r in results)
    print(f"{'ok  ' if ok else 'FAIL'} {name} ({label}{', ' + MODE[1:] if bf16 else ''}{', cublas' if CUBLAS else ''}): "
          f"{detail}; "
          f"greedy {'exact' if greedy else 'differs'}", flush=True)
    return ok, dict(fixture=name, source=label, bf16=bf16, cublas=CUBLAS, checks=results, greedy_exact=greedy, ok=ok)


def main():
    global SMELT, ARCH, NORM_REL, MODE, CUBLAS
    SMELT, fixtures, work = sys.argv[1:4]
    bf16 = "--weight-dtype" in sys.argv and sys.argv[sys.argv.index("--weight-dtype") + 1] == "bf16"
    CUBLAS = "--gpu-gemm" in sys.argv and sys.argv[sys.argv.index("--gpu-gemm") + 1] == "cublas"
    # bf16 activations: `-bf16-act` files, norm-relative errors.
    NORM_REL = "--dtype" in sys.argv and sys.argv[sys.argv.index("--dtype") + 1] == "bf16"
    bf16 = bf16 or NORM_REL
    MODE = "-bf16-act" if NORM_REL else "-bf16"
    ARCH = os.environ.get("GPU_ARCH", "sm_90a")
    os.makedirs(work, exist_ok=True)
    jobs = []
    for name in sorted(os.listdir(fixtures)):
        d = os.path.join(fixtures, name)
        if not os.path.isfile(os.path.join(d, "reference.safetensors")):
            continue
        for src, label, has_kv in [(d, "hf", True), (os.path.join(d, "model-kv.onnx"), "model-kv.onnx", True),
                                   (os.path.join(d, "model.onnx"), "model.onnx", False)]:
            if os.path.exists(src):
                jobs.append((name, d, src, label, has_kv, bf16, work))
    # Artifacts are independent: compile and check them a few at a time.
    with concurrent.futures.ThreadPoolExecutor(int(os.environ.get("JOBS", "6"))) as pool:
        done = list(pool.map(lambda j: one(*j), jobs))
    failed = sum(not ok for ok, _ in done)
    rows = [r for _, r in done if r is not None]
    with open(os.path.join(work, f"fixtures{MODE if bf16 else ''}{'-cublas' if CUBLAS else ''}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    passed = sum(r["ok"] for r in rows)
    print(f"{passed}/{passed + failed} fixture artifacts pass", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
