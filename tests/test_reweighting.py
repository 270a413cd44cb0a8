"Bad input, scope and sweep tests of entropy_rl.reweighting (STEER, EMPG, HAPO), and one training step of each entry on the tiny model."
import math

import pytest
import torch

import entropy_rl.reweighting as rw
from entropy_rl.advantages import ADVANTAGES
from entropy_rl.losses import check_loss_options, policy_loss
from entropy_rl.ratios import token_segment_ids
from entropy_rl.toy import finite_difference_grad
from entropy_rl.trainer import TrainConfig, train
from test_trainer import TINY, odd_length      # the tiny-model settings and stand-in verifier of the trainer's tests

D = torch.float64


def _batch(seed=0, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log(torch.rand(B, T, generator=g, dtype=D) * 0.9 + 0.05)
    olp = lp + torch.randn(B, T, generator=g, dtype=D) * 0.3
    H = torch.rand(B, T, generator=g, dtype=D) * 2 + 0.01
    adv = torch.randn(B, generator=g, dtype=D)
    m = torch.rand(B, T, generator=g) > 0.2
    m[:, 0] = True
    return lp, olp, H, adv, m


# ---- the lab helper ---------------------------------------------------------------------------------------------
def test_sampled_step_entropy_change_refuses_bad_input():
    z = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match="logits"):
        rw.sampled_step_entropy_change(z[0], torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    with pytest.raises(ValueError, match="actions"):
        rw.sampled_step_entropy_change(z, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match="lie in"):
        rw.sampled_step_entropy_change(z, torch.full((2, 1), 3), torch.ones(2, 1))
    with pytest.raises(ValueError, match="weights"):
        rw.sampled_step_entropy_change(z, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 2))


# ---- STEER ----------------------------------------------------------------------------------------------------------
def test_steer_omega_refuses_bad_input_and_ignores_masked_nan():
    lp, olp, H, adv, m = _batch()
    with pytest.raises(ValueError, match="old_entropy"):
        rw.steer_omega(lp, olp, adv, H[:, :4], m)
    with pytest.raises(ValueError, match="NaN"):
        rw.steer_omega(lp, olp, adv, torch.full_like(H, float("nan")), m)
    with pytest.raises(TypeError, match="floating"):
        rw.steer_omega(lp, olp, adv, H.long(), m)
    Hn = H.masked_fill(~m, float("nan"))
    torch.testing.assert_close(rw.steer_omega(lp, olp, adv, Hn, m), rw.steer_omega(lp, olp, adv, H, m))


@pytest.mark.parametrize("bad, words", [(dict(mode="soft"), "mode"), (dict(w_min=0.0), "0 < w_min"),
                                        (dict(w_min=0.9, w_max=0.8, mode="linear"), "w_min <= w_max"),
                                        (dict(w_max=1.2), "exp mode"), (dict(w_min=1.1, w_max=1.1), "exp mode"),
                                        (dict(reading="paper"), "reading must be one of")])
def test_steer_bad_options_are_refused_at_config_time(bad, words):
    with pytest.raises(ValueError, match=words):
        check_loss_options("steer", bad)


def test_steer_weights_sweep_lie_in_range_and_fall_with_magnitude():
    for seed in range(10):
        lp, olp, H, adv, m = _batch(seed)
        om = rw.steer_omega(lp, olp, adv, H, m)
        for mode, lo, hi in (("exp", 0.8, 1.0), ("linear", 0.8, 1.2), ("linear", 0.95, 1.05)):
            w = rw.steer_weights(om, m, mode=mode, w_min=lo, w_max=hi)
            assert (w[m] >= lo - 1e-12).all() and (w[m] <= hi + 1e-12).all()
            mag, wv = om[m].abs(), w[m]
            order = mag.argsort()
            assert (wv[order].diff() <= 1e-12).all()                                # larger |Ω| never weighs more
            assert abs(wv[mag.argmax()].item() - lo) < 1e-12 or (mode == "exp" and mag.max() < 0.02)
    assert (rw.steer_weights(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)) == 1).all()   # nothing valid


def test_steer_weights_are_taken_over_the_loss_call():
    "Micro-batch scope: splitting the rows into two calls changes the weights, hence the loss, unless |Ω| extremes agree."
    lp, olp, H, adv, m = _batch(3)
    whole, _ = policy_loss("steer", lp, olp, adv, m, old_entropy=H, aggregation="seq-mean-token-sum")
    a, _ = policy_loss("steer", lp[:1], olp[:1], adv[:1], m[:1], old_entropy=H[:1], aggregation="seq-mean-token-sum")
    b, _ = policy_loss("steer", lp[1:], olp[1:], adv[1:], m[1:], old_entropy=H[1:], aggregation="seq-mean-token-sum")
    assert abs(whole.item() - (a.item() * 1 + b.item() * 2) / 3) > 1e-6


def test_steer_uses_old_entropy_when_given_and_the_loss_entropy_otherwise():
    lp, olp, H, adv, m = _batch(1)
    a, ma = policy_loss("steer", lp, olp, adv, m, entropy=H)
    b, mb = policy_loss("steer", lp, olp, adv, m, entropy=H * 3, old_entropy=H)
    assert abs(a.item() - b.item()) < 1e-12
    assert ma["steer/old_entropy_given"] == 0.0 and mb["steer/old_entropy_given"] == 1.0
    with pytest.raises(ValueError, match="old-policy entropy"):
        policy_loss("steer", lp, olp, adv, m)


def test_steer_gradient_matches_finite_differences():
    lp, olp, H, adv, m = _batch(5)
    x = lp.clone().requires_grad_(True)
    loss, _ = policy_loss("steer", x, olp, adv, m, old_entropy=H)
    loss.backward()
    # the weights are held fixed (sg[w]): differentiate the loss with w frozen at their value
    w = rw.steer_weights(rw.steer_omega(lp, olp, adv, H, m), m)
    def f(y):
        return policy_loss("dapo", y, olp, adv, m, dual_clip=10.0, token_weights=w)[0]
    torch.testing.assert_close(x.grad, finite_difference_grad(f, lp, 1e-6), atol=1e-7, rtol=1e-5)
    assert (x.grad[~m] == 0).all()


# ---- EMPG -----------------------------------------------------------------------------------------------------------
def test_empg_refuses_bad_input():
    H = torch.rand(2, 3, dtype=D); m = torch.ones(2, 3, dtype=torch.bool); a = torch.ones(2, dtype=D)
    with pytest.raises(ValueError, match="segment_ids"):
        rw.empg_advantages(a, H, m, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=">= 0 on valid"):
        rw.empg_advantages(a, H, m, torch.full((2, 3), -1))
    with pytest.raises(ValueError, match="zeta"):
        rw.empg_advantages(a, H, m, token_segment_ids(m), zeta=-0.1)
    with pytest.raises(ValueError, match="NaN"):
        rw.empg_advantages(a, H.masked_fill(m, float("nan")), m, token_segment_ids(m))
    with pytest.raises(ValueError, match="k_f"):
        ADVANTAGES.resolve("empg_token", {"k_f": float("inf")})
    z = rw.empg_advantages(a, H, torch.zeros(2, 3, dtype=torch.bool), torch.full((2, 3), -1))
    assert (z == 0).all()


def test_empg_sweep_factors_average_one_and_masked_tokens_do_not_count():
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        H = torch.rand(4, 7, generator=g, dtype=D)
        m = torch.rand(4, 7, generator=g) > 0.3
        m[:, 0] = True
        seg = token_segment_ids(m)
        gA = rw.empg_advantages(torch.ones(4, dtype=D), H, m, seg, zeta=0.0)
        assert abs(gA[m].mean().item() - 1) < 1e-6                               # g averages 1 over the steps
        noisy = H.masked_fill(~m, 1e3)
        torch.testing.assert_close(rw.empg_advantages(torch.ones(4, dtype=D), noisy, m, seg), rw.empg_advantages(torch.ones(4, dtype=D), H, m, seg))
        zm = rw.empg_advantages(torch.randn(4, generator=g, dtype=D), H, m, seg, zero_mean=True)
        assert abs(zm[m].mean().item()) < 1e-9                                     # token reading: steps = tokens


# ---- HAPO -----------------------------------------------------------------------------------------------------------
def test_hapo_h_edge_cases():
    m = torch.ones(1, 4, dtype=torch.bool)
    assert (rw.hapo_normalized_entropy(torch.full((1, 4), 0.7), m) == 0).all()      # all equal: s = 0
    assert rw.hapo_normalized_entropy(torch.tensor([[0.3]]), torch.ones(1, 1)).item() == 0.0
    h = rw.hapo_normalized_entropy(torch.tensor([[0.1, 0.2, 0.3, 5.0]]), m, reading="paper")
    assert h.min().item() == -1.0 and h.max().item() == 1.0
    with pytest.raises(ValueError, match="entropy_pivot"):
        rw.hapo_normalized_entropy(torch.ones(1, 4), m, pivot=1.5)
    with pytest.raises(ValueError, match="NaN"):
        rw.hapo_normalized_entropy(torch.full((1, 4), float("inf")), m)


@pytest.mark.parametrize("bad, words", [(dict(reading="intent"), "reading"), (dict(entropy_pivot=-0.1), "entropy_pivot"),
                                        (dict(clip_alpha=-1.0), "clip_alpha"), (dict(dual_clip=1.0), "dual_clip"),
                                        (dict(clip_low=1.0), "clip_low")])
def test_hapo_bad_options_are_refused_at_config_time(bad, words):
    with pytest.raises(ValueError, match=words):
        check_loss_options("hapo", bad)


@pytest.mark.parametrize("reading", ["code", "paper"])
def test_hapo_gradient_matches_finite_differences(reading):
    lp, olp, H, adv, m = _batch(7)
    x = lp.clone().requires_grad_(True)
    loss, _ = policy_loss("hapo", x, olp, adv, m, entropy=H, reading=reading)
    loss.backward()
    # ĥ, the widths and the differential advantage are no-grad and depend on r only through the band: away from
    # the band's edges a central difference sees them fixed
    f = lambda y: policy_loss("hapo", y, olp, adv, m, entropy=H, reading=reading)[0]
    torch.testing.assert_close(x.grad, finite_difference_grad(f, lp, 1e-7), atol=1e-6, rtol=1e-5)


# ---- one training step on the tiny model ------------------------------------------------------------------------------
@pytest.mark.parametrize("algo, options", [("steer", {}), ("steer", {"mode": "linear", "w_min": 0.8, "w_max": 1.2}),
                                           ("steer", {"reading": "first_order"}), ("hapo", {}), ("hapo", {"reading": "paper"})])
def test_losses_train_one_step(tmp_path, algo, options):
    res = train(steps=1, output_dir=str(tmp_path / algo), **{**TINY, "minibatches": 2}, algo=algo,
                loss_options=options, reward_fn=odd_length)
    m = res.metrics[0]
    assert m["grad_norm"] > 0 and m["loss"] == m["loss"]
    key = "steer/w_mean" if algo == "steer" else "hapo/h_mean"
    assert key in m and math.isfinite(m[key])


@pytest.mark.parametrize("advantage, algo", [("empg_token", "grpo"), ("empg_segment", "sspo")])
def test_empg_trains_one_step(tmp_path, advantage, algo):
    "empg_segment reads the batch's segment ids, which the trainer computes when a stage declares them (here the sspo loss)."
    res = train(steps=1, output_dir=str(tmp_path / advantage), **TINY, algo=algo, advantage=advantage, reward_fn=odd_length)
    assert res.metrics[0]["grad_norm"] > 0
    assert "entropy" in TrainConfig(**{**TINY, "advantage": advantage}).needs()["advantage"]


def test_hapo_h_is_taken_over_the_loss_call():
    "Micro-batch scope: ĥ of a token depends on which tokens share its loss call."
    H = torch.tensor([[0.05, 0.1, 0.2], [0.5, 1.0, 2.0]], dtype=D)
    m = torch.ones(2, 3, dtype=torch.bool)
    whole = rw.hapo_normalized_entropy(H, m)
    alone = rw.hapo_normalized_entropy(H[:1], m[:1])
    assert not torch.allclose(whole[:1], alone)
    lp, olp, _, adv, _ = _batch(2, B=2, T=3)
    a = policy_loss("hapo", lp, olp, adv, m, entropy=H, aggregation="seq-mean-token-sum")[0]
    b = sum(policy_loss("hapo", lp[i:i + 1], olp[i:i + 1], adv[i:i + 1], m[i:i + 1], entropy=H[i:i + 1],
                        aggregation="seq-mean-token-sum")[0] for i in range(2)) / 2
    assert abs(a.item() - b.item()) > 1e-6


def test_steer_old_entropy_is_a_tensor_input_not_a_setting():
    with pytest.raises(ValueError, match="tensors the trainer computes per step"):
        check_loss_options("steer", {"old_entropy": 1.0})
    lp, olp, H, adv, m = _batch(4)
    with pytest.raises(ValueError, match="per-call input"):
        policy_loss("steer", lp, olp, adv, m, old_entropy=H[:, :2])


# ---- STEER's first-order reading: the π² term from the hidden states ----------------------------------------------------
def test_steer_pi2_term_from_the_trainer_matches_full_float64_logits(tmp_path):
    "The old-policy pass computes steer_pi2_term chunked; against Σ π²(log π + H) of the model's own full logits in float64."
    from entropy_rl.trainer import Trainer, _response_hidden
    t = Trainer(dict(TINY, algo="steer", loss_options={"reading": "first_order"}, steps=1, output_dir=str(tmp_path)),
                reward_fn=odd_length)
    assert t.quantities == {"steer_pi2_term": {"chunk_size": 256}}
    t0 = {k: v.clone() for k, v in t.unwrapped.state_dict().items()}
    captured, orig = {}, t._quantities
    t._quantities = lambda batch, names, chunks: captured.setdefault("q", (batch, orig(batch, names, chunks)))[1]
    m = t.train().metrics[0]
    batch, q = captured["q"]
    t.unwrapped.load_state_dict(t0)
    with torch.no_grad():
        h = _response_hidden(t.unwrapped, batch.ids, batch.attn, batch.mask.shape[1]).double()
        P = torch.softmax(h @ t.unwrapped.get_output_embeddings().weight.double().T, -1)
        H = -(P * P.log()).sum(-1, keepdim=True)
        want = torch.where(batch.mask, (P * P * (P.log() + H)).sum(-1), 0.0)
    torch.testing.assert_close(q["steer_pi2_term"].double(), want, atol=1e-6, rtol=1e-5)
    assert m["grad_norm"] > 0 and math.isfinite(m["steer/w_mean"])


def test_steer_first_order_loss_against_a_naive_float64_form():
    "Weights from |Ω_fo| (exp mode) of the call's valid tokens; loss and gradient against a token-by-token float64 form."
    g = torch.Generator().manual_seed(7)
    Z = torch.randn(2, 4, 6, generator=g, dtype=D)                  # old-policy logits at 8 positions over 6 actions
    y = torch.randint(0, 6, (2, 4), generator=g)
    P = torch.softmax(Z, -1)
    olp = P.log().gather(-1, y[..., None])[..., 0]
    H = -(P * P.log()).sum(-1)
    pi2 = rw.steer_pi2_rows(Z)
    lp = (olp + 0.1 * torch.randn(2, 4, generator=g, dtype=D)).requires_grad_()
    adv = torch.tensor([1.0, -0.5], dtype=D)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, met = policy_loss("steer", lp, olp, adv, m, old_entropy=H, reading="first_order", steer_pi2_term=pi2)
    om = {}
    for b in range(2):
        for t in range(4):
            if m[b, t]:
                r = math.exp(lp[b, t].item() - olp[b, t].item())
                om[b, t] = abs(rw.steer_first_order(P[b, t], int(y[b, t]), adv[b].item(), r))
    k = -math.log(0.8) / max(max(om.values()), 0.02)
    total = 0.0
    for (b, t), o in om.items():
        ratio, a = torch.exp(lp[b, t] - olp[b, t]), adv[b].item()
        surr = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        if a < 0:
            surr = torch.minimum(surr, torch.tensor(-a * 10.0, dtype=D))
        total = total + min(max(math.exp(-k * o), 0.8), 1.0) * surr
    naive = total / len(om)
    assert abs(loss.item() - naive.item()) < 1e-12
    g1, = torch.autograd.grad(loss, lp)
    g2, = torch.autograd.grad(naive, lp)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)
    assert (g1[~m] == 0).all()
    code = policy_loss("steer", lp, olp, adv, m, old_entropy=H)[1]
    assert code["steer/w_mean"] != met["steer/w_mean"]              # the two readings weigh differently
    with pytest.raises(ValueError, match="steer_pi2_term"):
        policy_loss("steer", lp, olp, adv, m, old_entropy=H, reading="first_order")
