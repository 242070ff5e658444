"""
Regenerate the reference outputs the tests compare against. The tests themselves need
only torch, numpy, tiktoken, safetensors and pytest; this script also needs the reference
implementations, which are NOT project dependencies:

    pip install transformers sentencepiece
    python tests/make_fixtures.py            # writes tests/fixtures/

What it writes:
- mistral_tiny_hf/: a small random Hugging Face `MistralForCausalLM` saved by transformers
  itself (config.json + sharded model-*.safetensors + index), with GQA, a sliding window
  shorter than the test sequence, and a non-default rope_theta.
- mistral_tiny_mistral/: the same weights in Mistral's own layout (params.json +
  consolidated.safetensors), un-permuting wq/wk the way Mistral's HF converter permutes them.
- mistral_tiny_logits.safetensors: input tokens and the logits transformers computes for
  them, also for a left-padded batch (attention_mask + position_ids).
- tokenizer_cases.json: sentencepiece's ids for tricky strings, and its decode of id lists.
"""

import json
import os
import random

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
TOKENIZER = os.path.join(HERE, "..", "assets", "tokenizer.model")


def make_model_fixtures():
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, rms_norm_eps=1e-5, rope_theta=5000.0, sliding_window=6,
                           max_position_embeddings=256, tie_word_embeddings=False)
    model = MistralForCausalLM(config).eval().float()
    model.config._attn_implementation = "eager"
    with torch.no_grad():   # HF initialises norms to 1; randomise them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))

    hf_dir = os.path.join(FIXTURES, "mistral_tiny_hf")
    model.save_pretrained(hf_dir, max_shard_size="100KB", safe_serialization=True)

    # Mistral layout: HF's converter permutes each head's rows of wq/wk as
    # w.view(n, d/2, 2, dim).transpose(1, 2); we invert that here.
    def unpermute(w, n):
        return w.view(n, 2, w.shape[0] // n // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    hf = model.state_dict()
    ours = {"tok_embeddings.weight": hf["model.embed_tokens.weight"],
            "norm.weight": hf["model.norm.weight"], "output.weight": hf["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        ours.update({
            f"layers.{i}.attention.wq.weight": unpermute(hf[p + "self_attn.q_proj.weight"], 4),
            f"layers.{i}.attention.wk.weight": unpermute(hf[p + "self_attn.k_proj.weight"], 2),
            f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        })
    mistral_dir = os.path.join(FIXTURES, "mistral_tiny_mistral")
    os.makedirs(mistral_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ours.items()},
              os.path.join(mistral_dir, "consolidated.safetensors"))
    params = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2,
                  norm_eps=1e-5, sliding_window=6, vocab_size=300, rope_theta=5000.0)
    json.dump(params, open(os.path.join(mistral_dir, "params.json"), "w"), indent=2)

    # reference logits: a batch longer than the window, and a left-padded batch
    tokens = torch.randint(0, 300, (2, 16))
    padded = torch.randint(0, 300, (3, 12))
    valid = torch.ones(3, 12, dtype=torch.long)
    valid[1, :4] = 0
    valid[2, :9] = 0
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(tokens).logits
        padded_logits = model(padded, attention_mask=valid, position_ids=positions).logits
        no_window = MistralForCausalLM(MistralConfig(**{**config.to_dict(), "sliding_window": None}))
        no_window.load_state_dict(model.state_dict())
        assert not torch.allclose(no_window.eval()(tokens).logits, logits), "window had no effect"
    save_file({"tokens": tokens, "logits": logits.contiguous(), "padded_tokens": padded,
               "padded_valid": valid.bool(), "padded_positions": positions,
               "padded_logits": padded_logits.contiguous()},
              os.path.join(FIXTURES, "mistral_tiny_logits.safetensors"))


TOKENIZER_TEXTS = [
    "", " ", "  ", "a", "Hello world", " leading space", "   three leading", "trailing   ",
    "many     inner      spaces", "line one\nline two\n\n", "\ttab\tseparated\t", "\r\n",
    "1234567890", "3.14159 and -42, 1,000,000", "café naïve façade Ångström", "Ελληνικά",
    "中文字符测试", "日本語のテキスト", "한국어", "emoji 😀🎉👩‍👩‍👧", "▁", "a▁b ▁ c", "<s></s>",
    "<|startthought|> not special text", "x" * 50, "def f(x):\n    return x ** 2\n",
    "$\\frac{1}{2} + \\sqrt{x^2}$", "\u00a0nbsp\u2003em space", "\x00\x01 control chars",
    "丯 rare CJK", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǒ̯͍", " \n \n ",
]


def make_tokenizer_fixtures():
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    rng = random.Random(0)
    encode = [{"text": t, "ids": sp.encode(t)} for t in TOKENIZER_TEXTS]
    for n in range(1, 20):  # runs of spaces exercise the tie-broken whitespace pieces
        t = " " * n + "w" + " " * n + "x"
        encode.append({"text": t, "ids": sp.encode(t)})
    pool = [0, 1, 2, 28705, 259, 13, 35, 231, 187, 176]  # unk, bos, eos, '▁', '▁▁', bytes
    decode = []
    for _ in range(300):
        ids = [rng.choice(pool + [rng.randint(3, 258), rng.randint(259, 31999)])
               for _ in range(rng.randint(0, 10))]
        decode.append({"ids": ids, "text": sp.decode(ids)})
    with open(os.path.join(FIXTURES, "tokenizer_cases.json"), "w") as f:
        json.dump({"encode": encode, "decode": decode}, f, ensure_ascii=False, indent=0)


if __name__ == "__main__":
    os.makedirs(FIXTURES, exist_ok=True)
    make_model_fixtures()
    make_tokenizer_fixtures()
    print("wrote", sorted(os.listdir(FIXTURES)))
