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
per position per step through the whole model. Here the training forward puts the text and
every branch of every position in one sequence [text | branches] and runs each transformer
block on it ONCE (one FSDP all-gather and one gradient reduce per block and step). Every
branch token attends to (a) the text keys up to its position and (b) its own few branch
keys, in one softmax: L * M * (L + M) per layer for branches of M tokens, instead of
L^2 * M^2 / 2. quietstar_ops.py holds the attention (plain reference, a lean chunked
version for the CPU, FlexAttention for CUDA) and the output-layer loss that never keeps the
vocabulary-wide logits. Sampling the thoughts (no gradient) runs the text once, then one
token per branch per step through a small per-branch cache.

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

from model import Transformer, all_done, attention_mask, left_pad, load_checkpoint, rope_cos_sin, sample, \
    save_hf_checkpoint, trim_at_eos
from quietstar_ops import chunked_thought_attention, joint_block_mask, joint_flex_attention, \
    metrics_to_floats, sample_by_inverse_cdf, thought_attention, token_nll


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


def step_flops(model_args, quietstar_config, docs, seq_len, mode="quietstar"):
    """
    Model FLOPs of one optimizer step over `docs` documents of seq_len tokens (all processes
    together; activation-checkpointing recompute not counted), for train.py's MFU and
    estimate.py. A matmul of (m, k) by (k, n) is 2mkn. Tokens that are trained cost 3x their
    forward (forward, and backward to inputs and to weights); thought sampling runs without
    gradient, so it costs its forward only.
    Attention counts the query-key pairs that are visible (causal text; each branch token sees
    the text up to its position within the window, and its own branch so far): 4 * head_dim
    * n_heads per pair (scores and weighted sum).
    """
    a, L = model_args, seq_len
    block = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.hidden_dim
    per_token = 2 * a.n_layers * block                          # forward, through every block
    logits = 2 * a.dim * a.vocab_size                           # forward, one output-layer row
    pair = 4 * a.n_layers * a.n_heads * a.head_dim              # forward, one visible q-k pair
    window = a.sliding_window or L
    seen = [min(i + 1, window) for i in range(L)]               # text keys of text token i
    text_pairs = sum(seen)
    if mode == "lm":
        return docs * 3 * (L * (per_token + logits) + text_pairs * pair)
    c = quietstar_config
    P, N, T, M = c.n_thoughts, c.n_thought_tokens, c.n_talk, c.branch_len
    # sampling: the text once, then N steps of one token per (thought, position); token k of
    # a branch sees the text up to its position and the k+1 branch tokens up to itself
    sample = L * per_token + text_pairs * pair + P * L * N * (per_token + logits) \
        + P * N * text_pairs * pair + P * L * (N * (N + 1) // 2) * pair
    # training forward: the text once; every branch of M tokens; the output layer over the
    # L-1 text rows that have a next token, and the N thought rows and T talk rows of every
    # branch; the mixing head (2d->d, d->d, d->1) over every talk row
    mixing = 2 * (2 * a.dim * a.dim + a.dim * a.dim + a.dim)
    train_forward = L * per_token + text_pairs * pair + P * L * M * per_token \
        + P * M * text_pairs * pair + P * L * (M * (M + 1) // 2) * pair \
        + (L - 1 + P * L * (N + T)) * logits + P * L * T * mixing
    return docs * (sample + 3 * train_forward)


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


class BranchCache:
    """Keys and values of a branch's tokens so far, per layer, in buffers of n_tokens slots
    written one step at a time. The step is a tensor and the shapes never change, so that a
    compiled block runs one graph at every step and layer (growing tensors recompiled it at
    every step, past torch.compile's limit, and back to eager)."""

    def __init__(self, n_tokens):
        self.n_tokens, self.step, self.kv = n_tokens, None, {}

    def next_step(self, device):
        """-> the slot of the token now run, a 0-d long tensor (0, 1, ...)."""
        self.step = torch.zeros((), dtype=torch.long, device=device) if self.step is None else self.step + 1
        return self.step

    def buffers(self, layer, shape, like):
        """-> (k, v) buffers (*shape, n_tokens, D) of a layer, made at its first step."""
        if layer not in self.kv:
            self.kv[layer] = tuple(like.new_zeros(*shape, self.n_tokens, like.shape[-1]) for _ in "kv")
        return self.kv[layer]


@dataclass
class QuietStarOutput:
    """One forward's results: per-token log-likelihoods (what the loss needs, float32) and
    the hidden states they came from. R = B * n_thoughts rows, P adjacent rows per text.
    The full logits are not kept (vocabulary-wide, they would dominate memory); the
    base_logits / thought_logits / talk_logits properties recompute them for inspection."""
    base_nll: torch.Tensor         # (B, L-1) -log p(x_{i+1}) from the text alone
    talk_nll: torch.Tensor         # (R, L, n_talk) -log p(x_{i+1+s}) of the mixed prediction
    thought_logp: torch.Tensor     # (R, L, N) log p(c_k) at reinforce_temperature, no delimiters
    mix_weight: torch.Tensor       # (R, L, n_talk) the mixing head's w
    base_hidden: torch.Tensor = None    # (B, L, d) final-normed text states
    branch_hidden: torch.Tensor = None  # (R, L, M, d) final-normed state of every branch token
    talk_hidden: torch.Tensor = None    # (R, L, n_talk, d) the mixed states the talk logits read
    head: Optional["QuietStar"] = None  # whose output layer turns hidden states into logits

    @property
    def base_logits(self):     # (R, L, V) plain next-token logits, repeated for each thought
        P = self.talk_nll.shape[0] // self.base_hidden.shape[0]
        return self.head.model.output(self.base_hidden).float().repeat_interleave(P, 0)

    @property
    def thought_logits(self):  # (R, L, N, V) what thought token k+1 was sampled from
        return self.head._thought_logits(self.branch_hidden[:, :, :self.head.config.n_thought_tokens])

    @property
    def talk_logits(self):     # (R, L, n_talk, V) mixed prediction of x_{i+1+s}
        return self.head.model.output(self.talk_hidden).float()


def talk_targets(tokens, valid, n_talk):
    """Talk step s after position i predicts x_{i+1+s}: -> targets (B, L, T) and whether each
    is a real token (B, L, T) (beyond the text or at padding: False)."""
    L = tokens.shape[1]
    index = torch.arange(L, device=tokens.device)[:, None] + 1 + torch.arange(n_talk, device=tokens.device)  # (L, T)
    return F.pad(tokens, (0, n_talk + 1))[:, index], F.pad(valid, (0, n_talk + 1))[:, index]


def talk_loss_and_reward(out, tokens, valid, config):
    """
    The language-modelling losses and the reward of every thought.
    out: QuietStarOutput with R = B * P rows; tokens (B, L); valid bool (B, L), False at
    padding (its targets are not scored).
    Returns nll_base (mean CE of the plain next token over real targets), nll_talk (the mean
    over talk steps s of the mean CE of predicting x_{i+1+s} after position i's thought),
    reward (R, L-1-n_talk), detached: for each position with all n_talk targets, the sum over
    them of log p_talk - log p_base, and target_ok bool (R, L, n_talk).
    """
    L, T = tokens.shape[1], config.n_talk
    P = out.talk_nll.shape[0] // tokens.shape[0]
    n_scored = L - 1 - T                                      # positions that have all T targets
    base_ce = out.base_nll * valid[:, 1:]                                         # (B, L-1)
    _, target_ok = talk_targets(tokens, valid, T)
    target_ok = target_ok.repeat_interleave(P, 0)                                 # (R, L, T)
    talk_ce = out.talk_nll * target_ok                                            # (R, L, T)
    nll_base = base_ce.sum() / valid[:, 1:].sum()
    nll_talk = (talk_ce.sum((0, 1)) / target_ok.sum((0, 1))).mean()

    # reward of a thought: how much likelier it made the next T true tokens
    ahead = torch.arange(n_scored, device=tokens.device)[:, None] + torch.arange(T, device=tokens.device)
    base_ce_ahead = base_ce.repeat_interleave(P, 0)[:, ahead]                     # (R, n_scored, T)
    reward = (base_ce_ahead - talk_ce[:, :n_scored]).sum(-1).detach()            # (R, n_scored)
    return nll_base, nll_talk, reward, target_ok


def reinforce_loss(thought_logp, reward, n_thoughts, config):
    """
    REINFORCE with a baseline, on the sampled thought tokens.
    thought_logp (R, L, N): log p(c_k) at reinforce_temperature of each sampled thought
    token; reward (R, n_scored); R = B * n_thoughts, a text's thoughts in adjacent rows.
    The advantage is the reward minus the mean reward of the n_thoughts thoughts at the same
    position (no baseline with one thought), clamped at 0 if positive_advantage_only.
    Returns (policy_loss, advantage (R, n_scored)): policy_loss is the mean over every
    (row, position, thought token), zero advantages included, of -advantage * log p.
    """
    n_scored = reward.shape[1]
    advantage = reward
    if n_thoughts > 1:   # baseline: the mean reward of the thoughts at the same position
        per_example = reward.view(-1, n_thoughts, n_scored)
        advantage = (per_example - per_example.mean(1, keepdim=True)).view(-1, n_scored)
    if config.positive_advantage_only:
        advantage = advantage.clamp(min=0)
    log_p = thought_logp[:, :n_scored]                                            # (R, n_scored, N)
    return (-advantage[..., None] * log_p).mean(), advantage


def quietstar_loss(out, tokens, thoughts, valid, config):
    """
    The Quiet-STaR loss from the model's per-token log-likelihoods (see the file's docstring).
    out: QuietStarOutput with R = B * P rows; tokens (B, L); thoughts (B, P, L, N);
    valid bool (B, L), False at padding (its targets are not scored).
    Returns (scalar loss, dict of floats).
    """
    B, P, L, N = thoughts.shape
    if L - 1 - config.n_talk < 1:
        raise ValueError(f"sequence of {L} tokens is too short for n_talk={config.n_talk}")
    nll_base, nll_talk, reward, target_ok = talk_loss_and_reward(out, tokens, valid, config)
    nll = config.base_loss_weight * nll_base + (1 - config.base_loss_weight) * nll_talk
    policy_loss, advantage = reinforce_loss(out.thought_logp, reward, P, config)
    loss = nll + config.policy_weight * policy_loss

    # the metrics stay tensors until one host sync for all of them
    w = torch.where(target_ok, out.mix_weight, torch.nan)
    metrics = dict(loss=loss, nll_base=nll_base, nll_talk=nll_talk, policy_loss=policy_loss,
                   reward_mean=reward.mean(), reward_max=reward.max(),
                   advantage_positive_frac=(advantage > 0).float().mean(),
                   mix_weight_mean=w.nanmean(), mix_weight_min=w.nan_to_num(nan=torch.inf).min(),
                   mix_weight_max=w.nan_to_num(nan=-torch.inf).max())
    return loss, metrics_to_floats(metrics)


class QuietStar(nn.Module):
    def __init__(self, model: Transformer, config: Optional[QuietStarConfig] = None):
        super().__init__()
        self.model = model
        self.config = config or QuietStarConfig()
        self.attention_impl = None   # "flex", "chunked" or "reference"; None: flex on CUDA, else chunked
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

    def _branch_pass(self, x, positions, text_kv, text_visible, branch_kv):
        """
        Run the next token of every position's branch through the model (sampling, thinking).
        x (R, C, 1, d) input embeddings; positions (C, 1) or (R, C, 1) rotary positions;
        text_kv: per layer (k, v) of the text, (R, Hkv, S, D); text_visible (R or 1, C, S);
        branch_kv: the BranchCache of this branch's earlier tokens; this one's are added.
        Returns final-normed hidden states (R, C, 1, d).
        """
        R, C, _, d = x.shape
        args = self.model.args
        cos, sin = rope_cos_sin(positions.flatten(-2), args.head_dim, args.rope_theta)
        step = branch_kv.next_step(x.device)                                     # 0-d long
        branch_visible = (torch.arange(branch_kv.n_tokens, device=x.device) <= step)[None]  # (1, K)

        def branch_attention(text_k, text_v, k_cache, v_cache):
            def attend(q, k, v):                       # q (R, H, C, D), k, v (R, Hkv, C, D)
                k_cache.index_copy_(3, step.view(1), k.unsqueeze(3))
                v_cache.index_copy_(3, step.view(1), v.unsqueeze(3))
                return thought_attention(q.unsqueeze(3), text_k, text_v, k_cache, v_cache, text_visible,
                                         branch_visible).flatten(2, 3)
            return attend

        h = x.reshape(R, C, d)
        for i, layer in enumerate(self.model.layers):   # through each block's __call__ (FSDP hooks)
            text_k, text_v = text_kv[i]
            attend = branch_attention(text_k, text_v, *branch_kv.buffers(i, (R, text_k.shape[1], C), text_k))
            h = layer(h, cos, sin, None, 0, attend)
        return self.model.norm(h).view(R, C, 1, d)

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
        """Mixing head: h_base, h_thought (..., D) -> (h (..., D), w (...)). The weight
        w = self.mixing_head([h_base ; h_thought]) (..., 1) (concatenated on the last dim; no
        sigmoid: w starts at 0, where thinking changes nothing), then
        h = (1 - w) h_base + w h_thought in their dtype, and w is returned without its last dim."""
        w = self.mixing_head(torch.cat([h_base, h_thought], dim=-1))      # (..., 1)
        return (1 - w) * h_base + w * h_thought, w.squeeze(-1)

    # -------------------------------------------------------------------------
    # training: sample thoughts (no gradient), then one forward and the loss

    @torch.no_grad()
    def sample_thoughts(self, tokens, attention_mask=None, generator=None):
        """tokens (B, L) -> thoughts (B, n_thoughts, L, n_thought_tokens), sampled in parallel.
        generator: a torch.Generator, or a list of B of them: then each text's thoughts do not
        depend on what else is in the batch."""
        B, L = tokens.shape
        P, N = self.config.n_thoughts, self.config.n_thought_tokens
        valid = self._valid(tokens, attention_mask)
        _, text_kv = self._text_pass(tokens, valid)             # per layer (B, Hkv, L, D)
        # the P thoughts of a position are P more branches of the same text: C = P * L
        visible = self._text_visible(valid).repeat(1, P, 1)     # (B, C, L)
        text_position = torch.arange(L, device=tokens.device).repeat(P)[:, None]    # (C, 1)
        branch_kv = BranchCache(N)
        uniforms = self._thought_uniforms(B, L, generator, tokens.device)          # (B, L, N, P)
        x = self._delimiter("start", (B, P * L, 1))                                 # (B, C, 1, d)
        thoughts = []
        for k in range(N):
            h = self._branch_pass(x, text_position + 1 + k, text_kv, visible, branch_kv)  # (B, C, 1, d)
            logits = self._thought_logits(h).view(B, P, L, -1)
            token = sample_by_inverse_cdf(logits, uniforms[:, :, k].transpose(1, 2),
                                          self.config.thought_temperature)         # (B, P, L)
            thoughts.append(token.view(B, P * L))
            x = self.model.tok_embeddings(thoughts[-1])[:, :, None]
        return torch.stack(thoughts, dim=-1).view(B, P, L, N)

    def _thought_uniforms(self, B, L, generator, device):
        """The random numbers of a step's thoughts, (B, L, N, P) in (0, 1], drawn up front
        (no host sync in the loop). With one generator per text, position i's numbers come
        i-th in that text's stream, so a text's thoughts do not depend on how much padding
        the batch adds after it, nor on the other texts."""
        shape = (L, self.config.n_thought_tokens, self.config.n_thoughts)
        if isinstance(generator, (list, tuple)):
            return 1 - torch.stack([torch.rand(shape, generator=g, device=device) for g in generator])
        return 1 - torch.rand((B, *shape), generator=generator, device=device)

    def _text_visible(self, valid):
        """bool (B, L, L): the text each position's branch sees = what that text token sees."""
        L = valid.shape[1]
        return attention_mask(0, L, valid, self.model.args.sliding_window, valid.device)[:, 0]

    def _joint_pass(self, tokens, valid, x_branch, branch_positions):
        """
        The text and every branch through each transformer block together, in ONE call per
        block (so FSDP gathers a block's weights once and reduces its gradient once).
        tokens (B, L); x_branch (B, C, M, d) branch input embeddings, C = P * L branches,
        branch c after text position c % L; branch_positions (C, M) rotary positions.
        -> final-normed hidden states of the text (B, L, d) and of the branches (B, C, M, d).
        """
        B, L = tokens.shape
        C, M, d = x_branch.shape[1:]
        args = self.model.args
        x = torch.cat([self.model.tok_embeddings(tokens).to(x_branch.dtype),
                       x_branch.reshape(B, C * M, d)], dim=1)                  # (B, L + C*M, d)
        positions = torch.cat([torch.arange(L, device=tokens.device), branch_positions.flatten()])
        cos, sin = rope_cos_sin(positions, args.head_dim, args.rope_theta)
        attend = self._joint_attention(valid, C, M)
        h = x
        for layer in self.model.layers:      # through each block's __call__ (FSDP, checkpointing)
            h = layer(h, cos, sin, None, 0, attend)
        h = self.model.norm(h)
        return h[:, :L], h[:, L:].view(B, C, M, d)

    def _joint_attention(self, valid, C, M):
        """attend(q, k, v) for _joint_pass: q (B, H, L + C*M, D), k, v (B, Hkv, L + C*M, D).
        attention_impl picks how: "flex" (one fused kernel; the CUDA default), "chunked"
        (plain PyTorch, lean; the default elsewhere) or "reference" (thought_attention whole)."""
        L, window = valid.shape[1], self.model.args.sliding_window
        impl = self.attention_impl or ("flex" if valid.is_cuda else "chunked")
        if impl == "flex":
            mask = joint_block_mask(valid, M, L + C * M, window)       # once for every block
            return lambda q, k, v: joint_flex_attention(q, k, v, mask)
        text_mask = attention_mask(0, L, valid, window, valid.device)            # (B, 1, L, L)
        text_visible = text_mask[:, 0]                                            # (B, L, L)

        def attend(q, k, v):
            text = F.scaled_dot_product_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L],
                                                  attn_mask=text_mask, enable_gqa=True)  # (B, H, L, D)
            q_b, k_b, v_b = (t[:, :, L:].unflatten(2, (C, M)) for t in (q, k, v))     # (B, h, C, M, D)
            if impl == "chunked":
                branch = chunked_thought_attention(q_b, k[:, :, :L], v[:, :, :L], k_b, v_b,
                                                   text_visible, window)
            else:
                branch = thought_attention(q_b, k[:, :, :L], v[:, :, :L], k_b, v_b,
                                           text_visible.repeat(1, C // L, 1))
            return torch.cat([text, branch.flatten(2, 3)], dim=2)               # (B, H, L + C*M, D)
        return attend

    def forward(self, tokens, thoughts, attention_mask=None):
        """
        tokens (B, L), thoughts (B, P, L, N) -> QuietStarOutput with R = B * P rows: each
        text row is repeated P times (P adjacent copies), one per sampled thought.
        """
        B, P, L, N = thoughts.shape
        T, M = self.config.n_talk, self.config.branch_len
        if N != self.config.n_thought_tokens or tokens.shape != (B, L):
            raise ValueError(f"thoughts {tuple(thoughts.shape)} do not fit tokens {tuple(tokens.shape)} "
                             f"and n_thought_tokens={self.config.n_thought_tokens}")
        valid = self._valid(tokens, attention_mask)
        device = tokens.device

        # every branch: <start> c_1..c_N <end> x_{i+1}..x_{i+T-1} at positions i+1, i+2, ...
        ahead = torch.arange(L, device=device)[:, None] + torch.arange(1, T, device=device)  # (L, T-1)
        talk_inputs = F.pad(tokens, (0, T), value=self.config.pad_id)[:, ahead]  # (B, L, T-1)
        C = P * L
        x_branch = torch.cat([self._delimiter("start", (B, C, 1)),
                              self.model.tok_embeddings(thoughts.reshape(B, C, N)),
                              self._delimiter("end", (B, C, 1)),
                              self.model.tok_embeddings(talk_inputs.repeat(1, P, 1))], dim=2)  # (B, C, M, d)
        branch_positions = torch.arange(L, device=device).repeat(P)[:, None] + \
            torch.arange(1, M + 1, device=device)                                  # (C, M)
        h_base, h_branch = self._joint_pass(tokens, valid, x_branch, branch_positions)
        h_branch = h_branch.reshape(B * P, L, M, -1)                               # (R, L, M, d)

        # talk step s mixes the base state at i+s with the branch state after <end> + s tokens
        shifted = (torch.arange(L, device=device)[:, None] + torch.arange(T, device=device)).clamp(max=L - 1)
        h_base_ahead = h_base[:, shifted].repeat_interleave(P, 0)                  # (R, L, T, d)
        mixed, w = self._mix(h_base_ahead, h_branch[:, :, N + 1:])                  # (R, L, T, d), (R, L, T)
        targets, _ = talk_targets(tokens, valid, T)
        delimiters = torch.tensor([self.start_id, self.end_id], device=device)
        output = self.model.output
        return QuietStarOutput(
            base_nll=token_nll(output, h_base[:, :-1], tokens[:, 1:]),
            talk_nll=token_nll(output, mixed, targets.repeat_interleave(P, 0)),
            thought_logp=-token_nll(output, h_branch[:, :, :N], thoughts.reshape(B * P, L, N),
                                    self.config.reinforce_temperature, delimiters),
            mix_weight=w, base_hidden=h_base, branch_hidden=h_branch, talk_hidden=mixed, head=self)

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
        branch_kv = BranchCache(N + 2)
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
        new, thoughts = self.generate_ids(prompts, max_new_tokens, think, temperature, top_k, top_p,
                                          eos_id, generator)
        out = [trim_at_eos(row, eos_id) for row in new.tolist()]
        if return_thoughts:
            thought_rows = [t[:len(o)] for t, o in zip(thoughts.tolist(), out)]
            return (out[0], thought_rows[0]) if single else (out, thought_rows)
        return out[0] if single else out

    @torch.no_grad()
    def generate_ids(self, prompts, max_new_tokens, think=True, temperature=1.0, top_k=None,
                     top_p=None, eos_id=2, generator=None):
        """generate() on the device: prompts (a list of id lists) -> new tokens (B, n) and the
        thought behind each (B, n, N; N = 0 without thinking), EOS-padded after each row's EOS."""
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
                if i == max_new_tokens - 1 or all_done(done):
                    break
                position = position + 1
                h = model.hidden(token[:, None], position[:, None], S, key_valid[:, :S + 1])[:, -1]
        finally:
            model.clear_cache()
        no_thoughts = torch.zeros(B, len(new_tokens), 0, dtype=torch.long, device=device)
        return torch.stack(new_tokens, 1), torch.stack(thoughts, 1) if thoughts else no_thoughts

    @torch.no_grad()
    def next_token_logits(self, prompt_tokens, thought=None, generator=None):
        """Logits (V,) of the token after one prompt, after thinking `thought` (N ids) or a
        sampled one. Returns (logits, thought as a list). Delimiter logits are left as they are."""
        logits, thought = self.next_token_logits_on_device(prompt_tokens, thought, generator)
        return logits, thought.tolist()

    @torch.no_grad()
    def next_token_logits_on_device(self, prompt_tokens, thought=None, generator=None):
        """next_token_logits, with the thought returned as a tensor (N,) on the model's device."""
        device = self.model.output.weight.device
        tokens = torch.tensor([prompt_tokens], device=device)
        S = tokens.shape[1]
        self.model.setup_cache(1, S)
        try:
            h = self.model.hidden(tokens)[:, -1]
            given = None if thought is None else torch.as_tensor(thought, device=device)[None]
            real = torch.ones(1, S, dtype=torch.bool, device=device)
            logits, thought = self._think(h, torch.tensor([S - 1], device=device), real, generator, given)
        finally:
            self.model.clear_cache()
        return logits[0], thought[0]

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
        from checkpoint import read_quietstar_config      # checks the file: a one-line error naming it
        args, state_dict, extras = load_checkpoint(path, device, dtype, allow_extra=RELEASED_NAMES)
        if config is None:
            config = read_quietstar_config(path)
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
