"""The fast code against the slow loops of tests/references.py, on fresh random inputs, and
the stored numbers of the student-facing tests against those loops (so the numbers cannot
drift from the formulas). classroom.py does not hand this file out: it holds the answers."""
import math

import pytest
import torch

from model import apply_rope, rope_cos_sin
from quietstar import quietstar_loss
from references import loss_at_init, loss_by_loop, rope_by_formula
from test_quietstar import LOOP_NUMBERS, batch_with_padding, loss_case, tiny_quietstar


@pytest.mark.parametrize("positive_only", [True, False])
def test_reward_advantage_policy_equal_a_loop(positive_only):
    out, tokens, thoughts, valid, c = loss_case(positive_only)
    loss, m = quietstar_loss(out, tokens, thoughts, valid, c)
    with torch.no_grad():
        ref_loss, reward, advantage, policy = loss_by_loop(out, tokens, thoughts, valid, c)
    loop = dict(loss=ref_loss.item(), policy_loss=policy.item(), reward_mean=reward.mean().item(),
                reward_max=reward.max().item(), advantage_positive_frac=(advantage > 0).float().mean().item())
    got = dict(m, loss=loss.item())
    for name, value in loop.items():
        assert math.isclose(got[name], value, rel_tol=1e-5, abs_tol=1e-9), f"{name}: {got[name]}, the loop's {value}"
        assert math.isclose(LOOP_NUMBERS[positive_only][name], value, rel_tol=1e-6, abs_tol=1e-9), \
            f"stored {name} {LOOP_NUMBERS[positive_only][name]}, the loop's {value}: recompute LOOP_NUMBERS"


def test_loss_at_init_is_the_base_loss_and_the_shifted_base_loss():
    torch.manual_seed(3)
    qs = tiny_quietstar(trained_look=False)
    tokens = batch_with_padding()
    thoughts = qs.sample_thoughts(tokens)
    out = qs(tokens, thoughts)
    loss, _ = qs.loss(tokens, thoughts)
    base = out.base_logits.view(2, 2, 12, -1)[:, 0]
    expected = loss_at_init(base, tokens, tokens != 2, qs.config.n_talk, qs.config.base_loss_weight)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_rope_rotates_pairs_by_position_times_frequency():
    x = torch.randn(1, 3, 2, 8)
    y = apply_rope(x, *rope_cos_sin(torch.arange(3), 8, 10000.0))
    assert torch.allclose(y, rope_by_formula(x, torch.arange(3), 10000.0), atol=1e-6)
