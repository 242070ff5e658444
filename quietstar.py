"""
Quiet-STaR on top of model.py: the model learns to think a short thought after every
token, in parallel, and to use the thoughts that make the next tokens likelier.

    from quietstar import QuietStar, QuietStarConfig
    qs = QuietStar.from_pretrained("Mistral-7B-v0.1", device="cuda", dtype=torch.bfloat16)
    thoughts = qs.sample_thoughts(tokens)           # (B, n_thoughts, L, n_thought_tokens)
    loss, metrics = qs.loss(tokens, thoughts)       # scalar, dict of floats
    loss.backward()
    new = qs.generate(prompt_ids, 50, think=True)   # thinks before every token

One training step, for a text x_0..x_{L-1} (defaults = the official training script):

1. Think. After every text position i, sample a thought
       <start> c_1 .. c_N <end>            N = n_thought_tokens (9)
   for all i at once, n_thoughts (2) times. Thought token k sits at rotary position i+k.
   <start>/<end> are learned input embeddings; c_k is sampled from the model's own
   next-token distribution (temperature 1, never a delimiter), with no gradient.
2. Talk. After <end>, teach-force the next n_talk (4) true tokens x_{i+1}.. and predict
   x_{i+1+s} from each. A mixing head reads [h_base(i+s) ; h_thought(i,s)] and outputs an
   (unbounded) weight w: the prediction is output((1-w) h_base + w h_thought).
3. Learn. loss = base_loss_weight * CE(plain next token)
                 + (1 - base_loss_weight) * mean over s of CE(talk step s)
                 + policy_weight * REINFORCE term,
   where the reward of a thought is R = sum over the n_talk tokens of
   (log p_talk - log p_base), its advantage is R minus the mean R of the n_thoughts
   thoughts at the same position (clamped at 0), and the REINFORCE term is the mean over
   thought tokens and positions of -advantage * log softmax(logits / 3)[sampled token].

Who attends to whom (3 text tokens, N = 1, n_talk = 2; a row sees the columns marked x):

                          text    | branch of x0 | branch of x1 | branch of x2
                        x0 x1 x2  | <s> c  </s> x1 | <s> c </s> x2 | <s> c </s> -
    x0                  x         |
    x1                  x  x      |              (text never sees a thought)
    x2                  x  x  x   |
    <s> after x0        x         |  x
    c   after x0        x         |  x  x
    </s> after x0       x         |  x  x  x
    x1  after x0's      x         |  x  x  x  x
    <s> after x1        x  x      |                  x
    ...                          each branch sees the text up to its own position,
                                 and itself causally: never another branch.

The official code builds that as one dense mask of size L x L*(steps) and feeds one token
per position per step through the whole model. Here the text is run once, and every
branch attends to (a) the text keys, shared by all positions, with a causal mask, and
(b) its own few branch keys; both parts go into one softmax. Attention then costs
L * M * (L + M) per layer for branches of M tokens, instead of L^2 * M^2 / 2.

Our names against the official code's flags (modeling_mistral.py / quiet-star-train.py):

    n_thought_tokens      n_ahead - 3 (tokens between the delimiters; n_ahead = 12)
    n_talk                n_ahead_talk (4)
    n_thoughts            n_passes (2)
    policy_weight         policy_loss_beta (1e6)
    reinforce_temperature reinforce_temperature (3)
    base_loss_weight      original_loss_weight (0.5)
    positive_advantage_only  remove_negative_rewards (True)
    embedding_scale       embedding_scale (100)
    thought_temperature   1: the official hard Gumbel-softmax samples at exactly T = 1
    mixing_head           talk_head[0] (Linear 2d->d, ReLU, Linear d->d, ReLU, Linear d->1)
"""

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Transformer, attention_mask, left_pad, load_checkpoint, rope_cos_sin, sample, \
    save_hf_checkpoint, trim_at_eos


@dataclass
class QuietStarConfig:
    n_thought_tokens: int = 9          # sampled tokens between <start> and <end>
    n_talk: int = 4                    # true tokens predicted after each thought
    n_thoughts: int = 2                # thoughts per position; their mean reward is the baseline
    policy_weight: float = 1e6         # weight of the REINFORCE term
    reinforce_temperature: float = 3.0  # log-probabilities of thought tokens taken at this temperature
    base_loss_weight: float = 0.5      # weight of the plain next-token loss; talk losses share the rest
    positive_advantage_only: bool = True  # reinforce only thoughts better than their siblings
    embedding_scale: float = 100.0     # delimiter embeddings are stored /100, used x100 (100x lr)
    thought_temperature: float = 1.0   # sampling temperature of thought tokens
    delimiter_init_id: int = 11940     # '▁---', first token of "---": initial <start> and <end>
    pad_id: int = 2                    # EOS pads the right of short documents, as in the official run

    @property
    def branch_len(self):
        """Tokens in one position's branch: <start>, the thought, <end>, n_talk - 1 true tokens."""
        return self.n_thought_tokens + self.n_talk + 1


# names of the extra tensors in the released Quiet-STaR checkpoints (ezelikman/quietstar-8-ahead)
RELEASED_NAMES = {"start_embedding": "start_embedding", "end_embedding": "end_embedding",
                  "talk_head.0.0.weight": "mixing_head.0.weight", "talk_head.0.0.bias": "mixing_head.0.bias",
                  "talk_head.0.2.weight": "mixing_head.2.weight", "talk_head.0.2.bias": "mixing_head.2.bias",
                  "talk_head.0.4.weight": "mixing_head.4.weight"}


class KVRecorder:
    """Stands in for a KV cache during a plain forward pass and keeps each layer's keys and
    values (with their gradient), so that the thought branches can attend to the text."""

    def update(self, start, k, v):
        self.k, self.v = k, v
        return k, v


def thought_attention(q, k_text, v_text, k_branch, v_branch, text_visible):
    """
    Attention for the thought branches of C positions at once.
    q:                (R, H, C, Mq, D)   the newest Mq branch tokens of each position
    k_text, v_text:   (R, Hkv, S, D)     keys/values of the text, shared by all branches
    k_branch, v_branch: (R, Hkv, C, Mk, D) every branch token so far (the queries are the last Mq)
    text_visible:     bool (R or 1, C, S) which text tokens position c's branch may see
    Returns (R, H, C, Mq, D). Scores against text and against the branch share one softmax,
    so this equals attention over [visible text ; own branch] done one position at a time.
    """
    R, H, C, Mq, D = q.shape
    Hkv, S, Mk = k_text.shape[1], k_text.shape[2], k_branch.shape[3]
    q = q.view(R, Hkv, H // Hkv, C, Mq, D) * D ** -0.5                # query heads grouped per k/v head
    text_scores = torch.einsum("rkgcmd,rksd->rkgcms", q, k_text)       # (R, Hkv, G, C, Mq, S)
    branch_scores = torch.einsum("rkgcmd,rkcnd->rkgcmn", q, k_branch)  # (R, Hkv, G, C, Mq, Mk)
    query_index = torch.arange(Mk - Mq, Mk, device=q.device)[:, None]   # (Mq, 1)
    branch_visible = torch.arange(Mk, device=q.device) <= query_index    # (Mq, Mk) causal
    scores = torch.cat([
        text_scores.float().masked_fill(~text_visible[:, None, None, :, None, :], -torch.inf),
        branch_scores.float().masked_fill(~branch_visible, -torch.inf)], dim=-1)
    probs = scores.softmax(dim=-1).to(q.dtype)                          # (R, Hkv, G, C, Mq, S+Mk)
    out = (torch.einsum("rkgcms,rksd->rkgcmd", probs[..., :S], v_text) +
           torch.einsum("rkgcmn,rkcnd->rkgcmd", probs[..., S:], v_branch))
    return out.reshape(R, H, C, Mq, D)


@dataclass
class QuietStarOutput:
    base_logits: torch.Tensor      # (R, L, V) plain next-token logits, R = B * n_thoughts
    thought_logits: torch.Tensor   # (R, L, N, V) logits that thought token k+1 was sampled from
    talk_logits: torch.Tensor      # (R, L, n_talk, V) mixed prediction of x_{i+1+s}
    mix_weight: torch.Tensor       # (R, L, n_talk) the mixing head's w
    branch_hidden: torch.Tensor    # (R, L, M, d) final-normed hidden state of every branch token


def talk_loss_and_reward(out, tokens, valid, config):
    """
    The language-modelling losses and the reward of every thought.
    out: QuietStarOutput with R rows; tokens (R, L) and valid bool (R, L) (False at padding:
    its targets are not scored), already repeated once per thought.
    Returns nll_base (scalar: mean CE of the plain next token over real targets), nll_talk
    (scalar: the mean over talk steps s of the mean CE of predicting x_{i+1+s} from position
    i), reward (R, L-1-n_talk), detached: for each position that has all n_talk targets, the
    sum over them of log p_talk - log p_base, and target_ok bool (R, L, n_talk).
    """
    L, T = tokens.shape[1], config.n_talk
    n_scored = L - 1 - T                                      # positions that have all T targets

    def cross_entropy(logits, targets):   # (..., V) rows, so equal logits give equal losses
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="none").view(targets.shape)

    # plain next-token loss, and the talk loss of step s on target x_{i+1+s}
    base_ce = cross_entropy(out.base_logits[:, :-1], tokens[:, 1:]) * valid[:, 1:]  # (R, L-1)
    target_index = torch.arange(L, device=tokens.device)[:, None] + 1 + torch.arange(T, device=tokens.device)  # (L, T)
    targets = F.pad(tokens, (0, T + 1))[:, target_index]                          # (R, L, T)
    target_ok = F.pad(valid, (0, T + 1))[:, target_index]                         # (R, L, T)
    talk_ce = cross_entropy(out.talk_logits, targets) * target_ok                 # (R, L, T)
    nll_base = base_ce.sum() / valid[:, 1:].sum()
    nll_talk = (talk_ce.sum((0, 1)) / target_ok.sum((0, 1))).mean()

    # reward of a thought: how much likelier it made the next T true tokens
    base_ce_ahead = base_ce[:, target_index[:n_scored] - 1]                       # (R, n_scored, T)
    reward = (base_ce_ahead - talk_ce[:, :n_scored]).sum(-1).detach()            # (R, n_scored)
    return nll_base, nll_talk, reward, target_ok


def reinforce_loss(thought_logits, thoughts, reward, n_thoughts, config):
    """
    REINFORCE with a baseline, on the sampled thought tokens.
    thought_logits (R, L, N, V) the logits each thought token was sampled from; thoughts
    (R, L, N) the sampled tokens; reward (R, n_scored); R = B * n_thoughts with the
    n_thoughts thoughts of one text in adjacent rows.
    The advantage is the reward minus the mean reward of the n_thoughts thoughts at the same
    position (no baseline when n_thoughts is 1), clamped at 0 if positive_advantage_only.
    Returns (policy_loss, advantage (R, n_scored)): policy_loss is the mean over every
    (row, position, thought token), zero advantages included, of
    -advantage * log softmax(logits / reinforce_temperature)[sampled token].
    """
    n_scored = reward.shape[1]
    advantage = reward
    if n_thoughts > 1:   # baseline: the mean reward of the thoughts at the same position
        per_example = reward.view(-1, n_thoughts, n_scored)
        advantage = (per_example - per_example.mean(1, keepdim=True)).view(-1, n_scored)
    if config.positive_advantage_only:
        advantage = advantage.clamp(min=0)
    log_probs = (thought_logits[:, :n_scored] / config.reinforce_temperature).log_softmax(-1)
    log_p = log_probs.gather(-1, thoughts[:, :n_scored, :, None]).squeeze(-1)    # (R, n_scored, N)
    return (-advantage[..., None] * log_p).mean(), advantage


def quietstar_loss(out, tokens, thoughts, valid, config):
    """
    The Quiet-STaR loss from the model's outputs (see the file's docstring).
    out: QuietStarOutput with R = B * P rows; tokens (B, L); thoughts (B, P, L, N);
    valid bool (B, L), False at padding (its targets are not scored).
    Returns (scalar loss, dict of floats).
    """
    B, P, L, N = thoughts.shape
    if L - 1 - config.n_talk < 1:
        raise ValueError(f"sequence of {L} tokens is too short for n_talk={config.n_talk}")
    valid = valid.repeat_interleave(P, 0)                     # (R, L)
    tokens = tokens.repeat_interleave(P, 0)                   # (R, L)
    nll_base, nll_talk, reward, target_ok = talk_loss_and_reward(out, tokens, valid, config)
    nll = config.base_loss_weight * nll_base + (1 - config.base_loss_weight) * nll_talk
    policy_loss, advantage = reinforce_loss(out.thought_logits, thoughts.reshape(B * P, L, N),
                                            reward, P, config)
    loss = nll + config.policy_weight * policy_loss

    w = out.mix_weight[target_ok]
    metrics = dict(loss=loss.item(), nll_base=nll_base.item(), nll_talk=nll_talk.item(),
                   policy_loss=policy_loss.item(), reward_mean=reward.mean().item(),
                   reward_max=reward.max().item(),
                   advantage_positive_frac=(advantage > 0).float().mean().item(),
                   mix_weight_mean=w.mean().item(), mix_weight_min=w.min().item(),
                   mix_weight_max=w.max().item())
    return loss, metrics


class QuietStar(nn.Module):
    def __init__(self, model: Transformer, config: Optional[QuietStarConfig] = None):
        super().__init__()
        self.model = model
        self.config = config or QuietStarConfig()
        d = model.args.dim
        # the delimiters are the last two ids: 32000 and 32001 for Mistral
        self.start_id, self.end_id = model.args.vocab_size - 2, model.args.vocab_size - 1
        # row 0 is the embedding / embedding_scale; row 1 is kept only because the official
        # checkpoints carry it (a log-std for a reparameterisation the paper did not use)
        self.start_embedding = nn.Parameter(torch.zeros(2, d))
        self.end_embedding = nn.Parameter(torch.zeros(2, d))
        self.mixing_head = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(),
                                         nn.Linear(d, 1, bias=False))

    @torch.no_grad()
    def init_thought_parameters(self):
        """Fresh delimiters and mixing head, set as the official code sets them."""
        table = self.model.tok_embeddings.weight
        scale = self.config.embedding_scale
        if not 0 <= self.config.delimiter_init_id < self.start_id:
            raise ValueError(f"delimiter_init_id={self.config.delimiter_init_id} is not a token of this "
                             f"model's {self.start_id}-token vocabulary; set QuietStarConfig."
                             f"delimiter_init_id to the first token of '---' in its tokenizer")
        for delimiter in (self.start_embedding, self.end_embedding):
            delimiter[0] = table[self.config.delimiter_init_id] / scale
            delimiter[1] = torch.log(table.float().std(dim=0) * 1e-2 / scale)
        for layer in (self.mixing_head[0], self.mixing_head[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.mixing_head[4].weight)   # w = 0: thoughts change nothing at first

    # -------------------------------------------------------------------------
    # the two passes: the text once, then every position's thought branch

    def _valid(self, tokens, attention_mask):
        """bool (B, L): real tokens. Default: everything but the pad id (EOS), like the official."""
        return tokens != self.config.pad_id if attention_mask is None else attention_mask.bool()

    def _text_pass(self, tokens, valid):
        """tokens (B, L) -> final-normed hidden (B, L, d) and each layer's text keys/values."""
        recorders = [KVRecorder() for _ in self.model.layers]
        for layer, recorder in zip(self.model.layers, recorders):
            layer.attention.cache = recorder
        try:
            h = self.model.hidden(tokens, key_valid=valid)
        finally:
            self.model.clear_cache()
        return h, [(r.k, r.v) for r in recorders]

    def _branch_pass(self, x, positions, text_kv, text_visible, branch_kv=None):
        """
        Run the newest Mq tokens of every position's branch through the model.
        x (R, C, Mq, d) input embeddings; positions (C, Mq) or (R, C, Mq) rotary positions;
        text_kv: per layer (k, v) of the text, (R, Hkv, S, D); text_visible (R or 1, C, S);
        branch_kv: per-layer list of earlier branch (k, v), (R, Hkv, C, Mk, D), extended in
        place, or None when the whole branch is given at once.
        Returns final-normed hidden states (R, C, Mq, d).
        """
        R, C, Mq, d = x.shape
        args = self.model.args
        cos, sin = rope_cos_sin(positions.flatten(-2), args.head_dim, args.rope_theta)

        def branch_attention(i):
            def attend(q, k, v):                       # q (R, H, C*Mq, D), k, v (R, Hkv, C*Mq, D)
                q, k, v = (t.unflatten(2, (C, Mq)) for t in (q, k, v))
                if branch_kv is not None:
                    if branch_kv[i] is not None:
                        k, v = torch.cat([branch_kv[i][0], k], 3), torch.cat([branch_kv[i][1], v], 3)
                    branch_kv[i] = (k, v)
                return thought_attention(q, *text_kv[i], k, v, text_visible).flatten(2, 3)
            return attend

        h = x.reshape(R, C * Mq, d)
        for i, layer in enumerate(self.model.layers):   # through each block's __call__ (FSDP hooks)
            h = layer(h, cos, sin, None, 0, branch_attention(i))
        return self.model.norm(h).view(R, C, Mq, d)

    def _delimiter(self, which, shape):
        """The <start> or <end> input embedding, broadcast to shape (..., d)."""
        table = self.start_embedding if which == "start" else self.end_embedding
        return (table[0] * self.config.embedding_scale).expand(*shape, -1)

    def _thought_logits(self, h):
        """Logits to sample thought tokens from: the plain output layer, delimiters excluded."""
        logits = self.model.output(h).float()
        logits[..., [self.start_id, self.end_id]] = -torch.inf
        return logits

    def _mix(self, h_base, h_thought):
        """Mixing head: w from [base ; thought], then (1 - w) h_base + w h_thought. -> (h, w)"""
        w = self.mixing_head(torch.cat([h_base, h_thought], dim=-1))      # (..., 1)
        return (1 - w) * h_base + w * h_thought, w.squeeze(-1)

    # -------------------------------------------------------------------------
    # training: sample thoughts (no gradient), then one forward and the loss

    @torch.no_grad()
    def sample_thoughts(self, tokens, attention_mask=None, generator=None):
        """tokens (B, L) -> thoughts (B, n_thoughts, L, n_thought_tokens), sampled in parallel.
        generator: a torch.Generator, or a list of B of them: then each text's thoughts do not
        depend on what else is in the batch (positions masked out by attention_mask get 0)."""
        B, L = tokens.shape
        P, N = self.config.n_thoughts, self.config.n_thought_tokens
        valid = self._valid(tokens, attention_mask)
        _, text_kv = self._text_pass(tokens, valid)
        text_kv = [(k.repeat_interleave(P, 0), v.repeat_interleave(P, 0)) for k, v in text_kv]
        visible = self._text_visible(valid).repeat_interleave(P, 0)       # (R, L, L)
        branch_kv = [None] * len(self.model.layers)
        x = self._delimiter("start", (B * P, L, 1))                         # (R, L, 1, d)
        thoughts = []
        for k in range(N):
            positions = torch.arange(L, device=tokens.device)[:, None] + 1 + k   # (L, 1)
            h = self._branch_pass(x, positions, text_kv, visible, branch_kv)    # (R, L, 1, d)
            logits = self._thought_logits(h).view(B, P, L, -1)
            if isinstance(generator, (list, tuple)):
                # each text draws only at its real positions, so that padding (how long the
                # batch's longest text is) never shifts its random stream; padding thinks "0"
                token = torch.zeros(B, P, L, dtype=torch.long, device=tokens.device)
                for b, g in enumerate(generator):
                    rows = logits[b][:, valid[b]]                                 # (P, n_real, V)
                    drawn = sample(rows.reshape(-1, rows.shape[-1]), self.config.thought_temperature,
                                   generator=g)
                    token[b][:, valid[b]] = drawn.view(P, -1)
            else:
                token = sample(logits.view(B * P * L, -1), self.config.thought_temperature,
                               generator=generator)
            thoughts.append(token.view(B * P, L))
            x = self.model.tok_embeddings(thoughts[-1])[:, :, None]
        return torch.stack(thoughts, dim=-1).view(B, P, L, N)

    def _text_visible(self, valid):
        """bool (B, L, L): the text each position's branch sees = what that text token sees."""
        L = valid.shape[1]
        return attention_mask(0, L, valid, self.model.args.sliding_window, valid.device)[:, 0]

    def forward(self, tokens, thoughts, attention_mask=None):
        """
        tokens (B, L), thoughts (B, P, L, N) -> QuietStarOutput with R = B * P rows: each
        text row is repeated P times (P adjacent copies), one per sampled thought.
        """
        B, P, L, N = thoughts.shape
        T = self.config.n_talk
        if N != self.config.n_thought_tokens or tokens.shape != (B, L):
            raise ValueError(f"thoughts {tuple(thoughts.shape)} do not fit tokens {tuple(tokens.shape)} "
                             f"and n_thought_tokens={self.config.n_thought_tokens}")
        valid = self._valid(tokens, attention_mask)
        h_base, text_kv = self._text_pass(tokens, valid)                   # (B, L, d)
        # the P copies share the text: run it once, repeat its results
        h_base = h_base.repeat_interleave(P, 0)                            # (R, L, d)
        text_kv = [(k.repeat_interleave(P, 0), v.repeat_interleave(P, 0)) for k, v in text_kv]
        visible = self._text_visible(valid).repeat_interleave(P, 0)        # (R, L, L)

        # every branch: <start> c_1..c_N <end> x_{i+1}..x_{i+T-1} at positions i+1, i+2, ...
        R, M = B * P, self.config.branch_len
        ahead = torch.arange(L, device=tokens.device)[:, None] + torch.arange(1, T)  # (L, T-1)
        padded = F.pad(tokens, (0, T), value=self.config.pad_id)          # (B, L+T)
        talk_inputs = padded[:, ahead].repeat_interleave(P, 0)             # (R, L, T-1)
        x = torch.cat([self._delimiter("start", (R, L, 1)),
                       self.model.tok_embeddings(thoughts.reshape(R, L, N)),
                       self._delimiter("end", (R, L, 1)),
                       self.model.tok_embeddings(talk_inputs)], dim=2)     # (R, L, M, d)
        positions = torch.arange(L, device=tokens.device)[:, None] + torch.arange(1, M + 1)  # (L, M)
        h_branch = self._branch_pass(x, positions, text_kv, visible)       # (R, L, M, d)

        # talk step s mixes the base state at i+s with the branch state after <end> + s tokens
        shifted = (torch.arange(L, device=tokens.device)[:, None] + torch.arange(T)).clamp(max=L - 1)
        mixed, w = self._mix(h_base[:, shifted], h_branch[:, :, N + 1:])    # (R, L, T, d), (R, L, T)
        return QuietStarOutput(
            base_logits=self.model.output(h_base).float(),
            thought_logits=self._thought_logits(h_branch[:, :, :N]),
            talk_logits=self.model.output(mixed).float(),
            mix_weight=w, branch_hidden=h_branch)

    def loss(self, tokens, thoughts, attention_mask=None):
        """-> (scalar loss, dict of floats). tokens (B, L); thoughts (B, P, L, N) from sample_thoughts."""
        out = self(tokens, thoughts, attention_mask)
        return quietstar_loss(out, tokens, thoughts, self._valid(tokens, attention_mask), self.config)

    # -------------------------------------------------------------------------
    # generation that thinks before every token

    def _think(self, h_last, position, key_valid, generator=None, thought=None):
        """
        One throwaway branch after the newest text token of each row: <start>, N sampled
        tokens (or the given thought (B, N)), <end>; the model's KV cache holds the text.
        h_last (B, d), position (B,) of the newest token, key_valid (B, S) the real text tokens
        -> (next-token logits (B, V), thought (B, N)).
        """
        B, S = key_valid.shape
        N = self.config.n_thought_tokens
        # the branch sees what the newest text token sees: real tokens within the window
        window = self.model.args.sliding_window or S
        text_visible = (key_valid & (torch.arange(S, device=key_valid.device) > S - 1 - window))[:, None]
        text_kv = [(layer.attention.cache.k[:, :, :S], layer.attention.cache.v[:, :, :S])
                   for layer in self.model.layers]
        branch_kv = [None] * len(self.model.layers)
        x = self._delimiter("start", (B, 1, 1))
        tokens = []
        for k in range(N + 2):
            h = self._branch_pass(x, (position + 1 + k).view(B, 1, 1), text_kv, text_visible,
                                  branch_kv)[:, 0, 0]                               # (B, d)
            if k < N:
                token = thought[:, k] if thought is not None else \
                    sample(self._thought_logits(h), self.config.thought_temperature, generator=generator)
                tokens.append(token)
                x = self.model.tok_embeddings(token).view(B, 1, 1, -1)
            elif k == N:
                x = self._delimiter("end", (B, 1, 1))
        mixed, _ = self._mix(h_last, h)
        return self.model.output(mixed).float(), torch.stack(tokens, dim=1)

    @torch.no_grad()
    def generate(self, prompt_tokens, max_new_tokens, think=True, temperature=1.0, top_k=None,
                 top_p=None, eos_id=2, generator=None, return_thoughts=False):
        """
        Continue prompts (a list of ids, or a list of such lists). Before every new token the
        model thinks (think=True) and predicts through the mixing head; think=False is plain
        decoding. The delimiters are never emitted. Returns the new tokens per prompt, and
        with return_thoughts also the thought (N ids) behind each new token. generator: one,
        or one per prompt (then a prompt's output does not depend on the rest of the batch).
        """
        single = isinstance(prompt_tokens[0], int)
        prompts = [prompt_tokens] if single else prompt_tokens
        model, device = self.model, self.model.output.weight.device
        tokens, positions, key_valid = left_pad(prompts, max_new_tokens, device, self.config.pad_id)
        B, P = tokens.shape
        new_tokens, thoughts = [], []
        model.setup_cache(B, P + max_new_tokens)
        try:
            h = model.hidden(tokens, positions, 0, key_valid[:, :P])[:, -1]   # (B, d)
            position = positions[:, -1]                                        # (B,)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for i in range(max_new_tokens):
                S = P + i                                                      # text tokens so far
                if think:
                    logits, thought = self._think(h, position, key_valid[:, :S], generator)
                    thoughts.append(thought)
                else:
                    logits = model.output(h).float()
                logits[:, [self.start_id, self.end_id]] = -torch.inf
                token = torch.where(done, eos_id, sample(logits, temperature, top_k, top_p, generator))
                new_tokens.append(token)
                done |= token == eos_id
                if done.all() or i == max_new_tokens - 1:
                    break
                position = position + 1
                h = model.hidden(token[:, None], position[:, None], S, key_valid[:, :S + 1])[:, -1]
        finally:
            model.clear_cache()
        out = [trim_at_eos(row, eos_id) for row in torch.stack(new_tokens, 1).tolist()]
        if return_thoughts:
            per_step = torch.stack(thoughts, 1).tolist() if thoughts else [[] for _ in out]
            thought_rows = [t[:len(o)] for t, o in zip(per_step, out)]
            return (out[0], thought_rows[0]) if single else (out, thought_rows)
        return out[0] if single else out

    @torch.no_grad()
    def next_token_logits(self, prompt_tokens, thought=None, generator=None):
        """Logits (V,) of the token after one prompt, after thinking `thought` (N ids) or a
        sampled one. Returns (logits, thought). Delimiter logits are left as they are."""
        tokens = torch.tensor([prompt_tokens], device=self.model.output.weight.device)
        S = tokens.shape[1]
        self.model.setup_cache(1, S)
        try:
            h = self.model.hidden(tokens)[:, -1]
            given = None if thought is None else torch.as_tensor(thought, device=tokens.device)[None]
            real = torch.ones(1, S, dtype=torch.bool, device=tokens.device)
            logits, thought = self._think(h, torch.tensor([S - 1], device=tokens.device), real,
                                          generator, given)
        finally:
            self.model.clear_cache()
        return logits[0], thought[0].tolist()

    # -------------------------------------------------------------------------
    # checkpoints: a plain Mistral, or the released Quiet-STaR layout

    @classmethod
    def from_pretrained(cls, path, config=None, device="cpu", dtype=torch.float32):
        """
        Load (a) a plain Mistral checkpoint (either layout): the vocabulary grows by the two
        delimiters (new rows N(0, 0.02), as the official code's resize), and the delimiters
        and mixing head start fresh; or (b) a Quiet-STaR checkpoint in the released layout,
        keeping its trained delimiters and mixing head. config defaults to the checkpoint's
        quietstar.json when there is one.
        """
        args, state_dict, extras = load_checkpoint(path, device, dtype, allow_extra=RELEASED_NAMES)
        config_file = os.path.join(path, "quietstar.json")
        if config is None and os.path.isfile(config_file):
            config = QuietStarConfig(**json.load(open(config_file)))
        if extras and set(extras) != set(RELEASED_NAMES):
            raise ValueError(f"{path}: Quiet-STaR checkpoint lacks {sorted(set(RELEASED_NAMES) - set(extras))}")
        if not extras:    # a plain Mistral: add <|startthought|> and <|endthought|>
            for name in ("tok_embeddings.weight", "output.weight"):
                new_rows = torch.randn(2, args.dim, device=device).mul_(0.02).to(dtype)
                state_dict[name] = torch.cat([state_dict[name], new_rows])
            args.vocab_size += 2
        with torch.device("meta"):
            model = Transformer(args)
        model.load_state_dict(state_dict, strict=True, assign=True)
        with torch.device(device):
            qs = cls(model, config).to(dtype)
        if extras:
            qs.load_state_dict({RELEASED_NAMES[k]: v for k, v in extras.items()}, strict=False)
        else:
            qs.init_thought_parameters()
        return qs

    def save_pretrained(self, path, dtype=None, state_dict=None):
        """Write the released Quiet-STaR layout (Hugging Face names + delimiters + talk_head)
        and our config as quietstar.json. state_dict: this module's weights when they are
        not all here (FSDP gathers them for this)."""
        ours = state_dict if state_dict is not None else self.state_dict()
        extras = {released: ours[name] for released, name in RELEASED_NAMES.items()}
        if dtype is not None:
            extras = {k: v.to(dtype) for k, v in extras.items()}
        model_weights = {k[len("model."):]: v for k, v in ours.items() if k.startswith("model.")}
        save_hf_checkpoint(self.model.args, model_weights, path, dtype, extras)
        config_file = os.path.join(path, "quietstar.json")
        with open(config_file + ".tmp", "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        os.replace(config_file + ".tmp", config_file)
