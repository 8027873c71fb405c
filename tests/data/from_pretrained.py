"""Logits of a fixture checkpoint as transformers' `from_pretrained` loads it
(float32), for `tests/fixtures.rs`: the fixtures' own references come from
the model cast in memory to its stored dtype and back, which rounds the RoPE
frequencies of a bf16 model; a checkpoint loaded from disk keeps them exact.

Run: python tests/data/from_pretrained.py ../shared/fixtures/tiny-qwen2 tests/data/tiny-qwen2-from-pretrained.safetensors
(transformers 5.24, torch; the fixture's `reference.safetensors` input_ids).
"""
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

folder, out = sys.argv[1], sys.argv[2]
ids = load_file(f"{folder}/reference.safetensors")["input_ids"]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(ids, use_cache=False).logits.float()
save_file({"input_ids": ids, "logits": logits.contiguous()}, out,
          metadata={"transformers": transformers.__version__, "torch": torch.__version__})
print(f"{out}: logits {tuple(logits.shape)}")
