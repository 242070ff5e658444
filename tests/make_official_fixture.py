"""
Regenerate tests/fixtures/quietstar_official*: what the authors' own Quiet-STaR code computes
for a tiny model, so that tests/test_official_parity.py can hold us to it without it.

Needs an environment that the project itself never needs: transformers 4.37.2 with the
official modeling_mistral.py and configuration_mistral.py from github.com/ezelikman/quiet-star
copied over transformers/models/mistral/, and importable stand-ins for the plotting and
logging packages that file imports (wandb, seaborn, matplotlib, pandas, termcolor, reportlab;
they are not used by the training forward). Then, from the repository root:

    python tests/make_official_fixture.py

What it does:
1. builds a tiny random Mistral with our code, wraps it in QuietStar, gives it a non-zero
   mixing head and delimiters, and saves it in the released Quiet-STaR layout
   (tests/fixtures/quietstar_tiny/);
2. samples thoughts with our sample_thoughts;
3. loads that checkpoint with the official MistralForCausalLM, sets it up as the official
   training script does, and replaces its Gumbel-softmax sampling by our thoughts;
4. stores the official loss, its parts (from the official log_dict), the gradient of every
   parameter, and the official eval-mode logits (one thought, one talk step).
"""

import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from model import ModelArgs, Transformer  # noqa: E402
from quietstar import QuietStar, QuietStarConfig  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")
V = 50          # text vocabulary; the delimiters are 50 and 51


def make_ours():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                     vocab_size=V + 2, rope_theta=10000.0, sliding_window=4096)
    config = QuietStarConfig(n_thought_tokens=3, n_talk=2, n_thoughts=2, delimiter_init_id=7)
    qs = QuietStar(Transformer(args), config)
    qs.init_thought_parameters()
    with torch.no_grad():   # as if trained a little: thoughts matter, rewards are not zero
        qs.mixing_head[4].weight.normal_(std=0.5)
        qs.start_embedding.add_(torch.randn_like(qs.start_embedding) * 0.01)
        qs.end_embedding.add_(torch.randn_like(qs.end_embedding) * 0.01)
    return qs


class StubTokenizer:
    """The few tokenizer calls the official forward makes."""
    pad_token_id, bos_token_id, eos_token_id = 2, 1, 2

    def convert_tokens_to_ids(self, token):
        return {"<|startthought|>": V, "<|endthought|>": V + 1}[token]


def official_model(path, n_ahead, n_ahead_talk, n_passes):
    from transformers.models.mistral.modeling_mistral import MistralForCausalLM
    model = MistralForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, max_thoughts=n_ahead + n_ahead_talk + 1,
        merged_talk_heads=True, merged_lm_and_talk_heads=False, merged_lm_and_think_heads=True,
        use_concat_talk_head=True, use_shallow_think=True, use_shallow_talk=False,
        use_complex_think_head=False, use_complex_talk_head=True, use_weighted_talk_head=True,
        attn_implementation="sdpa")
    # as quiet-star-train.py's model_init, with the delimiters and mixing head taken from the
    # checkpoint rather than re-initialised on the first forward
    model.tokenizer = StubTokenizer()
    model.start_token_id, model.end_token_id = V, V + 1
    model.tokenizer_has_start_thought_token = model.tokenizer_has_end_thought_token = True
    model.rm_initialized = True
    model.gumbel_detach = model.include_policy_loss = True
    model.use_start_thought_token = model.use_end_thought_token = True
    model.n_ahead, model.n_ahead_talk, model.n_passes = n_ahead, n_ahead_talk, n_passes
    model.n_tokens_print = model.gradient_accumulation_steps = 1
    model.residual_think_head = model.optimize_lm_head_only_at_start = False
    model.gumbel_temperature = 1
    model.wandb_enabled = False
    model.original_mode = False
    model.kill_after = None
    return model


def replay_thoughts(thoughts_by_step):
    """A stand-in for F.gumbel_softmax that returns our thoughts, one step per call."""
    calls = []

    def gumbel_softmax(logits, tau=1, hard=False, dim=-1):
        step = thoughts_by_step[len(calls)]                      # (R * L,)
        calls.append(step)
        return F.one_hot(step, logits.shape[-1]).to(logits.dtype)
    return gumbel_softmax, calls


def main():
    qs = make_ours()
    path = os.path.join(FIXTURES, "quietstar_tiny")
    qs.save_pretrained(path)
    c = qs.config
    torch.manual_seed(1)
    tokens = torch.randint(3, V, (2, 12))
    tokens[1, 8:] = 2                                            # right padding with EOS
    thoughts = qs.sample_thoughts(tokens)                       # (B, P, L, N)
    B, P, L, N = thoughts.shape
    steps = [thoughts.reshape(B * P, L, N)[:, :, k].reshape(-1) for k in range(N)]

    # training forward: loss, parts, gradients
    model = official_model(path, n_ahead=N + 3, n_ahead_talk=c.n_talk, n_passes=P).train()
    F.gumbel_softmax, calls = replay_thoughts(steps)
    out = model(input_ids=tokens, attention_mask=(tokens != 2).long(), labels=tokens)
    assert len(calls) == N, f"the official forward sampled {len(calls)} times, expected {N}"
    out.loss.backward()
    log = model.log_dict
    result = {"tokens": tokens, "thoughts": thoughts, "loss": out.loss.detach(),
              "nll_base": torch.as_tensor(log["loss_0"]), "nll_talk": torch.as_tensor(log["loss_talk"]),
              "policy_loss": torch.as_tensor(log["policy_loss"]).detach(),
              "reward_mean": torch.as_tensor(log["policy_reward"]).detach()}
    result.update({"grad." + n: p.grad for n, p in model.named_parameters() if p.grad is not None})

    # eval-mode forward (the paper's metric uses it): one thought, one talk step
    model = official_model(path, n_ahead=N + 3, n_ahead_talk=c.n_talk, n_passes=P).eval()
    F.gumbel_softmax, calls = replay_thoughts([t.view(B, P * L)[:, :L].reshape(-1) for t in steps])
    with torch.no_grad():
        result["eval_logits"] = model(input_ids=tokens, attention_mask=(tokens != 2).long()).logits
    assert len(calls) == N
    save_file({k: v.contiguous() for k, v in result.items()},
              os.path.join(FIXTURES, "quietstar_official.safetensors"))
    print({k: round(v.item(), 6) for k, v in result.items() if v.dim() == 0})


if __name__ == "__main__":
    main()
