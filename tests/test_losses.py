"""Bad-input sweeps and registry-wide properties for entropy_rl.losses / ratios / advantages.

Every registered loss is run on the same small random batch; what must hold for all of them:
finite loss and gradients, masked positions ignored (even NaN/inf there), all-zero mask -> 0 with
zero gradients, clear errors for bad shapes / NaN at valid positions / unknown options.
"""
import math

import pytest
import torch

from entropy_rl.advantages import group_advantages, overlong_penalty, dynamic_sampling_mask
from entropy_rl.losses import AGGREGATIONS, list_losses, loss_options, policy_loss
from entropy_rl.ratios import token_segment_ids

B, T = 4, 6


def batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    cur = old + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)
    mask = torch.arange(T)[None] < torch.tensor([6, 1, 3, 5])[:, None]
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1]), 4).to(dtype)
    ent = torch.rand(B, T, generator=g, dtype=dtype)
    return cur, old, adv, mask, ent


def extra(name, mask):
    "What loss `name` declares it needs besides entropy: segment ids, a generator, per-token quantities (in inputs=)."
    from entropy_rl.losses import loss_needs
    kw, need = {}, loss_needs(name) - {"entropy", "old_entropy"}
    if "segment_ids" in need:
        kw["segment_ids"] = token_segment_ids(mask)
    if "generator" in need:
        kw["generator"] = torch.Generator().manual_seed(0)
    rest = sorted(need - {"segment_ids", "generator"})
    if rest:       # per-token quantities: a plausible log-prob-like value; current-policy ones as leaves with gradient
        from entropy_rl.registry import QUANTITIES
        kw["inputs"] = {n: torch.full(tuple(mask.shape), -1.0, dtype=torch.float64,
                                      requires_grad=bool(QUANTITIES.get(n).meta.get("grad"))) for n in rest}
    return kw


NAMES = list_losses()


def test_required_names_registered():
    assert {"grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "sspo"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_finite_and_masked_garbage_ignored(name, agg):
    cur, old, adv, mask, ent = batch()
    cur, old = cur.clone(), old.clone()
    cur[~mask] = float("nan")
    old[~mask] = float("inf")
    ent[~mask] = float("nan")
    x = cur.clone().requires_grad_()
    loss, met = policy_loss(name, x, old, adv, mask, aggregation=agg, entropy=ent,
                            entropy_coef=0.01, top_entropy_frac=0.5, **extra(name, mask))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
    assert met["n_tokens"] == int(mask.sum())
    assert met["n_loss_tokens"] == math.ceil(0.5 * int(mask.sum()))
    assert all(isinstance(v, (int, float)) for v in met.values())


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_mask_gives_zero_with_grad(name):
    cur, old, adv, mask, ent = batch()
    mask = torch.zeros(B, T, dtype=torch.bool)
    x = cur.clone().requires_grad_()
    loss, met = policy_loss(name, x, old, adv, mask, **extra(name, mask))
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()
    assert met["n_tokens"] == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", ["logp", "old_logp", "advantages", "entropy"])
def test_nan_at_valid_position_is_an_error(name, which):
    cur, old, adv, mask, ent = batch()
    tensors = dict(logp=cur.clone(), old_logp=old.clone(), advantages=adv.clone(), entropy=ent.clone())
    if which == "advantages":
        tensors[which][0] = float("nan")
    else:
        tensors[which][0, 0] = float("nan")
    with pytest.raises(ValueError, match=which):
        policy_loss(name, tensors["logp"], tensors["old_logp"], tensors["advantages"], mask,
                    entropy=tensors["entropy"], **extra(name, mask))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_lists_valid_ones(name):
    cur, old, adv, mask, _ = batch()
    with pytest.raises(TypeError) as e:
        policy_loss(name, cur, old, adv, mask, not_an_option=1)
    for opt in loss_options(name):
        assert opt in str(e.value)


@pytest.mark.parametrize("bad", ["old_short", "mask_short", "adv_wrong", "logp_1d", "int_logp", "empty"])
def test_shape_and_dtype_errors(bad):
    cur, old, adv, mask, _ = batch()
    args = dict(logp=cur, old_logp=old, advantages=adv, mask=mask)
    if bad == "old_short":
        args["old_logp"] = old[:, :3]
    elif bad == "mask_short":
        args["mask"] = mask[:3]
    elif bad == "adv_wrong":
        args["advantages"] = adv[:2]
    elif bad == "logp_1d":
        args["logp"] = cur[0]
    elif bad == "int_logp":
        args["logp"] = cur.long()
    elif bad == "empty":
        args = dict(logp=cur[:0], old_logp=old[:0], advantages=adv[:0], mask=mask[:0])
    with pytest.raises((ValueError, TypeError)):
        policy_loss("grpo", **args)


def test_unknown_name_lists_all():
    cur, old, adv, mask, _ = batch()
    with pytest.raises(ValueError) as e:
        policy_loss("nope", cur, old, adv, mask)
    for n in NAMES:
        assert n in str(e.value)


def test_float32_inputs_work():
    cur, old, adv, mask, ent = batch(dtype=torch.float32)
    x = cur.clone().requires_grad_()
    loss, _ = policy_loss("dapo", x, old, adv, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_on_policy_grpo_gradient_is_minus_advantage_weighted():
    # on-policy (logp == old_logp): every ratio is 1, nothing is clipped, d loss / d logp = -A / (|o_i| B')
    cur, _, adv, mask, _ = batch()
    x = cur.clone().requires_grad_()
    loss, met = policy_loss("grpo", x, cur.detach(), adv, mask)
    loss.backward()
    n = mask.sum(1, keepdim=True).double()
    assert met["clip/frac"] == 0.0
    torch.testing.assert_close(x.grad, torch.where(mask, -adv[:, None] / (n * B), torch.zeros(()).double()))


def test_advantage_helpers_bad_input():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(7), 4)
    with pytest.raises(ValueError):
        dynamic_sampling_mask(torch.ones(3, 2), 2)
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), 10, 20)


def test_half_precision_logp_computed_in_float32():
    cur, old, adv, mask, _ = batch(dtype=torch.float32)
    x = cur.to(torch.bfloat16).requires_grad_()
    loss, _ = policy_loss("grpo", x, old.to(torch.bfloat16), adv, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
