"""quietstar.py against slow, obviously-correct versions of itself, and its contracts."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer, rope_cos_sin
from quietstar import QuietStar, QuietStarConfig, QuietStarOutput, quietstar_loss

V = 50  # text vocabulary of the tiny test models; the delimiters are V and V + 1
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def tiny_quietstar(n_thought_tokens=3, n_talk=2, n_thoughts=2, trained_look=True, **model_overrides):
    """A tiny model; with trained_look, a mixing head and delimiters that are not at their init."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                     vocab_size=V + 2, rope_theta=1000.0, sliding_window=None)
    for k, v in model_overrides.items():
        setattr(args, k, v)
    config = QuietStarConfig(n_thought_tokens=n_thought_tokens, n_talk=n_talk,
                             n_thoughts=n_thoughts, delimiter_init_id=7)
    qs = QuietStar(Transformer(args), config)
    qs.init_thought_parameters()
    if trained_look:
        with torch.no_grad():
            qs.mixing_head[4].weight.normal_(std=0.3)
            qs.start_embedding.add_(torch.randn_like(qs.start_embedding) * 0.01)
    return qs.eval()


def batch_with_padding(B=2, L=12):
    tokens = torch.randint(3, V, (B, L))
    tokens[1, 8:] = 2                    # right padding with EOS, as the official loader does
    return tokens


# -----------------------------------------------------------------------------
# slow references for the parallel thought forward

def explicit_branch(qs, tokens_row, thought_row, i):
    """Input embeddings and positions of x_0..x_i <start> c_1..c_N <end> x_{i+1}..x_{i+T-1}."""
    c, T, L = qs.config, qs.config.n_talk, len(tokens_row)
    emb = qs.model.tok_embeddings
    ahead = [tokens_row[i + s] if i + s < L else c.pad_id for s in range(1, T)]
    pieces = [emb(tokens_row[:i + 1]),
              qs.start_embedding[:1] * c.embedding_scale,
              emb(thought_row[i]),
              qs.end_embedding[:1] * c.embedding_scale,
              emb(torch.tensor(ahead, dtype=torch.long))]
    return torch.cat(pieces)[None]                                       # (1, i+1+M, d)


def loop_reference(qs, tokens, thoughts, valid):
    """Branch hidden states from feeding every position's explicit sequence through the plain
    model: (R, L, M, d). Padding keys of the text are masked, the branch sees itself."""
    B, P, L, N = thoughts.shape
    M = qs.config.branch_len
    out = torch.zeros(B * P, L, M, qs.model.args.dim)
    for b in range(B):
        for p in range(P):
            for i in range(L):
                x = explicit_branch(qs, tokens[b], thoughts[b, p], i)
                key_valid = torch.cat([valid[b, :i + 1], torch.ones(M, dtype=torch.bool)])[None]
                out[b * P + p, i] = qs.model.hidden(x, key_valid=key_valid)[0, i + 1:]
    return out


def dense_mask_reference(qs, tokens, thoughts, valid):
    """The official layout: [text | branch step 0 of every position | step 1 | ...] as one
    sequence with one dense mask, through the plain transformer blocks. -> (R, L, M, d)."""
    B, P, L, N = thoughts.shape
    M = qs.config.branch_len
    R = B * P
    rows = []
    for r in range(R):
        b, p = divmod(r, P)
        per_position = [explicit_branch(qs, tokens[b], thoughts[b, p], i)[0, i + 1:] for i in range(L)]
        steps = torch.stack(per_position, dim=1)                        # (M, L, d): step-major
        rows.append(torch.cat([qs.model.tok_embeddings(tokens[b]), steps.reshape(M * L, -1)]))
    x = torch.stack(rows)                                                # (R, L + M*L, d)
    i_of = torch.cat([torch.arange(L), torch.arange(L).repeat(M)])      # which text position
    step_of = torch.cat([torch.full((L,), -1), torch.arange(M).repeat_interleave(L)])  # -1 = text
    positions = i_of + step_of + 1
    q_i, k_i, q_s, k_s = i_of[:, None], i_of[None], step_of[:, None], step_of[None]
    text_key = (k_s == -1) & (k_i <= q_i)                                # text up to my position
    own_branch = (k_s >= 0) & (q_s >= 0) & (k_i == q_i) & (k_s <= q_s)   # my branch, causally
    key_valid = torch.cat([valid.repeat_interleave(P, 0), torch.ones(R, M * L, dtype=torch.bool)], 1)
    mask = ((text_key & key_valid[:, None, :]) | own_branch | (q_i == k_i) & (q_s == k_s))[:, None]
    cos, sin = rope_cos_sin(positions, qs.model.args.head_dim, qs.model.args.rope_theta)
    h = x
    for layer in qs.model.layers:
        h = layer(h, cos, sin, mask, 0)
    h = qs.model.norm(h)[:, L:]                                          # branch tokens only
    return h.view(R, M, L, -1).transpose(1, 2)                           # (R, L, M, d)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    qs = tiny_quietstar()
    tokens = batch_with_padding()
    thoughts = qs.sample_thoughts(tokens)
    with torch.no_grad():
        out = qs(tokens, thoughts)
    return qs, tokens, thoughts, out


def test_parallel_branches_equal_explicit_loop(setup):
    qs, tokens, thoughts, out = setup
    valid = tokens != 2
    with torch.no_grad():
        ref = loop_reference(qs, tokens, thoughts, valid)
    real = valid.repeat_interleave(2, 0)             # padded positions are not compared
    assert (out.branch_hidden[real] - ref[real]).abs().max() < 1e-5


def test_parallel_branches_equal_dense_mask(setup):
    qs, tokens, thoughts, out = setup
    valid = tokens != 2
    with torch.no_grad():
        ref = dense_mask_reference(qs, tokens, thoughts, valid)
    real = valid.repeat_interleave(2, 0)
    assert (out.branch_hidden[real] - ref[real]).abs().max() < 1e-5


def test_logits_of_every_thought_and_talk_step(setup):
    """Thought logits, talk logits and base logits, rebuilt from the loop's hidden states."""
    qs, tokens, thoughts, out = setup
    N, T = qs.config.n_thought_tokens, qs.config.n_talk
    valid = tokens != 2
    with torch.no_grad():
        ref = loop_reference(qs, tokens, thoughts, valid)
        base_h = qs.model.hidden(tokens, key_valid=valid).repeat_interleave(2, 0)   # (R, L, d)
        assert torch.allclose(out.base_logits, qs.model.output(base_h), atol=1e-5)
        for r in range(4):
            for i in range(12):
                if not valid[r // 2, i]:
                    continue
                thought_logits = qs.model.output(ref[r, i, :N])
                thought_logits[:, [V, V + 1]] = -math.inf
                assert torch.allclose(out.thought_logits[r, i], thought_logits, atol=1e-5)
                for s in range(T):
                    h_base = base_h[r, min(i + s, 11)]
                    h_talk = ref[r, i, N + 1 + s]
                    w = qs.mixing_head(torch.cat([h_base, h_talk]))
                    expected = qs.model.output((1 - w) * h_base + w * h_talk)
                    assert torch.allclose(out.talk_logits[r, i, s], expected, atol=1e-5)


def test_sliding_window_and_gqa_in_branches():
    torch.manual_seed(1)
    qs = tiny_quietstar(sliding_window=5)
    tokens = torch.randint(3, V, (1, 9))
    thoughts = qs.sample_thoughts(tokens)
    with torch.no_grad():
        out = qs(tokens, thoughts)
        # a window shorter than the text: the branch of position i sees text i-4..i, as text i does
        M = qs.config.branch_len
        for i in range(9):
            x = explicit_branch(qs, tokens[0], thoughts[0, 0], i)
            sees = torch.zeros(1, i + 1 + M, dtype=torch.bool)
            sees[0, max(0, i - 4):] = True   # visible text and the whole branch
            h = hidden_with_visibility(qs, x, sees, i)
            assert (out.branch_hidden[0, i] - h).abs().max() < 1e-5


def hidden_with_visibility(qs, x, text_sees, i):
    """Branch hidden states of one explicit sequence whose branch sees only `text_sees` text."""
    S = x.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    window = torch.arange(S)[None] - torch.arange(S)[:, None] > -5         # for the text rows
    mask = causal & torch.where(torch.arange(S)[:, None] <= i, window, text_sees)
    cos, sin = rope_cos_sin(torch.arange(S), qs.model.args.head_dim, qs.model.args.rope_theta)
    h = x
    for layer in qs.model.layers:
        h = layer(h, cos, sin, mask[None, None], 0)
    return qs.model.norm(h)[0, i + 1:]


def test_sample_thoughts_shape_and_no_delimiters(setup):
    qs, tokens, thoughts, _ = setup
    assert thoughts.shape == (2, 2, 12, 3) and thoughts.dtype == torch.long
    assert thoughts.max() < V and not thoughts.requires_grad
    g = lambda: torch.Generator().manual_seed(5)
    assert torch.equal(qs.sample_thoughts(tokens, generator=g()), qs.sample_thoughts(tokens, generator=g()))


def test_sampled_thoughts_follow_the_models_distribution():
    """Thought token 1 is sampled from softmax(logits at <start>), as the official hard Gumbel."""
    torch.manual_seed(2)
    qs = tiny_quietstar(n_thought_tokens=1, n_thoughts=1)
    qs.config.n_thoughts = 4000
    tokens = torch.randint(3, V, (1, 3))
    thoughts = qs.sample_thoughts(tokens, generator=torch.Generator().manual_seed(0))  # (1, 4000, 3, 1)
    with torch.no_grad():
        out = qs(tokens, thoughts[:, :1])
    probs = out.thought_logits[0, 2, 0].softmax(-1)
    freq = torch.bincount(thoughts[0, :, 2, 0], minlength=V + 2) / 4000
    assert (freq - probs).abs().max() < 0.03 and freq[V:].sum() == 0


# -----------------------------------------------------------------------------
# the loss

def test_at_init_talk_equals_base_and_policy_is_zero():
    torch.manual_seed(3)
    qs = tiny_quietstar(trained_look=False)
    tokens = batch_with_padding()
    thoughts = qs.sample_thoughts(tokens)
    out = qs(tokens, thoughts)
    T = qs.config.n_talk
    base = out.base_logits.view(2, 2, 12, -1)[:, 0]
    for s in range(T):
        shifted = base[:, torch.arange(12).add(s).clamp(max=11)]
        assert torch.equal(out.talk_logits.view(2, 2, 12, T, -1)[:, 0, :, s], shifted)
    loss, m = qs.loss(tokens, thoughts)
    assert m["policy_loss"] == 0 and m["reward_mean"] == 0 and m["mix_weight_max"] == 0


def made_up_output(qs, tokens, thoughts):
    """A QuietStarOutput from random hidden states (not a model's forward), with the per-token
    log-likelihoods computed the plain way, from full logits."""
    B, P, L, N = thoughts.shape
    T, d = qs.config.n_talk, qs.model.args.dim
    base_h, talk_h = torch.randn(B, L, d), torch.randn(B * P, L, T, d)
    branch_h = torch.randn(B * P, L, qs.config.branch_len, d)
    out = QuietStarOutput(None, None, None, torch.randn(B * P, L, T), base_h, branch_h, talk_h, qs)
    nll = lambda logits, t: -logits.log_softmax(-1).gather(-1, t[..., None]).squeeze(-1)
    targets = F.pad(tokens, (0, T + 1))[:, torch.arange(L)[:, None] + 1 + torch.arange(T)]
    with torch.no_grad():
        out.base_nll = nll(qs.model.output(base_h[:, :-1]), tokens[:, 1:])
        out.talk_nll = nll(out.talk_logits, targets.repeat_interleave(P, 0))
        out.thought_logp = -nll(out.thought_logits / qs.config.reinforce_temperature,
                                thoughts.reshape(B * P, L, N))
    return out


def loss_case(positive_only):
    """A fixed case for the loss: 2 texts (one padded) x 3 thoughts x 9 positions, random
    hidden states and a small output layer. -> out, tokens, thoughts, valid, config"""
    torch.manual_seed(4)
    B, P, L, N, T, Vs = 2, 3, 9, 2, 3, 7
    args = ModelArgs(dim=6, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=3, hidden_dim=8, vocab_size=Vs + 2)
    c = QuietStarConfig(n_thought_tokens=N, n_talk=T, n_thoughts=P, positive_advantage_only=positive_only,
                        delimiter_init_id=0)
    qs = QuietStar(Transformer(args), c)
    tokens = torch.randint(3, Vs, (B, L))
    tokens[0, 7:] = 2
    thoughts = torch.randint(0, Vs, (B, P, L, N))
    return made_up_output(qs, tokens, thoughts), tokens, thoughts, tokens != 2, c


# loss_case's quantities as the position-by-position loop computes them (tests/references.py,
# checked there against these numbers); for a student, the numbers are the specification's
# results, not its code
LOOP_NUMBERS = {
    True: dict(loss=65794.33, policy_loss=0.06579214, reward_mean=0.04227,
               reward_max=0.2503791, advantage_positive_frac=0.4333333),
    False: dict(loss=214.909, policy_loss=0.0002127128, reward_mean=0.04227,
                reward_max=0.2503791, advantage_positive_frac=0.4333333),
}


@pytest.mark.parametrize("positive_only", [True, False])
def test_reward_advantage_policy_against_stored_numbers(positive_only):
    out, tokens, thoughts, valid, c = loss_case(positive_only)
    loss, m = quietstar_loss(out, tokens, thoughts, valid, c)
    got = dict(m, loss=loss.item())
    for name, expected in LOOP_NUMBERS[positive_only].items():
        assert math.isclose(got[name], expected, rel_tol=1e-4, abs_tol=1e-6), \
            f"{name} (positive_advantage_only={positive_only}): got {got[name]:.6g}, expected {expected:.6g}"
    assert m["policy_loss"] != 0


def test_gradients_reach_what_the_official_code_trains():
    torch.manual_seed(5)
    qs = tiny_quietstar(trained_look=False).train()
    tokens = batch_with_padding()
    loss, _ = qs.loss(tokens, qs.sample_thoughts(tokens))
    loss.backward()
    zero = {n for n, p in qs.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    # at init w = 0: the thoughts change nothing, so only the mixing head's last layer learns
    # beside the language model, exactly as the official run's first step
    assert zero == {"start_embedding", "end_embedding", "mixing_head.0.weight", "mixing_head.0.bias",
                    "mixing_head.2.weight", "mixing_head.2.bias"}
    # once the mixing head is non-zero, everything gets a gradient
    qs.zero_grad()
    with torch.no_grad():
        qs.mixing_head[4].weight.normal_(std=0.3)
    loss, m = qs.loss(tokens, qs.sample_thoughts(tokens))
    loss.backward()
    zero = {n for n, p in qs.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    assert zero == set() and m["policy_loss"] != 0
    assert qs.start_embedding.grad[1].abs().sum() == 0     # row 1 is unused by design


def test_reinforce_learns_the_helpful_thought():
    """Teach a tiny model that after the thought '5' the next token is (x + 1) mod 10, and
    after any other thought a random one; the plain model only ever saw random text. Then
    Quiet-STaR training on text that counts up raises p(thought = 5) and the talk likelihood,
    and without the REINFORCE term p(thought = 5) does not move."""
    torch.manual_seed(6)
    vocab = 12                                       # 10 text tokens + 2 delimiters
    args = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=96,
                     vocab_size=vocab, sliding_window=None)
    qs = QuietStar(Transformer(args), QuietStarConfig(n_thought_tokens=1, n_talk=1, n_thoughts=4,
                                                      delimiter_init_id=0, policy_weight=30.0))
    qs.init_thought_parameters()
    opt = torch.optim.Adam(qs.parameters(), lr=3e-3)
    emb = qs.model.tok_embeddings
    for _ in range(300):   # supervised warm-up on explicit sequences x <start> c <end> -> y
        x = torch.randint(0, 10, (64,))
        c = torch.where(torch.rand(64) < 0.5, 5, torch.randint(0, 10, (64,)))
        y = torch.where(c == 5, (x + 1) % 10, torch.randint(0, 10, (64,)))
        seq = torch.stack([emb(x), qs.start_embedding[0].expand(64, -1) * 100, emb(c),
                           qs.end_embedding[0].expand(64, -1) * 100], 1)
        logits = qs.model.output(qs.model.hidden(seq))
        plain = qs.model(torch.randint(0, 10, (64, 2)))       # plain text: next token random
        loss = F.cross_entropy(logits[:, 3], y) + F.cross_entropy(plain[:, 0], torch.randint(0, 10, (64,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    counting = lambda n: (torch.arange(8) + torch.randint(0, 10, (n, 1))) % 10
    with torch.no_grad():  # a positive mixing weight, about 1, so that the thought counts
        qs.mixing_head[4].weight.fill_(1.0)
        qs.mixing_head[4].weight /= qs(counting(16), torch.full((16, 1, 8, 1), 5)).mix_weight.mean()

    def p_helpful_and_talk(model):
        """Mean p(thought = 5), and the talk log-likelihood with the thoughts it samples."""
        tokens = counting(64)
        with torch.no_grad():
            out = model(tokens, model.sample_thoughts(tokens)[:, :1])
            p5 = out.thought_logits[:, :, 0].softmax(-1)[..., 5].mean()
            talk = -F.cross_entropy(out.talk_logits[:, :-1, 0].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        return p5.item(), talk.item()

    def train(model, steps=40):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(steps):
            tokens = counting(16)
            loss, _ = model.loss(tokens, model.sample_thoughts(tokens), torch.ones_like(tokens, dtype=torch.bool))
            opt.zero_grad()
            loss.backward()
            opt.step()

    control = copy.deepcopy(qs)
    control.config.policy_weight = 0.0
    p_before, talk_before = p_helpful_and_talk(qs)
    train(qs)
    train(control)
    p_after, talk_after = p_helpful_and_talk(qs)
    p_control, _ = p_helpful_and_talk(control)
    assert p_after > p_before + 0.3, (p_before, p_after)
    assert talk_after > talk_before + 0.2, (talk_before, talk_after)
    assert abs(p_control - p_before) < 0.15, (p_before, p_control)


# -----------------------------------------------------------------------------
# generation and checkpoints

def test_think_logits_equal_training_talk_logits(setup):
    qs, tokens, thoughts, out = setup
    for i in [0, 4, 11]:
        logits, thought = qs.next_token_logits(tokens[0, :i + 1].tolist(), thoughts[0, 1, i].tolist())
        assert thought == thoughts[0, 1, i].tolist()
        assert torch.allclose(logits, out.talk_logits[1, i, 0], atol=1e-5)


def test_generate_thinks_and_never_emits_delimiters():
    torch.manual_seed(7)
    qs = tiny_quietstar()
    with torch.no_grad():                      # make the delimiters the likeliest tokens
        qs.model.output.weight[V:] = qs.model.output.weight[:V].sum(0) * 10
    g = lambda: torch.Generator().manual_seed(3)
    new, thoughts = qs.generate([1, 5, 9], 6, eos_id=-1, generator=g(), return_thoughts=True)
    assert len(new) == 6 and len(thoughts) == 6 and all(len(t) == 3 for t in thoughts)
    assert max(new) < V and max(max(t) for t in thoughts) < V
    assert qs.generate([1, 5, 9], 6, eos_id=-1, generator=g()) == new
    # each step's token is what next_token_logits gives for that prefix and thought (greedy)
    greedy, greedy_thoughts = qs.generate([1, 5, 9], 4, temperature=0, eos_id=-1, return_thoughts=True)
    prefix = [1, 5, 9]
    for token, thought in zip(greedy, greedy_thoughts):
        logits, _ = qs.next_token_logits(prefix, thought)
        logits[[V, V + 1]] = -math.inf
        assert logits.argmax().item() == token
        prefix.append(token)
    plain = qs.generate([[1, 5, 9], [4]], 5, think=False, temperature=0, eos_id=-1)
    assert plain[1] == qs.generate([4], 5, think=False, temperature=0, eos_id=-1)
    assert max(max(p) for p in plain) < V


def test_from_plain_mistral_and_round_trip(tmp_path):
    path = os.path.join(FIXTURES, "mistral_tiny_hf")
    torch.manual_seed(8)
    qs = QuietStar.from_pretrained(path, QuietStarConfig(delimiter_init_id=11, n_thought_tokens=2))
    assert qs.model.args.vocab_size == 302 and (qs.start_id, qs.end_id) == (300, 301)
    table = qs.model.tok_embeddings.weight
    assert torch.equal(qs.start_embedding[0], table[11] / 100) and torch.equal(qs.end_embedding[0], table[11] / 100)
    assert qs.mixing_head[4].weight.abs().sum() == 0
    with torch.no_grad():                       # pretend it trained
        qs.mixing_head[4].weight.normal_()
        qs.start_embedding.normal_()
    qs.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["start_embedding"].shape == (2, 64) and saved["talk_head.0.0.weight"].shape == (64, 128)
    assert saved["talk_head.0.4.weight"].shape == (1, 64) and saved["lm_head.weight"].shape == (302, 64)
    again = QuietStar.from_pretrained(str(tmp_path))
    assert again.config == qs.config             # from quietstar.json
    for (n, a), (_, b) in zip(qs.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n              # trained delimiters kept, not re-initialised


def test_incomplete_quietstar_checkpoint(tmp_path):
    qs = tiny_quietstar()
    qs.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["talk_head.0.4.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks \['talk_head.0.4.weight'\]"):
        QuietStar.from_pretrained(str(tmp_path))


def test_default_delimiter_init_is_the_first_token_of_dashes(tokenizer_path):
    from tokenizer import Tokenizer
    assert Tokenizer(tokenizer_path).encode("---")[0] == QuietStarConfig().delimiter_init_id
