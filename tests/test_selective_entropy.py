"""entropy_rl.selective_entropy: the row-chunked quantities (values, gradients, dtypes, peak memory), SIREN, Lp-Reg and
SPINE's band against naive float64 forms, masked positions, bad options, and one training step on the tiny model."""
import json
import math
import os
import subprocess
import sys

import pytest
from memory_child import run_child
import torch

import entropy_rl.selective_entropy as se
from entropy_rl.losses import LOSSES, REGULARIZERS, check_loss_options, policy_loss
from entropy_rl.registry import QUANTITIES

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def case(n=29, d=12, v=200, seed=0, dtype=F64, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = (2 * torch.randn(n, d, generator=g, dtype=F64)).to(dtype)
    w = (0.7 * torch.randn(v, d, generator=g, dtype=F64)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


# ------------------------------------------------------------------------------------- quantities
def naive_nucleus(h, w, y, t, top_p, top_k):
    "Materialised float64 reference: full logits, explicit sort, strict cumulative rule, renormalised entropy."
    z = (h.double() @ w.double().T) / t
    lp = torch.log_softmax(z, -1)
    out = []
    for i in range(z.shape[0]):
        p, order = lp[i].exp().sort(descending=True)
        p, order = p[:top_k], order[:top_k]
        keep = p.cumsum(0) < top_p if top_p < 1 else torch.ones_like(p, dtype=torch.bool)   # p = 1: all (documented)
        keep[0] = True                                   # one token: entropy 0, the empty nucleus's value
        zk = z[i][order[keep]]
        q = torch.softmax(zk, 0)
        out.append(-(q * torch.log_softmax(zk, 0)).sum())
    return torch.where(y != -100, torch.stack(out), torch.zeros((), dtype=F64))


@pytest.mark.parametrize("top_p,top_k", [(0.8, 10_000), (0.5, 7), (0.95, 50), (1.0, 10_000)])
def test_nucleus_head_matches_naive_values_and_gradients(top_p, top_k):
    h, w, y = case()
    a = torch.randn(len(y), generator=torch.Generator().manual_seed(5), dtype=F64)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = se.nucleus_entropy_head(h1, w1, y, 1.3, top_p=top_p, top_k=top_k, chunk_size=6)
    (got * a).sum().backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = naive_nucleus(h2, w2, y, 1.3, top_p, top_k)
    (ref * a).sum().backward()
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert torch.allclose(h1.grad, h2.grad, rtol=0, atol=1e-11) and torch.allclose(w1.grad, w2.grad, rtol=0, atol=1e-11)
    assert (h1.grad[y == -100] == 0).all() and (got[y == -100] == 0).all()


def test_proxy_head_matches_naive_and_filter_before_temperature():
    h, w, y = case(v=60)
    t, kappa = 0.6, 0.05
    z = h @ w.T
    p = torch.softmax(z, -1)                             # the filter reads the T = 1 probabilities
    zf = torch.where(p < kappa * p.max(-1, keepdim=True).values, torch.full_like(z, -1e4), z)
    ref = torch.log_softmax(zf / t, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    ref = torch.where(y != -100, ref, torch.zeros((), dtype=F64))
    for c in (1, 5, 100):
        assert torch.allclose(se.proxy_logp_head(h, w, y, t, min_p=kappa, chunk_size=c), ref, atol=1e-12)
    with torch.no_grad():
        out = se.proxy_logp_head(h, w, y, t, min_p=kappa)
    assert not out.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantities_accumulate_in_fp32(dtype):
    h, w, y = case(dtype=dtype)
    H = se.nucleus_entropy_head(h, w, y)
    q = se.proxy_logp_head(h, w, y)
    assert H.dtype == q.dtype == torch.float32
    assert torch.allclose(H.double(), naive_nucleus(h, w, y, 1.0, 0.8, 10_000), atol=1e-4)


def test_bf16_gradients_reach_the_weight_through_its_fp32_copy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 8, generator=g).bfloat16().requires_grad_()
    w = (0.5 * torch.randn(50, 8, generator=g)).bfloat16().requires_grad_()
    y = torch.randint(0, 50, (20,), generator=g)
    for head in (se.nucleus_entropy_head, se.proxy_kl_head):
        h.grad = w.grad = None
        head(h, w, y, chunk_size=3).sum().backward()
        h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        head(h2, w2, y, chunk_size=100).sum().backward()
        assert h.grad.dtype == w.grad.dtype == torch.bfloat16
        for a, b in ((h.grad, h2.grad), (w.grad, w2.grad)):
            assert (a.double() - b).abs().max() <= 1e-2 * b.abs().max(), (a, b)   # bf16 rounding of the gradient


def test_quantity_heads_refuse_bad_input_before_work():
    h, w, y = case()
    for kw, err, msg in [(dict(top_p=0.0), ValueError, "top_p"), (dict(top_k=0), ValueError, "top_k"),
                         (dict(chunk_size=0), ValueError, "chunk_size"), (dict(chunk_size=2.5), ValueError, "chunk_size")]:
        with pytest.raises(err, match=msg):
            se.nucleus_entropy_head(h, w, y, **kw)
    with pytest.raises(ValueError, match="min_p"):
        se.proxy_logp_head(h, w, y, min_p=1.0)
    with pytest.raises(ValueError, match="min_p"):
        se.proxy_logp_head(h, w, y, min_p=-0.1)
    with pytest.raises(ValueError, match=r"hidden must be \[N, D\]"):
        se.nucleus_entropy_head(h[None], w, y)
    with pytest.raises(ValueError, match="labels must lie"):
        se.proxy_logp_head(h, w, y.clamp(min=0) + 1000)
    with pytest.raises(ValueError, match="temperature"):
        se.nucleus_entropy_head(h, w, y, 0.0)
    assert se.nucleus_entropy_head(h[:0], w, y[:0]).shape == (0,)


def test_quantities_registered_with_options():
    assert {"nucleus_entropy", "proxy_logp"} <= set(QUANTITIES.names())
    assert QUANTITIES.options("nucleus_entropy") == {"top_p": 0.8, "top_k": 10_000, "chunk_size": 256}
    assert QUANTITIES.options("proxy_logp") == {"min_p": 0.02, "chunk_size": 256}
    h, w, y = case()
    e = QUANTITIES.get("proxy_logp")
    assert torch.equal(e.fn(h, w, y, 1.0, **QUANTITIES.resolve("proxy_logp", {"min_p": 0.1})),
                       se.proxy_logp_head(h, w, y, min_p=0.1))


# ------------------------------------------------------------------------------------------ memory
_MEMORY_CHILD = """
from entropy_rl.selective_entropy import nucleus_entropy_head, proxy_logp_head, proxy_kl_head
def fwd_bwd(fn, rows=n):
    fn(h[:rows], w, y[:rows], chunk_size=64).sum().backward()   # nucleus: default top_p, top_k = 10,000
    h.grad = w.grad = None
def no_grad(fn, rows=n):
    with torch.no_grad():
        return fn(h[:rows], w, y[:rows], chunk_size=64)
def naive():
    with torch.no_grad():
        return torch.log_softmax(h @ w.T, -1)[:, 0]
fwd_bwd(nucleus_entropy_head, 128); fwd_bwd(proxy_kl_head, 128); no_grad(proxy_logp_head, 128)   # warm-up
out = [cpu_peak_memory_mb(fwd_bwd, nucleus_entropy_head)[0], cpu_peak_memory_mb(fwd_bwd, proxy_kl_head)[0],
       cpu_peak_memory_mb(no_grad, proxy_logp_head)[0], cpu_peak_memory_mb(naive)[0]]
print(json.dumps(out))
"""


def test_quantities_peak_memory_far_below_logits():
    # N = 2048, V = 32768: the fp32 logits alone take 256 MiB. Measured: forward + backward of the nucleus-entropy and
    # proxy-KL heads under grad (each forward is the no-grad pass plus saved inputs), the proxy log-prob's no-grad pass. Fresh process whose allocator returns freed blocks to
    # the OS (MALLOC_MMAP_THRESHOLD_), so the resident-size peak shows what the heads hold (as tests/test_kernels.py).
    logits_mb = 2048 * 32768 * 4 / 2**20
    res = run_child(_MEMORY_CHILD, 2048)
    grad_mb, kl_grad_mb, proxy_mb, naive_mb = res
    assert naive_mb > logits_mb, (naive_mb, logits_mb)          # the meter sees the logits when they exist
    assert proxy_mb < logits_mb / 8, res
    # forward + backward hold w.grad and the dW accumulator ([V, D]: 8 MiB each) and a few [64, V] blocks (8 MiB each:
    # logits, their exp, the top-k gradient scattered back); measured ≈ 52 MiB against 256 MiB of logits
    assert grad_mb < logits_mb / 4 and kl_grad_mb < logits_mb / 4, res


# -------------------------------------------------------------------------------------------- SIREN
def siren_case(seed=0, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    H = 2 * torch.rand(B, T, generator=g, dtype=F64)
    M = torch.ones(B, T, dtype=torch.bool)
    M[1, 7:] = False
    M[2, 3:] = False
    return H, M


def naive_siren(H, M, anchor, ratio=0.8):
    "Loops: per response, numpy-style linear quantile of the valid values, strict cut, mean; mean over responses."
    per = []
    for i in range(H.shape[0]):
        v = H[i][M[i]]
        if len(v) == 0:
            continue
        s = v.detach().sort().values
        pos = ratio * (len(s) - 1)
        lo = int(math.floor(pos))
        q = s[lo] + (pos - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])
        kept = v[v.detach() > q]
        per.append(kept.mean() if len(kept) else v.sum() * 0)
    return (torch.stack(per).mean() - anchor) ** 2


def test_siren_term_and_gradient_against_naive_with_garbage_at_masked_positions():
    H, M = siren_case()
    Hg = H.masked_fill(~M, float("nan")).requires_grad_()
    lp = torch.full(H.shape, -1.0, dtype=F64)
    loss, met = policy_loss("grpo", lp, lp, torch.zeros(3, dtype=F64), M, regularizers={"siren": {"anchor": 0.7}},
                            inputs={"nucleus_entropy": Hg})
    H2 = H.clone().requires_grad_()
    ref = 0.005 * naive_siren(H2, M, 0.7)
    assert abs(loss.item() - ref.item()) < 1e-14
    g1, = torch.autograd.grad(loss, Hg)
    g2, = torch.autograd.grad(ref, H2)
    assert torch.allclose(torch.where(M, g1, 0.0), torch.where(M, g2, 0.0), atol=1e-15)
    assert (g1[~M] == 0).all()


def test_siren_through_the_head_gradient_in_hidden():
    # the regulariser on Ĥ computed by the row-chunked head, against the whole thing materialised in float64
    h, w, _ = case(n=24, v=80, ignore_every=0)
    y = torch.zeros(24, dtype=torch.long)
    M = torch.ones(3, 8, dtype=torch.bool)
    M[2, 5:] = False
    lp = torch.full((3, 8), -1.0, dtype=F64, requires_grad=True)
    h1 = h.clone().requires_grad_()
    Hn = se.nucleus_entropy_head(h1, w, y, top_p=0.9, chunk_size=5).view(3, 8)
    loss, _ = policy_loss("grpo", lp, lp.detach(), torch.zeros(3, dtype=F64), M,
                          regularizers={"siren": {"anchor": 0.5, "coef": 1.0, "top_p": 0.9}}, inputs={"nucleus_entropy": Hn})
    loss.backward()
    h2 = h.clone().requires_grad_()
    ref = naive_siren(naive_nucleus(h2, w, y, 1.0, 0.9, 10_000).view(3, 8), M, 0.5)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-12 and torch.allclose(h1.grad, h2.grad, atol=1e-12)
    assert h1.grad.abs().sum() > 0


def test_siren_refuses_detached_entropy_and_bad_anchors():
    H, M = siren_case()
    lp = torch.full(H.shape, -1.0, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="WITH gradient"):
        policy_loss("grpo", lp, lp.detach(), torch.zeros(3, dtype=F64), M, regularizers={"siren": {"anchor": 1.0}},
                    inputs={"nucleus_entropy": H})
    with pytest.raises(ValueError, match="needs"):
        policy_loss("grpo", lp, lp.detach(), torch.zeros(3, dtype=F64), M, regularizers={"siren": {}},
                    inputs={"nucleus_entropy": H.requires_grad_()})
    with pytest.raises(ValueError, match="one number"):
        policy_loss("grpo", lp, lp.detach(), torch.zeros(3, dtype=F64), M, regularizers={"siren": {}},
                    inputs={"nucleus_entropy": H, "siren_anchor": torch.rand(3, 12, dtype=F64)})
    for bad, msg in [({"anchor": -1.0}, "anchor"), ({"anchor": float("inf")}, "anchor"), ({"anchor": "x"}, "anchor"),
                     ({"mask_ratio": 1.5}, "mask_ratio"), ({"top_p": 0.0}, "top_p"), ({"top_k": 0}, "top_k")]:
        with pytest.raises(ValueError, match=msg):
            REGULARIZERS.resolve("siren", bad)
    with pytest.raises(ValueError, match="siren anchor"):
        check_loss_options("grpo", {"regularizers": {"siren": {"anchor": -2.0}}})


def test_siren_config_dry_run_and_anchor_input():
    assert check_loss_options("grpo", {"regularizers": {"siren": {}}})["regularizers"] == {"siren": {}}
    H, M = siren_case()
    lp = torch.full(H.shape, -1.0, dtype=F64)
    a = se.siren_anchor(H, M)
    for anchor_input in (a, torch.full(H.shape, a, dtype=F64)):
        loss, met = policy_loss("grpo", lp, lp, torch.zeros(3, dtype=F64), M, regularizers={"siren": {}},
                                inputs={"nucleus_entropy": H, "siren_anchor": anchor_input})
        assert abs(loss.item()) < 1e-20 and met["siren/anchor"] == a       # at its own anchor: no term


def test_siren_peak_mask_edge_cases():
    H = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    M = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    S = se.siren_peak_mask(H, M)
    assert S.tolist() == [[False] * 4, [False, True, False, False], [False] * 4]  # ties: nothing strictly above
    # responses: (no kept -> 0), (2.0), and the empty row does not count: (0 + 2) / 2
    assert se.siren_mean(H, S, M).item() == 1.0


# ------------------------------------------------------------------------------------------- Lp-Reg
def test_lp_reg_spec_numbers_through_the_loss():
    # on-policy, the π_old example: 300 negatives at y = 3 (π = 0.015) and 100 at y = 0; ρ = 0.01 -> k = 4, all y = 3
    lp_row = torch.log(torch.tensor([0.6, 0.3, 0.08, 0.015], dtype=F64))
    lq_row = se.min_p_proxy_logprobs(torch.log(torch.tensor([0.6, 0.3, 0.08, 0.015, 0.005], dtype=F64)).expand(4, 5),
                                     torch.arange(4), 0.02)
    lp = lp_row[[3] * 300 + [0] * 100].view(4, 100).clone().requires_grad_()
    lq = lq_row[[3] * 300 + [0] * 100].view(4, 100)
    M = torch.ones(4, 100, dtype=torch.bool)
    loss, met = policy_loss("lp_reg", lp, lp.detach(), -torch.ones(4, dtype=F64), M, proxy_logp=lq)
    assert met["lp_reg/selected_frac"] == 4 / 400 and abs(met["lp_reg/pull_mean"] - 1.2584e-05) < 5e-9
    g, = torch.autograd.grad(loss, lp)
    # d/dlogp of [-A r + k3] = A... on-policy: r = 1, dr/dlogp = 1 -> 1 - 0.005025 on the 4 selected, 1 elsewhere
    sel = (g - 1 / 400).abs() > 1e-12
    assert int(sel.sum()) == 4 and torch.allclose(g[sel], torch.tensor((1 - 0.005025) / 400, dtype=F64), atol=1e-9)


def test_lp_reg_masked_positions_and_missing_proxy():
    g = torch.Generator().manual_seed(0)
    lp = -3 * torch.rand(2, 300, generator=g, dtype=F64)
    M = torch.ones(2, 300, dtype=torch.bool)
    M[1, 250:] = False
    q = lp + 0.5
    adv = torch.tensor([-1.0, -1.0], dtype=F64)
    a, ma = policy_loss("lp_reg", lp, lp, adv, M, proxy_logp=q)
    lp2 = lp.masked_fill(~M, -50.0)                       # masked: the smallest log-probs, must not be selected
    b, mb = policy_loss("lp_reg", lp2, lp2.masked_fill(~M, 3.0), adv, M, proxy_logp=q.masked_fill(~M, float("nan")))
    assert a.item() == b.item() and ma["lp_reg/selected_frac"] == mb["lp_reg/selected_frac"] > 0
    with pytest.raises(ValueError, match="proxy_logp"):
        policy_loss("lp_reg", lp, lp, adv, M)


def test_lp_reg_fullvocab_inputs_and_needs():
    g = torch.Generator().manual_seed(1)
    lp = (-3 * torch.rand(2, 300, generator=g, dtype=F64)).requires_grad_()
    M = torch.ones(2, 300, dtype=torch.bool)
    adv = torch.tensor([-1.0, 1.0], dtype=F64)
    kl = 0.1 * torch.rand(2, 300, generator=g, dtype=F64)
    with pytest.raises(ValueError, match="proxy_kl must carry gradient"):
        policy_loss("lp_reg_fullvocab", lp, lp.detach(), adv, M, proxy_logp=lp.detach() + 1, proxy_kl=kl)
    with pytest.raises(ValueError, match="proxy_kl"):
        policy_loss("lp_reg_fullvocab", lp, lp.detach(), adv, M, proxy_logp=lp.detach() + 1)
    klg = kl.clone().requires_grad_()
    loss, met = policy_loss("lp_reg_fullvocab", lp, lp.detach(), adv, M, proxy_logp=lp.detach() + 1, proxy_kl=klg)
    (gk,) = torch.autograd.grad(loss, klg)
    assert int((gk != 0).sum()) == 3 and (gk[1] == 0).all()      # N- = 300, rho = 0.01 -> 3 tokens of the negative row
    assert LOSSES.get("lp_reg_fullvocab").needs_for({}) == {"proxy_logp", "proxy_kl"}
    assert LOSSES.options("lp_reg_fullvocab")["min_p"] == LOSSES.options("lp_reg")["min_p"] == 0.02


def test_lp_reg_bad_options_refused():
    for bad, msg in [({"min_p": 1.0}, "min_p"), ({"rho": -0.1}, "rho"), ({"beta": -1.0}, "beta"),
                     ({"clip_low": 1.5}, "clip_low"), ({"clip_high": -1.0}, "clip_high"), ({"dual_clip": 1.0}, "dual_clip"),
                     ({"rho": "a"}, "rho")]:
        for name in ("lp_reg", "lp_reg_fullvocab"):
            with pytest.raises(ValueError, match=msg):
                check_loss_options(name, bad)


# --------------------------------------------------------------------------------------- SPINE band
def test_spine_band_against_naive_with_masked_garbage():
    g = torch.Generator().manual_seed(2)
    H = 3 * torch.rand(3, 20, generator=g, dtype=F64)
    M = torch.rand(3, 20, generator=g) > 0.3
    Hg = H.masked_fill(~M, 100.0).requires_grad_()
    lp = torch.full(H.shape, -1.0, dtype=F64)
    loss, met = policy_loss("grpo", lp, lp, torch.zeros(3, dtype=F64), M, entropy=Hg,
                            regularizers={"spine_band": {"coef": 1.0, "h_low": 1.0, "h_high": 2.2}})
    H2 = H.clone().requires_grad_()
    v = H2[M]
    q = torch.quantile(v.detach(), 0.8)
    f = v[v.detach() >= q]
    ref = ((1.0 - f).clamp(min=0) + (f - 2.2).clamp(min=0)).mean()
    assert abs(loss.item() - ref.item()) < 1e-14
    g1, = torch.autograd.grad(loss, Hg)
    g2, = torch.autograd.grad(ref, H2)
    assert torch.allclose(torch.where(M, g1, 0.0), g2, atol=1e-15) and (g1[~M] == 0).all()


def test_spine_band_bad_options():
    for bad, msg in [({"rho": 0.0}, "rho"), ({"h_low": 2.0, "h_high": 1.0}, "h_low"), ({"h_low": -1.0}, "h_low")]:
        with pytest.raises(ValueError, match=msg):
            REGULARIZERS.resolve("spine_band", bad)
    assert REGULARIZERS.get("spine_band").needs_for({}) == {"entropy"}


# ------------------------------------------------------------------------------ one step, tiny model
@pytest.mark.parametrize("algo", ["lp_reg", "lp_reg_fullvocab"])
def test_one_training_step_on_the_tiny_model(algo):
    from entropy_rl.models import tiny_model
    from entropy_rl.kernels import fused_logprob_entropy
    from entropy_rl.trainer import _response_hidden
    model, tok = tiny_model(seed=0)
    model.train()
    B, P, T = 4, 5, 6
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (B, P + T), generator=g)
    attn = torch.ones_like(ids)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    labels = ids[:, -T:].masked_fill(~mask, -100).reshape(-1)
    head = model.get_output_embeddings().weight
    with torch.no_grad():                                   # the old-policy pass: log-probs, Ĥ_old, the proxy
        hid = _response_hidden(model, ids, attn, T).reshape(B * T, -1)
        old_lp, _ = fused_logprob_entropy(hid, head, labels)
        H_old = se.nucleus_entropy_head(hid, head, labels, top_p=0.8).view(B, T)
        proxy = se.proxy_logp_head(hid, head, labels, min_p=0.3).view(B, T)   # a flat random model: filter enough to matter
    anchor = se.siren_anchor(H_old, mask) + 0.3            # off its anchor, so the term has a gradient
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = head.detach().clone()
    hid = _response_hidden(model, ids, attn, T).reshape(B * T, -1)
    lp, H = fused_logprob_entropy(hid, head, labels)
    Hn = se.nucleus_entropy_head(hid, head, labels, top_p=0.8).view(B, T)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    extra = {"proxy_kl": se.proxy_kl_head(hid, head, labels, min_p=0.3).view(B, T)} if algo == "lp_reg_fullvocab" else {}
    loss, met = policy_loss(algo, lp.view(B, T), old_lp.view(B, T), adv, mask, proxy_logp=proxy, rho=0.5, min_p=0.3, **extra,
                            entropy=H.view(B, T), regularizers={"siren": {"coef": 1.0}, "spine_band": {}},
                            inputs={"nucleus_entropy": Hn, "siren_anchor": anchor})
    assert torch.isfinite(loss) and met["reg/siren"] > 0 and "spine/forking_frac" in met and met["lp_reg/selected_frac"] > 0
    loss.backward()
    opt.step()
    assert not torch.equal(before, head.detach())


# ------------------------------------------------------------------------------------------ ARES KL
def test_ares_kl_against_naive_with_masked_garbage_and_needs():
    g = torch.Generator().manual_seed(4)
    lp = (-2 * torch.rand(3, 9, generator=g, dtype=F64)).requires_grad_()
    ref = -2 * torch.rand(3, 9, generator=g, dtype=F64)
    M = torch.rand(3, 9, generator=g) > 0.3
    rate = torch.tensor([1.0, 0.5, 0.0], dtype=F64)[:, None].expand(3, 9)          # easy, medium, hard
    state = {**se.ares_kl_state(), "beta": {"easy": 2.0, "medium": 1.0, "hard": 0.5}}
    beta = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    loss, met = policy_loss("grpo", lp.masked_fill(~M, float("nan")), lp.detach(), torch.zeros(3, dtype=F64), M,
                            ref_logp=ref.masked_fill(~M, float("inf")), regularizers={"ares_kl": {"coef": 1.0}},
                            inputs={"group_pass_rate": rate}, states={"regularizers/ares_kl": state})
    d = ref - lp
    naive = (beta[:, None] * (d.exp() - d - 1).clamp(-10, 10) * M).sum(1) / M.sum(1)   # seq-mean-token-mean (grpo)
    naive = naive[M.any(1)].mean()
    assert abs(loss.item() - naive.item()) < 1e-14
    g1, = torch.autograd.grad(loss, lp)
    g2, = torch.autograd.grad(naive, lp)
    assert torch.allclose(g1, g2, atol=1e-15) and (g1[~M] == 0).all()
    seq = ((d.detach().exp() - d.detach() - 1) * M).sum(1) / M.sum(1)
    for i, b in enumerate(("easy", "medium", "hard")):                   # the controller's first call saw each sequence
        assert state["kl_ema"][b] == pytest.approx(seq[i].item(), abs=1e-15)
    assert REGULARIZERS.get("ares_kl").needs_for({}) == {"ref_logp", "group_pass_rate"}
    assert REGULARIZERS.get("ares_kl").has_state
    with pytest.raises(ValueError, match="group_pass_rate"):
        policy_loss("grpo", lp, lp.detach(), torch.zeros(3, dtype=F64), M, ref_logp=ref, regularizers={"ares_kl": {}})


@pytest.mark.parametrize("bad,msg", [({"target": 0.0}, "target > 0"), ({"beta_min": 2.0}, "beta_min <= beta_init"),
                                     ({"ema": 1.0}, "ema < 1"), ({"clip": 0.0}, "clip > 0"),
                                     ({"interval": 0}, "interval must be a positive int")])
def test_ares_kl_bad_options_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        REGULARIZERS.resolve("ares_kl", bad)


def test_ares_kl_trains_with_its_controller_as_stage_state(tmp_path):
    "interval=1: every micro-batch call counts, so β moves in two steps; the state is the trainer's, keyed by name."
    from entropy_rl.trainer import Trainer
    from test_trainer import TINY, odd_length
    t = Trainer(dict(TINY, steps=2, minibatches=2, output_dir=str(tmp_path), save_every=1,
                     regularizers={"ares_kl": {"coef": 0.5, "interval": 1, "deadzone": 0.0}}), reward_fn=odd_length)
    assert t.reference is not None and set(t.stage_states) == {"regularizers/ares_kl"}
    m = t.train().metrics
    s = t.stage_states["regularizers/ares_kl"]
    assert s["calls"] == 2 * 2                                    # steps x micro-batches
    seen = [b for b in se.ARES_BUCKETS if s["kl_ema"][b] is not None]
    assert seen and all(s["beta"][b] != 1.0 for b in seen)        # KL far from target: each seen bucket's β moved
    assert all(s["beta"][b] == 1.0 for b in se.ARES_BUCKETS if b not in seen)
    assert all(math.isfinite(r["reg/ares_kl"]) and r["grad_norm"] > 0 for r in m)
    assert m[-1]["ares/beta_hard"] == pytest.approx(s["beta"]["hard"], rel=0.1)


def test_ares_controller_bounds_interval_and_bad_input():
    s = se.ares_kl_state()
    for _ in range(12_000):     # a KL far above target: log β climbs 0.01 per counted call, capped at beta_max
        s = se.ares_kl_update(s, ["medium"], torch.tensor([10.0], dtype=F64), beta_max=3.0)
    assert s["beta"]["medium"] == pytest.approx(3.0) and s["beta"]["easy"] == 1.0 and s["calls"] == 12_000
    changes = []
    s = se.ares_kl_state()
    for _ in range(300):
        b = s["beta"]["easy"]
        s = se.ares_kl_update(s, ["easy"], torch.tensor([0.05], dtype=F64))
        changes.append(s["beta"]["easy"] != b)
    assert [i + 1 for i, c in enumerate(changes) if c] == [100, 200, 300]   # only every 100th call counts
    with pytest.raises(ValueError, match="difficulty labels"):
        se.ares_kl_update(s, ["easy"], torch.zeros(2))
    with pytest.raises(ValueError, match="groups of 4"):
        se.ares_difficulty(torch.ones(6), 4)
