"""Slow, obviously correct versions of the method's formulas, written loop by loop from the
paper and the official code: the references that tests/test_references.py holds the fast code
to, and that the stored numbers in the tests were computed by.

These are the answers to classroom parts (the loss, the reward, the clamp of REINFORCE, the
rotary angles), so `python classroom.py make` does not hand out this file or
tests/test_references.py: a student's tests compare with the stored numbers and state
properties instead.
"""
import torch
import torch.nn.functional as F


def loss_by_loop(out, tokens, thoughts, valid, c):
    """The loss written position by position, straight from the description."""
    B, P, L, N = thoughts.shape
    T, n_scored = c.n_talk, L - 1 - c.n_talk
    lp = lambda logits, t: logits.log_softmax(-1)[t]
    base_sum = base_n = 0
    talk_sum, talk_n = [0.0] * T, [0] * T
    reward = torch.zeros(B, P, n_scored)
    for b in range(B):
        for p in range(P):
            r = b * P + p
            for i in range(L - 1):
                if valid[b, i + 1]:
                    base_sum -= lp(out.base_logits[r, i], tokens[b, i + 1])
                    base_n += 1
            for i in range(L):
                for s in range(T):
                    t = i + 1 + s
                    if t < L and valid[b, t]:
                        gain = lp(out.talk_logits[r, i, s], tokens[b, t]) - lp(out.base_logits[r, t - 1], tokens[b, t])
                        talk_sum[s] -= lp(out.talk_logits[r, i, s], tokens[b, t])
                        talk_n[s] += 1
                        if i < n_scored:
                            reward[b, p, i] += gain
    advantage = reward - reward.mean(1, keepdim=True) if P > 1 else reward.clone()
    if c.positive_advantage_only:
        advantage = advantage.clamp(min=0)
    policy = 0.0
    for k in range(N):                 # mean over thought tokens of mean over rows, positions
        terms = [-advantage[b, p, i] * (out.thought_logits[b * P + p, i, k] / c.reinforce_temperature)
                 .log_softmax(-1)[thoughts[b, p, i, k]]
                 for b in range(B) for p in range(P) for i in range(n_scored)]
        policy += sum(terms) / len(terms) / N
    nll = c.base_loss_weight * base_sum / base_n + \
        (1 - c.base_loss_weight) * sum(a / n for a, n in zip(talk_sum, talk_n)) / T
    return nll + c.policy_weight * policy, reward, advantage, policy


def rope_by_formula(x, positions, theta):
    """Rotary embedding pair by pair: pair i = (x[2i], x[2i+1]) at position p is rotated by the
    angle p * theta^(-2i/D). x: (B, T, H, D) -> (B, T, H, D)."""
    y = torch.empty_like(x)
    D = x.shape[-1]
    for t, p in enumerate(positions.tolist()):
        for i in range(D // 2):
            angle = torch.tensor(p * theta ** (-2 * i / D))
            c, s = torch.cos(angle), torch.sin(angle)
            x0, x1 = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]
            y[:, t, :, 2 * i] = x0 * c - x1 * s
            y[:, t, :, 2 * i + 1] = x0 * s + x1 * c
    return y


def loss_at_init(base_logits, tokens, valid, n_talk, base_loss_weight=0.5):
    """With the mixing weight at 0 the talk logits are the base logits s steps on, so the loss is
    w_base * CE(base) + (1 - w_base) * mean over s of CE(base, the target s steps further),
    over real targets only. base_logits: (B, L, V), tokens, valid: (B, L)."""
    ce = lambda logits, target, ok: F.cross_entropy(logits[ok], target[ok])
    loss = base_loss_weight * ce(base_logits[:, :-1], tokens[:, 1:], valid[:, 1:])
    talk = sum(ce(base_logits[:, s:-1], tokens[:, 1 + s:], valid[:, 1 + s:]) for s in range(n_talk))
    return loss + (1 - base_loss_weight) * talk / n_talk
