"""Exports models that are not the fixtures with torch.onnx (the dynamo exporter,
as users do), runs them with ONNX Runtime, and checks that smelt's compiled
artifact gives the same outputs.

The configurations differ from the fixtures in every dimension that matters to
an importer: hidden sizes and head dims that are not powers of two, more
layers, other GQA ratios, rope scaling (llama3, linear), biases, partial
rotary, sliding windows, tied and untied heads. Inputs have other batch, seq
and past sizes than the export examples, so symbolic shapes are exercised.

Needs torch, transformers, onnxruntime (see ../shared/bench/README.md for the
venv) and a built smelt binary:

    ~/.venvs/bench/bin/python scripts/onnx_exports.py OUT_DIR [--smelt target/release/smelt] [name ...]
    ~/.venvs/bench/bin/python scripts/onnx_exports.py OUT_DIR --model /path/to/bench/smollm2-135m

Tolerance: the fixtures' (max |smelt - ort| <= 1e-3 on logits and presents,
f32). Prints one line per model and export and exits non-zero on a mismatch.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (os.path.join(HERE, "..", "..", "shared", "fixtures", "gen"), os.path.join(HERE, "..", "..", "shared", "bench")):
    sys.path.insert(0, os.path.abspath(p))
import gen_fixtures as G  # noqa: E402

TOL = 1e-3

# name -> (class, config); none of these shapes is a fixture's.
MODELS = {
    "llama-h96-l3-gqa3": ("LlamaForCausalLM", dict(
        vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-hd40-linear": ("LlamaForCausalLM", dict(
        vocab_size=211, hidden_size=120, intermediate_size=256, num_hidden_layers=2, head_dim=40,
        num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen2-h80-bias": ("Qwen2ForCausalLM", dict(
        vocab_size=257, hidden_size=80, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistral-window3": ("MistralForCausalLM", dict(
        vocab_size=128, hidden_size=48, intermediate_size=100, num_hidden_layers=2, head_dim=24,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=3, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen3-hd40": ("Qwen3ForCausalLM", dict(
        vocab_size=200, hidden_size=64, intermediate_size=160, num_hidden_layers=3, head_dim=40,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    "gemma-h96": ("GemmaForCausalLM", dict(
        vocab_size=190, hidden_size=96, intermediate_size=192, num_hidden_layers=2, head_dim=48,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh")),
    "phi3-partial": ("Phi3ForCausalLM", dict(
        vocab_size=150, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, partial_rotary_factor=0.5,
        tie_word_embeddings=False, pad_token_id=0)),
}


def smelt(binary, *args):
    r = subprocess.run([binary, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"smelt {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def compare(binary, onnx_path, feeds, want, names, work):
    art = onnx_path + ".smelt"
    smelt(binary, "compile", onnx_path, "-o", art)
    inp, out = os.path.join(work, "inputs.safetensors"), os.path.join(work, "outputs.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in feeds.items()}, inp)
    smelt(binary, "run", art, "--inputs", inp, "--outputs", out)
    got = load_file(out)
    errs = {n: float(np.abs(got[n].astype(np.float64) - w.astype(np.float64)).max()) for n, w in zip(names, want)}
    return max(errs.values()), max(errs, key=errs.get)


def ort(path, feeds):
    import onnxruntime as rt
    return rt.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def fixed_batch(path):
    """The batch size an export fixed (torch specialises a size-1 example), or None."""
    import onnx
    d = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") else None


def check_model(binary, model, out, seed):
    """Exports `model` (an f32 eval-mode HF model) into `out` and checks both exports."""
    cfg, rows = model.config, []
    L, KVH, HD = G.kv_dims(cfg)
    g = np.random.default_rng(seed)
    p = os.path.join(out, "model.onnx")
    if not os.path.exists(p):
        G.export_logits(model, p)
    ids = g.integers(0, cfg.vocab_size, (fixed_batch(p) or 3, 11)).astype(np.int64)
    want = ort(p, {"input_ids": ids})
    err, worst = compare(binary, p, {"input_ids": ids}, want, ["logits"], out)
    rows.append(("model.onnx", f"batch {ids.shape[0]}, seq 11", err, worst))
    p = os.path.join(out, "model-kv.onnx")
    if not os.path.exists(p):
        B, S, P = 1, 3, 4
        ex = (torch.randint(0, cfg.vocab_size, (B, S)), torch.ones(B, P + S, dtype=torch.int64),
              torch.arange(P, P + S).unsqueeze(0), [torch.randn(B, KVH, P, HD) for _ in range(2 * L)])
        G.export_kv(model, p, ex)
    ins, outs = G.kv_names(L)
    for B, S, P in ((fixed_batch(p) or 2, 5, 6), (1, 1, 9)):  # a prefill chunk after a past, and a decode step
        feeds = {"input_ids": g.integers(0, cfg.vocab_size, (B, S)).astype(np.int64),
                 "attention_mask": np.ones((B, P + S), np.int64),
                 "position_ids": np.broadcast_to(np.arange(P, P + S), (B, S)).astype(np.int64).copy()}
        for n in ins[3:]:
            feeds[n] = g.standard_normal((B, KVH, P, HD)).astype(np.float32)
        want = ort(p, feeds)
        err, worst = compare(binary, p, feeds, want, ["logits"] + [o for o in outs[1:]], out)
        rows.append(("model-kv.onnx", f"batch {B}, seq {S}, past {P}", err, worst))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("names", nargs="*")
    ap.add_argument("--smelt", default=os.path.join(HERE, "..", "target", "release", "smelt"))
    ap.add_argument("--model", help="an existing folder with model.onnx and model-kv.onnx (e.g. from make_models.py)")
    a = ap.parse_args()
    binary = os.path.abspath(a.smelt)
    results, bad = [], 0
    if a.model:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
        todo = [(os.path.basename(a.model.rstrip("/")), model, a.model)]
    else:
        todo = []
        for name in a.names or list(MODELS):
            cls, kw = MODELS[name]
            torch.manual_seed(0)
            model, _ = G.tiny(cls, **kw)()
            model = G.reinit(model, 1).eval()
            out = os.path.join(a.out, name)
            os.makedirs(out, exist_ok=True)
            todo.append((name, model, out))
    for name, model, out in todo:
        for export, shape, err, worst in check_model(binary, model, out, 7):
            ok = err <= TOL
            bad += not ok
            results.append(dict(model=name, export=export, inputs=shape, max_abs_err=err, worst=worst, ok=ok))
            print(f"{'ok ' if ok else 'BAD'} {name:22} {export:14} {shape:24} max|smelt-ort| {err:.2e} ({worst})",
                  flush=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"{len(results) - bad} of {len(results)} match within {TOL}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
