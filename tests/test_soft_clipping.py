"""Chapter 16 (soft and asymmetric clipping): cispo, sapo, hapo_clip and entropy_balanced against naive float64
token-by-token forms (values and gradients), masked positions, micro-batch scope of the entropy statistics, the
region table over many settings, bad options and inputs refused with clear messages, and one training step each on
the tiny model."""
import math
import statistics

import pytest
import torch

import entropy_rl.soft_clipping as sc
from entropy_rl.losses import check_loss_options, loss_needs, policy_loss

f64 = torch.float64
NAMES = ("cispo", "sapo", "hapo_clip", "entropy_balanced")


def batch(seed=0, B=4, T=7, spread=0.6):
    "A float64 batch with ragged masks, ratios well outside any clip, per-token advantages of both signs."
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=f64) * 3 - 0.05
    lp = old + spread * torch.randn(B, T, generator=g, dtype=f64)
    adv = torch.randn(B, generator=g, dtype=f64)
    H = torch.rand(B, T, generator=g, dtype=f64) * 2 + 0.01
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, 2:] = False
    return lp, old, adv, H, mask


# ------------------------------------------------------------------------------ naive float64 references
def _valid(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def naive_token_loss(name, lp, old, adv, H, mask, **o):
    "Per-token loss {(b, t): scalar tensor} from the spec's formulas, one token at a time (lp may require grad)."
    idx = _valid(mask)
    stats = {}
    if name == "hapo_clip":
        ell = {i: math.log(max(H[i].item(), 1e-8)) for i in idx}
        srt = sorted(ell.values())
        mu = srt[round(o.get("entropy_pivot", 0.8) * (len(srt) - 1))]
        s = math.sqrt(sum((v - mu) ** 2 for v in ell.values()) / len(idx))
        h = {i: (ell[i] - mu) / s for i in idx}
        top = max([v for v in h.values() if v > 0], default=1.0)
        bot = min(v for v in h.values() if v <= 0)
        bot = bot if o.get("reading", "code") == "code" else abs(bot)
        stats = {i: (h[i] / top if h[i] > 0 else (h[i] / bot if bot != 0 else 0.0)) for i in idx}
    if name == "entropy_balanced":
        vals = [H[i].item() for i in idx]
        sd = statistics.stdev(vals) or 1.0
        stats = {i: (H[i].item() - statistics.fmean(vals)) / sd for i in idx}
    out = {}
    for i in idx:
        r = torch.exp((lp[i] - old[i]).clamp(-20, 20))
        a = adv[i[0]].item()
        if name == "cispo":
            el, eh = o.get("clip_low", 10.0), o.get("clip_high", 0.2)
            out[i] = -min(max(r.item(), 1 - el), 1 + eh) * a * lp[i]
        elif name == "sapo":
            tau = o.get("tau_pos", 1.0) if a > 0 else o.get("tau_neg", 1.05)
            out[i] = -a * 4 / tau * torch.sigmoid(tau * (r - 1))
        elif name == "hapo_clip":
            hh, al = stats[i], o.get("clip_alpha", 1.0)
            el = 0.2 * (1 - al * hh) if hh <= 0 else 0.2
            eh = 0.2 * (1 + al * hh) if hh > 0 else 0.2
            lo_, hi_ = 1 - el, 1 + eh
            ell_ = -torch.minimum(r * a, r.clamp(lo_, hi_) * a)
            out[i] = torch.minimum(ell_, torch.tensor(-a * 10.0, dtype=f64)) if a < 0 else ell_
        elif name == "entropy_balanced":
            el, eh, c = 0.2, 0.28, 3.0
            z = stats[i] if (o.get("reading", "code") == "code" or stats[i] > 0) else None
            at = a * (1 + 0.2 * stats[i])
            if r.item() > 1 + eh:                       # above the upper bound: value 1 + ε_h, gradient by choice
                clipped = (1 + eh) * r / r.detach() if z is not None else torch.tensor(1 + eh, dtype=f64)
            else:
                clipped = r.clamp(min=1 - el)
            ell_ = torch.maximum(-at * r, -at * clipped)
            out[i] = torch.minimum(ell_, torch.tensor(-at * c, dtype=f64)) if at < 0 else ell_
    return out


def naive_loss(name, lp, old, adv, H, mask, **o):
    "The aggregated naive loss: token-mean, or seq-mean-token-mean for sapo."
    per = naive_token_loss(name, lp, old, adv, H, mask, **o)
    if name == "sapo":
        rows = {}
        for (b, t), v in per.items():
            rows.setdefault(b, []).append(v)
        return sum(sum(v) / len(v) for v in rows.values()) / len(rows)
    return sum(per.values()) / len(per)


CASES = [("cispo", {}), ("cispo", {"clip_low": 0.2, "clip_high": 0.28}), ("sapo", {}),
         ("sapo", {"tau_pos": 2.0, "tau_neg": 0.5}), ("hapo_clip", {}), ("hapo_clip", {"reading": "paper"}),
         ("hapo_clip", {"clip_alpha": 2.5, "entropy_pivot": 0.3}), ("entropy_balanced", {}),
         ("entropy_balanced", {"reading": "paper"})]


@pytest.mark.parametrize("name,o", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_match_naive_float64_with_garbage_at_masked_positions(name, o, seed):
    lp, old, adv, H, mask = batch(seed)
    junk = lambda x, v: torch.where(mask, x, torch.full_like(x, v))
    lp1 = junk(lp, float("nan")).requires_grad_(True)
    loss, met = policy_loss(name, lp1, junk(old, 1e6), adv, mask, entropy=junk(H, 1e9), **o)
    loss.backward()
    lp2 = lp.clone().requires_grad_(True)
    ref = naive_loss(name, lp2, old, adv, H, mask, **o)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-12
    assert torch.allclose(torch.nan_to_num(lp1.grad), lp2.grad, atol=1e-12, rtol=0)
    assert (lp1.grad[~mask] == 0).all()
    assert all(math.isfinite(v) for v in met.values())


@pytest.mark.parametrize("name", NAMES)
def test_unchecked_path_equals_checked(name):
    "The trainer calls with check=False on a validated batch; same loss and gradient."
    lp, old, adv, H, mask = batch(3)
    zero = lambda x: torch.where(mask, x, torch.zeros_like(x))
    lp1, lp2 = zero(lp).requires_grad_(True), zero(lp).requires_grad_(True)
    a = zero(adv[:, None].expand_as(lp).clone())
    l1, _ = policy_loss(name, lp1, zero(old), adv, mask, entropy=H)
    l2, _ = policy_loss(name, lp2, zero(old), a, mask, entropy=zero(H), check=False)
    l1.backward(); l2.backward()
    assert abs(l1.item() - l2.item()) < 1e-12 and torch.allclose(lp1.grad, lp2.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_gives_zero_connected_to_the_graph(name):
    lp = torch.zeros(2, 3, dtype=f64, requires_grad=True)
    loss, met = policy_loss(name, lp, lp.detach(), torch.ones(2, dtype=f64), torch.zeros(2, 3), entropy=torch.ones(2, 3))
    loss.backward()
    assert loss.item() == 0 and met["n_tokens"] == 0 and (lp.grad == 0).all()


@pytest.mark.parametrize("name", ["cispo", "sapo", "hapo_clip", "entropy_balanced"])
def test_extreme_log_ratios_stay_finite(name):
    "log r is clamped to ±20 (verl), so r = e^±60 gives finite losses and gradients."
    lp = torch.tensor([[60.0, -60.0, 0.0]], dtype=f64, requires_grad=True)
    loss, _ = policy_loss(name, lp, torch.zeros(1, 3, dtype=f64), torch.tensor([-1.0], dtype=f64), torch.ones(1, 3),
                          entropy=torch.tensor([[0.1, 1.0, 2.0]], dtype=f64))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_match_float64(name, dtype):
    lp, old, adv, H, mask = batch(4)
    want = policy_loss(name, lp, old, adv, mask, entropy=H)[0].item()
    lpd = lp.to(dtype)
    got = policy_loss(name, lpd, old.to(dtype), adv.to(dtype), mask, entropy=H.to(dtype))[0].item()
    ref = policy_loss(name, lpd.double(), old.to(dtype).double(), adv.to(dtype).double(), mask,
                      entropy=H.to(dtype).double())[0].item()
    assert abs(got - ref) < 1e-4 * (1 + abs(ref))          # fp32 arithmetic inside for bf16 inputs
    assert abs(got - want) < (0.2 if dtype == torch.bfloat16 else 1e-4) * (1 + abs(want))


def test_entropy_statistics_have_micro_batch_scope():
    "ĥ and z are taken over the valid tokens of the call: the same tokens in a different batch get other bounds."
    lp, old, adv, H, mask = batch(5)
    full = sc.hapo_normalized_entropy(H, mask)
    half = sc.hapo_normalized_entropy(H[:2], mask[:2])
    assert not torch.allclose(full[:2], half)
    zf, zh = sc.entropy_zscore(H, mask), sc.entropy_zscore(H[:2], mask[:2])
    v = H[mask]
    assert torch.allclose(zf[mask], (v - v.mean()) / v.std(), atol=1e-12) and not torch.allclose(zf[:2], zh)
    assert sc.entropy_zscore(torch.tensor([[2.0]]), torch.ones(1, 1)).item() == 0.0      # one token: sd := 1


def test_region_table_over_many_settings():
    "The spec's table of ∂ℓ/∂log π in the three clipped regions, at random ε, c and |A|."
    g = torch.Generator().manual_seed(0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    for _ in range(25):
        el, eh = 0.05 + 0.4 * torch.rand(1, generator=g).item(), 0.05 + 0.6 * torch.rand(1, generator=g).item()
        c, A = 1.5 + 8 * torch.rand(1, generator=g).item(), 0.1 + 3 * torch.rand(1, generator=g).item()
        tp, tn = 0.3 + 3 * torch.rand(1, generator=g).item(), 0.3 + 3 * torch.rand(1, generator=g).item()
        r1, r2, r3 = 1 + eh + 0.01 + torch.rand(1, generator=g).item(), (1 - el) * 0.9, max(c, 1 + eh) * 1.1
        sapo = lambda a, r, t: -4 * a * sig(t * (r - 1)) * (1 - sig(t * (r - 1))) * r
        want = {"PPO-clip": (0, 0, A * r3), "dual-clip": (0, 0, 0), "CISPO": (-A * (1 + eh), A * (1 - el), A * (1 + eh)),
                "SAPO": (sapo(A, r1, tp), sapo(-A, r2, tn), sapo(-A, r3, tn)), "entropy-balanced": (-A * (1 + eh), 0, 0)}
        for label, (name, o) in sc.region_methods(el, eh, c, tp, tn).items():
            got = [sc.weight_curve(name, [r], a, **o).item() for r, a in ((r1, A), (r2, -A), (r3, -A))]
            assert all(abs(x - y) < 1e-9 for x, y in zip(got, want[label])), (label, got, want[label])


def test_hapo_edge_cases():
    m = torch.ones(1, 3, dtype=torch.bool)
    # the pivot is the smallest entropy: there is no h < 0, ĥ = 0 there, no division by zero
    h = sc.hapo_normalized_entropy(torch.tensor([[0.1, 1.0, 2.0]], dtype=f64), m, pivot=0.0)
    assert torch.isfinite(h).all() and h[0, 0] == 0 and h[0, 2] == 1
    # the pivot is the largest: no h > 0, paper reading gives ĥ ∈ [−1, 0]
    h = sc.hapo_normalized_entropy(torch.tensor([[0.1, 1.0, 2.0]], dtype=f64), m, pivot=1.0, reading="paper")
    assert torch.isfinite(h).all() and h[0, 0] == -1 and h[0, 2] == 0
    # H = 0 is floored at 1e-8 before the log
    assert torch.isfinite(sc.hapo_normalized_entropy(torch.tensor([[0.0, 1.0, 2.0]]), m)).all()
    assert sc.hapo_normalized_entropy(torch.ones(2, 2), torch.zeros(2, 2)).abs().sum() == 0


# ------------------------------------------------------------------------------ bad options and inputs
BAD = [("cispo", {"clip_low": -0.1}, "clip_low"), ("cispo", {"clip_high": float("nan")}, "clip_high"),
       ("cispo", {"clip_high": "0.2"}, "clip_high"), ("cispo", {"dual_clip": 3.0}, "unknown option"),
       ("sapo", {"tau_pos": 0.0}, "tau_pos"), ("sapo", {"tau_neg": -1.0}, "tau_neg"),
       ("sapo", {"tau_pos": float("inf")}, "tau_pos"),
       ("hapo_clip", {"reading": "intent"}, "reading"), ("hapo_clip", {"entropy_pivot": 1.5}, "entropy_pivot"),
       ("hapo_clip", {"clip_alpha": -1.0}, "clip_alpha"), ("hapo_clip", {"clip_low": 1.0}, "clip_low"),
       ("hapo_clip", {"dual_clip": 1.0}, "dual_clip"), ("hapo_clip", {"clip_alpha": True}, "clip_alpha"),
       ("entropy_balanced", {"reading": "both"}, "reading"),
       ("entropy_balanced", {"adv_entropy_scale": -0.2}, "adv_entropy_scale"),
       ("entropy_balanced", {"dual_clip": 0.5}, "dual_clip"), ("entropy_balanced", {"clip_high": -0.1}, "clip_high")]


@pytest.mark.parametrize("name,o,msg", BAD)
def test_bad_options_refused_at_config_time(name, o, msg):
    with pytest.raises(ValueError, match=msg):
        check_loss_options(name, o)


@pytest.mark.parametrize("name", ["hapo_clip", "entropy_balanced"])
def test_entropy_required_and_checked(name):
    lp, old, adv, H, mask = batch(6)
    assert loss_needs(name) == {"entropy"}
    with pytest.raises(ValueError, match="needs entropy"):
        policy_loss(name, lp, old, adv, mask)
    with pytest.raises(ValueError, match="entropy must be a tensor of shape"):
        policy_loss(name, lp, old, adv, mask, entropy=H[:, :3])
    with pytest.raises(ValueError, match="entropy has 4 NaN"):
        policy_loss(name, lp, old, adv, mask, entropy=torch.where(torch.arange(7) == 0, float("nan"), H))


def test_helper_inputs_refused():
    with pytest.raises(ValueError, match="reading"):
        sc.hapo_normalized_entropy(torch.ones(1, 2), torch.ones(1, 2), reading="x")
    with pytest.raises(ValueError, match="shape"):
        sc.hapo_normalized_entropy(torch.ones(1, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match="shape"):
        sc.entropy_zscore(torch.ones(2, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        sc.hapo_normalized_entropy(torch.tensor([[1.0, float("inf")]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="unknown loss"):
        sc.token_terms("cispo2", torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1))


# ------------------------------------------------------------------------------ one step, tiny model
@pytest.mark.parametrize("name,o", [("cispo", {}), ("sapo", {}), ("hapo_clip", {}), ("hapo_clip", {"reading": "paper"}),
                                    ("entropy_balanced", {}), ("entropy_balanced", {"reading": "paper"})])
def test_one_training_step_on_the_tiny_model(tmp_path, name, o):
    from entropy_rl.trainer import train
    res = train(steps=1, output_dir=str(tmp_path / name), algo=name, loss_options=o, model="tiny", prompts_per_step=2,
                group_size=4, max_new_tokens=4, lr=1e-2, minibatches=2, progress=False, plot=False,
                task_options={"instruction": None}, reward_fn=lambda text, problem: float(len(text) % 2))
    m = res.metrics[0]
    assert m["grad_norm"] > 0 and math.isfinite(m["loss"]) and math.isfinite(m["ratio/mean"])


# ------------------------------------------------------------------------------ metrics
def test_metrics_against_direct_counts():
    lp, old, adv, H, mask = batch(7, spread=0.8)
    r = torch.exp(lp - old)[mask]
    a = adv[:, None].expand_as(lp)[mask]
    n = int(mask.sum())
    _, m = policy_loss("cispo", lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert m["cispo/capped_frac"] == int(((r > 1.28) | (r < 0.8)).sum()) / n
    assert m["clip/frac"] == int((((a > 0) & (r >= 1.28)) | ((a < 0) & (r <= 0.8))).sum()) / n
    _, m = policy_loss("sapo", lp, old, adv, mask)
    tau = torch.where(a > 0, torch.tensor(1.0, dtype=f64), torch.tensor(1.05, dtype=f64))
    s = torch.sigmoid(tau * (r - 1))
    assert abs(m["sapo/gate_mean"] - (4 * s * (1 - s)).mean().item()) < 1e-12
    _, m = policy_loss("hapo_clip", lp, old, adv, mask, entropy=H)
    h = sc.hapo_normalized_entropy(H, mask)[mask]
    el, eh = sc.hapo_clip_widths(h)
    assert abs(m["bound/high"] - (1 + eh).mean().item()) < 1e-12 and abs(m["bound/low"] - (1 - el).mean().item()) < 1e-12
    assert m["clip/frac"] == int((((a > 0) & (r >= 1 + eh)) | ((a < 0) & (r <= 1 - el))).sum()) / n
    assert m["clip/dual_frac"] == int(((a < 0) & (r > 10)).sum()) / n and abs(m["hapo/h_mean"] - h.mean().item()) < 1e-12
    for reading in ("code", "paper"):
        _, m = policy_loss("entropy_balanced", lp, old, adv, mask, entropy=H, reading=reading)
        z = sc.entropy_zscore(H, mask)[mask]
        at = a * (1 + 0.2 * z)
        keep = torch.ones_like(z, dtype=torch.bool) if reading == "code" else z > 0
        assert m["entropy_balanced/kept_frac"] == int(((at > 0) & (r >= 1.28) & keep).sum()) / n
        # dual-clip acts with Ã: negative tokens whose loss −Ã r would exceed −Ã c = 3|Ã|, i.e. r > 3
        assert m["clip/dual_frac"] == int(((at < 0) & (r > 3)).sum()) / n


def test_entropy_statistics_keep_float32_for_half_precision_entropy():
    H = torch.tensor([[0.05, 0.1, 0.2, 0.5, 1.0, 2.0]], dtype=torch.bfloat16)
    m = torch.ones(1, 6, dtype=torch.bool)
    for f in (sc.hapo_normalized_entropy, sc.entropy_zscore):
        out = f(H, m)
        assert out.dtype == torch.float32
        assert torch.allclose(out.double(), f(H.double(), m), atol=1e-6)


@pytest.mark.parametrize("name", ["cispo", "hapo_clip", "entropy_balanced"])
def test_token_terms_is_the_per_token_gradient_of_policy_loss(name):
    "For a token-mean loss, n · ∂L/∂log π (through policy_loss) is token_terms' weight w, and mean ℓ is L."
    lp, old, adv, H, mask = batch(8)
    x = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(name, x, old, adv, mask, entropy=H)
    loss.backward()
    ell, w = sc.token_terms(name, lp, old, adv, mask, entropy=H)
    n = int(mask.sum())
    assert torch.allclose(x.grad * n, w, atol=1e-12, rtol=0)
    assert abs(ell[mask].mean().item() - loss.item()) < 1e-12
