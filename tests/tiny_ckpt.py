"""Tiny checkpoints of every kind the tools read, written into a directory (for the tests):
plain Mistral in Hugging Face layout ("hf") and Mistral's own ("mistral", safetensors, or
"mistral_pth"), a train.py-style Quiet-STaR checkpoint ("quietstar": released layout plus
quietstar.json and tokenizer.model) and the authors' released layout alone ("released")."""
import json
import os
import shutil

import torch

from model import ModelArgs, Transformer
from quietstar import QuietStar, QuietStarConfig
from tokenizer import VENDORED

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=32000)


def make_tiny(path, kind="quietstar", n_thought_tokens=2):
    torch.manual_seed(0)
    path = str(path)
    model = Transformer(ModelArgs(**ARGS))
    if kind == "hf":
        model.save_pretrained(path)
    elif kind in ("mistral", "mistral_pth"):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "params.json"), "w") as f:
            json.dump({**ARGS, "norm_eps": 1e-5}, f)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if kind == "mistral":
            from safetensors.torch import save_file
            save_file(state, os.path.join(path, "consolidated.safetensors"))
        else:
            torch.save(state, os.path.join(path, "consolidated.00.pth"))
    else:
        model = Transformer(ModelArgs(**{**ARGS, "vocab_size": 32002}))
        qs = QuietStar(model, QuietStarConfig(n_thought_tokens=n_thought_tokens, n_talk=2))
        qs.init_thought_parameters()
        with torch.no_grad():
            qs.mixing_head[-1].weight.normal_(std=0.3)     # so that thinking changes something
        qs.save_pretrained(path)
        if kind == "released":
            os.remove(os.path.join(path, "quietstar.json"))
    if kind == "quietstar":
        shutil.copyfile(VENDORED, os.path.join(path, "tokenizer.model"))
    return path
