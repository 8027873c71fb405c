"""Writes a benchmark checkpoint folder (config.json + model.safetensors) with
the shapes of `../shared/bench/make_models.py`'s MODELS, its config exactly as
that script writes it, but with the random weights drawn on the GPU: an 8B
model is ready in under a minute instead of several on the CPU. Performance
does not depend on the values.

Usage: python3 make_weights.py MAKE_MODELS_DIR OUT_DIR NAME [NAME...]
(MAKE_MODELS_DIR holds make_models.py and gen_fixtures.py.)
"""
import os
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
import make_models as M  # noqa: E402
import gen_fixtures as G  # noqa: E402

root = sys.argv[2]
for name in sys.argv[3:]:
    t = time.time()
    cls, dtype, kw = M.MODELS[name]
    # gen_fixtures.tiny returns a builder whose config is the one make_models
    # saves; the model is built on the GPU in the stored dtype.
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device("cuda"):
        model, _ = G.tiny(cls, **kw)()
    torch.set_default_dtype(torch.float32)
    out = os.path.join(root, name)
    os.makedirs(out, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True, max_shard_size="100GB")
    gc = os.path.join(out, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {name}: {n / 1e9:.2f}B parameters ({dtype}) in {time.time() - t:.1f}s", flush=True)
    del model
    torch.cuda.empty_cache()
