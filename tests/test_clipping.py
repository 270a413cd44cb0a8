"""Bad input, determinism and the distributed-sum hook of entropy_rl.clipping (the math is tested in nbs/03_clipping)."""
import math
import threading

import pytest
import torch

from entropy_rl.clipping import (BAPO_CODE_SCRIPT, BAPO_DEFAULTS, READINGS, bapo_bounds, bapo_share, carries_gradient,
                                 clip_regions, clip_stats, clipped_surrogate_entropy_change, clipped_surrogate_grad,
                                 clipped_surrogate_loss, contribution_sums, entropy_quadrants, synthetic_token_batch,
                                 token_entropy_change)

F64 = torch.float64


def _batch(seed=0, B=6, T=20, neg_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    r = (torch.randn(B, T, generator=g, dtype=F64) * 0.5).exp()
    A = torch.randn(B, T, generator=g, dtype=F64) - neg_shift
    M = torch.rand(B, T, generator=g) < 0.8
    return r, A, M


TOKEN_FNS = [clipped_surrogate_loss, carries_gradient, clip_regions]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("fn", TOKEN_FNS)
def test_token_fns_reject_bad_input(fn):
    r, A = torch.ones(3), torch.ones(3)
    with pytest.raises(TypeError):
        fn([1.0, 2.0], A, 0.8, 1.2)
    with pytest.raises(TypeError):
        fn(torch.ones(3, dtype=torch.int64), A, 0.8, 1.2)
    with pytest.raises(ValueError, match="shape"):
        fn(r, torch.ones(4), 0.8, 1.2)
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([1.0, float("nan"), 1.0]), A, 0.8, 1.2)
    with pytest.raises(ValueError, match="NaN"):
        fn(r, torch.tensor([1.0, float("inf"), 1.0]), 0.8, 1.2)
    with pytest.raises(ValueError, match=">= 0"):
        fn(torch.tensor([1.0, -0.1, 1.0]), A, 0.8, 1.2)
    with pytest.raises(ValueError, match="empty"):
        fn(torch.ones(0), torch.ones(0), 0.8, 1.2)
    with pytest.raises(ValueError, match="low <= high"):
        fn(r, A, 1.2, 0.8)
    with pytest.raises(ValueError):
        fn(r, A, -0.1, 1.2)
    with pytest.raises(ValueError):
        fn(r, A, 0.8, float("inf"))
    with pytest.raises(TypeError):
        fn(r, A, "0.8", 1.2)


def test_per_response_advantages_broadcast():
    r = torch.full((2, 4), 1.5)
    out = clipped_surrogate_loss(r, torch.tensor([1.0, -1.0]), 0.8, 1.28)
    assert torch.allclose(out, torch.tensor([[-1.28] * 4, [1.5] * 4]))
    with pytest.raises(ValueError):
        clipped_surrogate_loss(r, torch.tensor([1.0, -1.0, 0.5]), 0.8, 1.28)


def test_softmax_fns_reject_bad_input():
    z = torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match="share a shape"):
        clipped_surrogate_grad(z, torch.zeros(5, dtype=F64), z)
    with pytest.raises(ValueError, match="size >= 2"):
        clipped_surrogate_grad(torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64))
    with pytest.raises(ValueError):
        clipped_surrogate_grad(z, z, z, eps_low=1.5)
    with pytest.raises(ValueError):
        clipped_surrogate_entropy_change(z, z, torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=F64))
    with pytest.raises(TypeError):
        clipped_surrogate_grad(z, z, torch.zeros(4, dtype=torch.int64))


def test_token_entropy_change_rejects_bad_input():
    z = torch.zeros(3, 5, dtype=F64)
    y = torch.tensor([0, 1, 2])
    A = torch.ones(3, dtype=F64)
    with pytest.raises(TypeError, match="labels"):
        token_entropy_change(z, z, y.double(), A, 0.8, 1.2)
    with pytest.raises(ValueError, match="labels"):
        token_entropy_change(z, z, torch.tensor([0, 1, 5]), A, 0.8, 1.2)
    with pytest.raises(ValueError, match="labels"):
        token_entropy_change(z, z, torch.tensor([0, 1]), A, 0.8, 1.2)
    with pytest.raises(ValueError, match="N, K"):
        token_entropy_change(z[0], z[0], y, A, 0.8, 1.2)
    with pytest.raises(ValueError, match="advantages"):
        token_entropy_change(z, z, y, torch.ones(4, dtype=F64), 0.8, 1.2)


def test_quadrants_and_stats_reject_bad_input():
    with pytest.raises(ValueError, match="entropy shape"):
        entropy_quadrants(torch.zeros(3), torch.zeros(4), torch.zeros(3))
    r, A, M = _batch()
    logp, H = -torch.rand(r.shape, dtype=F64), torch.rand(r.shape, dtype=F64)
    with pytest.raises(ValueError, match="no tokens"):
        clip_stats(r, A, logp, H, 0.8, 1.2, mask=torch.zeros_like(M))
    with pytest.raises(ValueError, match="0 and 1"):
        clip_stats(r, A, logp, H, 0.8, 1.2, mask=torch.full(r.shape, 0.5))


def test_bapo_rejects_bad_input():
    r, A, M = _batch()
    with pytest.raises(ValueError, match="reading"):
        bapo_bounds(r, A, M, reading="papr")
    with pytest.raises(ValueError, match="unknown BAPO option"):
        bapo_bounds(r, A, M, reading="paper", eps=1e-8)          # eps belongs to the code reading only
    with pytest.raises(ValueError, match="unknown BAPO option"):
        bapo_bounds(r, A, M, reading="code", rho0=0.4)
    with pytest.raises(ValueError, match="c_high_max"):
        bapo_bounds(r, A, M, c_high_max=1.1)
    with pytest.raises(ValueError, match="c_low_max"):
        bapo_bounds(r, A, M, c_low_max=1.3)
    with pytest.raises(ValueError):
        bapo_bounds(r, A, M, target=float("nan"))
    with pytest.raises(ValueError):
        bapo_bounds(r, A, M, c_high_step=-0.05)
    with pytest.raises(ValueError, match="mask shape"):
        bapo_bounds(r, A, M[:, :3])
    with pytest.raises(ValueError, match="0 and 1"):
        bapo_bounds(r, A, M.double() * 2)
    with pytest.raises(TypeError):
        bapo_bounds(r, A, M, all_reduce="sum")
    with pytest.raises(ValueError, match="all_reduce"):
        bapo_bounds(r, A, M, all_reduce=lambda t: t[:1])
    with pytest.raises(ValueError, match="NaN"):
        bapo_bounds(r, A.masked_fill(~M, float("nan")), M)   # NaN is rejected even under the mask
    with pytest.raises(ValueError, match="reading"):
        contribution_sums(r, A, 0.8, 1.2, M, reading="verl")


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("reading", READINGS)
def test_bapo_deterministic(reading):
    for seed in range(5):
        r, A, M = _batch(seed, neg_shift=0.4)
        outs = [bapo_bounds(r.clone(), A.clone(), M.clone(), reading) for _ in range(3)]
        assert outs[0] == outs[1] == outs[2]
        # same tokens in another order and layout: same bounds (sums may differ in the last bits only)
        perm = torch.randperm(r.numel(), generator=torch.Generator().manual_seed(seed))
        o = bapo_bounds(r.flatten()[perm], A.flatten()[perm], M.flatten()[perm], reading)
        assert (o["c_low"], o["c_high"], o["steps"]) == (outs[0]["c_low"], outs[0]["c_high"], outs[0]["steps"])
        assert math.isclose(o["positive_share"], outs[0]["positive_share"], rel_tol=1e-12)


@pytest.mark.parametrize("reading", READINGS)
def test_bapo_dtype_and_mask_conventions(reading):
    r, A, M = _batch(3, neg_shift=0.3)
    ref = bapo_bounds(r, A, M, reading)
    assert bapo_bounds(r, A, M.double(), reading) == ref           # bool and 0/1 float masks agree
    o32 = bapo_bounds(r.float(), A.float(), M, reading)             # fp32 inputs, fp64 sums
    assert (o32["c_low"], o32["c_high"]) == (ref["c_low"], ref["c_high"])
    # masked tokens do not matter, whatever their values
    r2, A2 = r.clone(), A.clone()
    r2[~M], A2[~M] = 7.0, -100.0
    assert bapo_bounds(r2, A2, M, reading) == ref
    # per-response advantages [B] behave like the broadcast per-token tensor
    Ab = A[:, 0]
    assert bapo_bounds(r, Ab, M, reading) == bapo_bounds(r, Ab[:, None].expand_as(r).contiguous(), M, reading)


def test_demo_batch_is_seeded():
    a, b, c = synthetic_token_batch(seed=3, n=50), synthetic_token_batch(seed=3, n=50), synthetic_token_batch(seed=4, n=50)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ratio"], c["ratio"])
    with pytest.raises(ValueError):
        synthetic_token_batch(n=0)


# ---------------------------------------------------------------- the all_reduce hook
def test_all_reduce_identity_and_in_place():
    r, A, M = _batch(1, neg_shift=0.4)
    for reading in READINGS:
        ref = bapo_bounds(r, A, M, reading)
        assert bapo_bounds(r, A, M, reading, all_reduce=lambda t: t) == ref
        assert bapo_bounds(r, A, M, reading, all_reduce=lambda t: None) == ref       # in-place style, no-op


def test_all_reduce_doubling_keeps_ratios():
    # summing two identical ranks doubles P and N: the paper share is unchanged
    r, A, M = _batch(2, neg_shift=0.4)
    ref = bapo_bounds(r, A, M, "paper")
    out = bapo_bounds(r, A, M, "paper", all_reduce=lambda t: t * 2)
    assert (out["c_low"], out["c_high"]) == (ref["c_low"], ref["c_high"])
    assert math.isclose(out["pos"], 2 * ref["pos"])


def _run_ranks(shards, reading, **overrides):
    "Simulate data-parallel ranks with threads: all_reduce sums the ranks' [P, N] tensors at every probe."
    n = len(shards)
    barrier = threading.Barrier(n)
    slots = [None] * n
    results = [None] * n

    def worker(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()               # everybody has read before the next probe overwrites
            t.copy_(total)               # in place, like torch.distributed.all_reduce
            return None
        r, A, M = shards[rank]
        results[rank] = bapo_bounds(r, A, M, reading, all_reduce=all_reduce, **overrides)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.parametrize("reading", READINGS)
def test_all_reduce_matches_global_batch(reading):
    differs = 0
    for seed in range(6):
        r, A, M = _batch(seed, B=8, neg_shift=0.35 if reading == "paper" else 0.1)
        shards = [(r[:3], A[:3], M[:3]), (r[3:], A[3:], M[3:])]
        ranks = _run_ranks(shards, reading)
        glob = bapo_bounds(r, A, M, reading)
        for out in ranks:
            assert (out["c_low"], out["c_high"], out["steps"]) == (glob["c_low"], glob["c_high"], glob["steps"])
            assert math.isclose(out["positive_share"], glob["positive_share"], rel_tol=1e-12)
        assert ranks[0] == ranks[1]
        local = bapo_bounds(*shards[0], reading)
        differs += (local["c_low"], local["c_high"]) != (glob["c_low"], glob["c_high"])
    assert differs > 0   # a rank alone would decide differently on some batches: the hook is what aligns them


def test_all_reduce_with_an_empty_rank():
    r, A, M = _batch(5, B=4, neg_shift=0.35)
    M0 = M.clone()
    M0[:2] = False                       # rank 0 has no valid tokens at all
    shards = [(r[:2], A[:2], M0[:2]), (r[2:], A[2:], M0[2:])]
    ranks = _run_ranks(shards, "code", **BAPO_CODE_SCRIPT)
    glob = bapo_bounds(r[2:], A[2:], M[2:], "code", **BAPO_CODE_SCRIPT)
    assert ranks[0]["c_high"] == ranks[1]["c_high"] == glob["c_high"]


def test_defaults_are_the_published_ones():
    assert BAPO_DEFAULTS["paper"] == dict(target=0.4, c_low_start=0.6, c_low_max=0.9, c_low_step=0.02,
                                          c_high_start=1.2, c_high_max=3.0, c_high_step=0.05)
    assert BAPO_DEFAULTS["code"]["target"] == 1.0 and BAPO_CODE_SCRIPT["target"] == 0.5
    assert bapo_share(torch.ones(2), torch.tensor([1.0, 2.0]), 0.8, 1.2, reading="code") == math.inf
    assert bapo_share(torch.ones(2), torch.zeros(2), 0.8, 1.2, reading="paper") == 1.0
