"""Small parts against stored numbers, one quantity per assertion, so that a wrong
implementation fails with a message naming what is wrong. The numbers were computed once by
the reference code and written here; the tests state no formula (a student's copy of this
file hands out the results of tiny cases, not the solution)."""
import types

import torch

from model import apply_rope, rope_cos_sin
from quietstar import QuietStar, reinforce_loss


def close(name, got, expected, atol=1e-4):
    """assert got == expected (a list of numbers), naming the quantity and both values."""
    got = torch.as_tensor(got, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert torch.allclose(got, expected, atol=atol), f"{name}: got {got.tolist()}, expected {expected.tolist()}"


def test_rope_angles_per_pair():
    """Position 2, head_dim 8, theta 10000: the angle of each of the 4 pairs."""
    cos, sin = rope_cos_sin(torch.arange(3), 8, 10000.0)
    assert cos.shape == sin.shape == (3, 1, 4) and cos.dtype == torch.float32
    close("rotation angle of each pair at position 2 (atan2(sin, cos))",
          torch.atan2(sin, cos)[2, 0], [2.0, 0.2, 0.02, 0.002])
    close("rotation angle at position 0", torch.atan2(sin, cos)[0, 0], [0.0] * 4)


def test_rope_rotates_adjacent_pairs():
    x = torch.arange(16.0).view(1, 2, 1, 8)                      # (B, T, H, D)
    y = apply_rope(x, *rope_cos_sin(torch.arange(2), 8, 100.0))
    assert y.shape == x.shape and y.dtype == x.dtype
    close("apply_rope at position 0 (no rotation)", y[0, 0, 0], x[0, 0, 0])
    close("apply_rope at position 1", y[0, 1, 0],
          [-3.2508, 11.5945, 6.0833, 13.5644, 10.6422, 14.1331, 13.5187, 15.4351])
    assert apply_rope(x.bfloat16(), *rope_cos_sin(torch.arange(2), 8, 100.0)).dtype == torch.bfloat16


REWARD = torch.tensor([[1.0, -0.5], [0.0, 0.5], [2.0, 1.0], [-1.0, 3.0]])   # (R=B*2, n_scored)
LOGP = -torch.arange(1, 25, dtype=torch.float32).view(4, 3, 2) / 10         # (R, L, N)


def reinforce(positive_only):
    return reinforce_loss(LOGP, REWARD, 2, types.SimpleNamespace(positive_advantage_only=positive_only))


def test_reinforce_advantage_and_loss():
    """2 texts x 2 thoughts, every advantage kept (positive_advantage_only=False)."""
    loss, advantage = reinforce(False)
    close("advantage (reward minus the mean reward of the position's thoughts)",
          advantage, [[0.5, -0.5], [-0.5, 0.5], [1.5, -1.0], [-1.5, 1.0]])
    close("policy_loss", loss, -0.0375)


def test_reinforce_positive_advantage_only_advantage():
    close("advantage with positive_advantage_only (the negative ones must become 0)",
          reinforce(True)[1], [[0.5, 0.0], [0.0, 0.5], [1.5, 0.0], [0.0, 1.0]])


def test_reinforce_positive_advantage_only_loss():
    close("policy_loss with positive_advantage_only", reinforce(True)[0], 0.590625)


def test_mixing_head_interpolates():
    head = types.SimpleNamespace(mixing_head=lambda x: torch.full((*x.shape[:-1], 1), 0.25))
    h_base, h_thought = torch.ones(2, 3, 4), torch.full((2, 3, 4), 5.0)
    h, w = QuietStar._mix(head, h_base, h_thought)
    assert h.shape == (2, 3, 4), f"mixed hidden state: shape {tuple(h.shape)}, expected (2, 3, 4)"
    assert w.shape == (2, 3), f"mixing weight w: shape {tuple(w.shape)}, expected (2, 3) (squeezed)"
    close("mixed hidden state (1 - w) h_base + w h_thought, w = 0.25", h[0, 0], [2.0] * 4)
