"""Checks a smelt artifact against transformers on a checkpoint folder:
random input_ids of T tokens through `AutoModelForCausalLM.from_pretrained`
in float32 (the reference: a bf16 checkpoint is widened exactly) and through
`smelt run ARTIFACT`; prints the largest logits difference, relative to the
largest logit, per position, and how often the top-1 tokens agree.

Run: python scripts/check_transformers.py MODEL_DIR ARTIFACT [T] [--smelt PATH]
(needs torch, transformers, safetensors, numpy; `smelt` from target/release).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("artifact")
ap.add_argument("tokens", nargs="?", type=int, default=37)
ap.add_argument("--smelt", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "smelt"))
a = ap.parse_args()

torch.manual_seed(1)
m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
ids = torch.randint(0, m.config.vocab_size, (1, a.tokens))
with torch.no_grad():
    ref = m(ids).logits[0].numpy()
with tempfile.TemporaryDirectory() as tmp:
    inp, outp = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    save_file({"input_ids": ids.to(torch.int64), "attention_mask": torch.ones(1, a.tokens, dtype=torch.int64)}, inp)
    r = subprocess.run([a.smelt, "run", a.artifact, "--inputs", inp, "--outputs", outp], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"smelt run failed:\n{r.stderr}")
    got = load_file(outp)["logits"].float().numpy().reshape(ref.shape)
d = np.abs(got - ref)
per = d.max(-1) / np.abs(ref).max(-1)
print(f"T={a.tokens}: max |got - want| {d.max():.3e} (largest logit {np.abs(ref).max():.3f}, relative {d.max() / np.abs(ref).max():.2e}); "
      f"top-1 agrees at {np.mean(got.argmax(-1) == ref.argmax(-1)) * 100:.1f}% of positions")
print("relative error by position:", " ".join(f"{x:.1e}" for x in per[:8]), "...", " ".join(f"{x:.1e}" for x in per[-4:]))
