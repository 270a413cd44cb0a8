"""Bad-input and edge-case sweeps for entropy_rl.covariance and entropy_rl.toy (the identities live in the notebooks)."""
import math

import pytest
import torch

from entropy_rl import covariance as cv
from entropy_rl import toy


def _batch(B=3, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, dtype=torch.float64, generator=g) * 3
    old = logp + 0.1 * torch.randn(B, T, dtype=torch.float64, generator=g)
    adv = torch.randn(B, dtype=torch.float64, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    return logp, old, adv, mask


@pytest.mark.parametrize("fn", [cv.clip_cov_loss, cv.kl_cov_loss])
def test_shape_mismatches_raise(fn):
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="old_logp"):
        fn(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        fn(logp, old, torch.zeros(4, dtype=torch.float64), mask)
    with pytest.raises(ValueError, match="mask"):
        fn(logp, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        fn(logp[0], old[0], adv[:1], mask[0])
    with pytest.raises(TypeError):
        fn(logp, old, adv.tolist(), mask)


@pytest.mark.parametrize("fn", [cv.clip_cov_loss, cv.kl_cov_loss])
def test_empty_mask_selects_nothing(fn):
    logp, old, adv, mask = _batch()
    empty = torch.zeros_like(mask)
    x = logp.clone().requires_grad_()
    loss, sel = fn(x, old, adv, empty)
    assert not sel.any() and (loss == 0).all()
    loss.sum().backward()
    assert (x.grad == 0).all()


def test_token_covariance_scope_arguments():
    logp, _, adv, mask = _batch()
    assert (cv.token_covariance(logp, adv, torch.zeros_like(mask)) == 0).all()
    with pytest.raises(ValueError, match="scope"):
        cv.token_covariance(logp, adv, mask, scope="batch")
    with pytest.raises(ValueError, match="global_stats"):
        cv.token_covariance(logp, adv, mask, scope="global")
    with pytest.raises(ValueError, match="global_stats"):
        cv.token_covariance(logp, adv, mask, global_stats=(0.0, 0.0))
    with pytest.raises(ValueError, match="no valid token"):
        cv.covariance_stats(logp, adv, torch.zeros_like(mask))
    # a real torch.distributed-style all_reduce works in place and returns None
    def inplace_double(t):
        t.mul_(2)
    m1 = cv.covariance_stats(logp, adv, mask)
    m2 = cv.covariance_stats(logp, adv, mask, all_reduce=inplace_double)
    assert torch.allclose(torch.stack(m1), torch.stack(m2))


def test_global_scope_changes_selection_on_random_batches():
    # over many random micro-batches of a larger batch, the two scopes disagree somewhere
    differ = 0
    for seed in range(20):
        logp, old, adv, mask = _batch(B=8, T=6, seed=seed)
        stats = cv.covariance_stats(logp, adv, mask)
        sub = slice(0, 2)
        a = cv.kl_cov_loss(logp[sub], old[sub], adv[sub], mask[sub], k=0.1)[1]
        b = cv.kl_cov_loss(logp[sub], old[sub], adv[sub], mask[sub], k=0.1, global_stats=stats)[1]
        differ += int(not torch.equal(a, b))
    assert differ > 0


def test_bad_hyperparameters():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError):
        cv.selection_count(-0.1, 10)
    with pytest.raises(ValueError):
        cv.selection_count(1.5, 10)
    with pytest.raises(ValueError):
        cv.clip_cov_loss(logp, old, adv, mask, cov_lb=5.0, cov_ub=1.0)
    with pytest.raises(ValueError):
        cv.clip_cov_loss(logp, old, adv, mask, clip_ratio=2.0)
    with pytest.raises(ValueError):
        cv.kl_cov_loss(logp, old, adv, mask, beta=-1.0)
    with pytest.raises(ValueError):
        cv.percent_to_fraction(150.0)
    with pytest.raises(ValueError):
        cv.simulate_bandit_grpo("ppo")


def test_bf16_inputs_keep_dtype_and_select():
    logp, old, adv, mask = _batch(B=4, T=8)
    loss, sel = cv.kl_cov_loss(logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask, k=0.1)
    assert loss.dtype == torch.bfloat16 and int(sel.sum()) == 3
    loss, sel = cv.clip_cov_loss(logp.float(), old.float(), adv.float(), mask, clip_ratio=0.1, cov_lb=-10, cov_ub=10)
    assert loss.dtype == torch.float32 and int(sel.sum()) >= 1


def test_first_order_and_fit_bad_input():
    z = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError):
        cv.first_order_entropy_change(z, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError):
        cv.first_order_entropy_change(z, [0.0] * 4)
    with pytest.raises(ValueError):
        cv.fit_entropy_reward([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        cv.fit_entropy_reward([1.0], [0.1])
    with pytest.raises(ValueError):
        cv.fit_entropy_reward([1.0, 2.0], [0.1])
    with pytest.raises(ValueError):
        cv.entropy_contribution_numbers(1.2, 1.0)
    # a masked action (logit -inf) neither contributes nor produces NaN
    zm = torch.tensor([0.0, 1.0, -math.inf], dtype=torch.float64)
    d = torch.tensor([1.0, -1.0, 5.0], dtype=torch.float64)
    out = cv.first_order_entropy_change(zm, d)
    assert torch.isfinite(out)
    assert torch.allclose(out, cv.first_order_entropy_change(zm[:2], d[:2]))


def test_toy_bad_input():
    z = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError):
        toy.vanilla_pg_direction(z, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError):
        toy.policy_entropy(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        toy.policy_probs(torch.zeros(0))
    with pytest.raises(ValueError):
        toy.ppo_surrogate(z, z, z, eps_low=-0.1)
    with pytest.raises(ValueError):
        toy.finite_difference_grad(lambda v: v, z)  # not a scalar


def test_finite_difference_grad_accepts_python_numbers():
    z = torch.tensor([0.5, -1.0], dtype=torch.float64)
    g = toy.finite_difference_grad(lambda v: float((v ** 3).sum()), z)
    assert torch.allclose(g, 3 * z ** 2, atol=1e-8)


def test_selection_fraction_zero_selects_nothing():
    "Clip-Cov / KL-Cov with a selection fraction of 0 are switched off: no token selected, the plain loss."
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)[:, None].expand(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    loss, sel = cv.clip_cov_loss(logp, old, adv, mask, clip_ratio=0.0, cov_lb=-10, cov_ub=10)
    r = torch.exp(logp - old)
    assert not sel.any()
    torch.testing.assert_close(loss, -torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv))
    loss, sel = cv.kl_cov_loss(logp, old, adv, mask, k=0.0)
    assert not sel.any()
    torch.testing.assert_close(loss, -adv * r)
