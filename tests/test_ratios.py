"""Edge cases of entropy_rl.ratios that do not belong in the chapter: padding on the left,
bad input, and the GRPO / GSPO-token limits on many random ragged batches."""
import pytest
import torch

from entropy_rl.ratios import (entropy_adaptive_bounds, gspo_token_ratios, segment_ids_from_delimiters,
                               segment_mean, segment_ratios, sequence_ratios, sequence_segment_ids,
                               token_ratios, token_segment_ids)


def test_left_padding_segments_start_at_zero():
    ids = torch.tensor([[0, 0, 5, 9, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert segment_ids_from_delimiters(ids, [9], mask).tolist() == [[-1, -1, 0, 0, 1, 1]]
    assert token_segment_ids(mask).tolist() == [[-1, -1, 0, 1, 2, 3]]


def test_delimiter_in_padding_is_ignored():
    ids = torch.tensor([[5, 6, 9, 9]])
    mask = torch.tensor([[1, 1, 0, 0]])
    assert segment_ids_from_delimiters(ids, [9], mask).tolist() == [[0, 0, -1, -1]]


@pytest.mark.parametrize("seed", range(5))
def test_limits_on_random_ragged_batches(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 11
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    cur = old + torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    w = torch.randn(B, T, generator=g, dtype=torch.float64)
    for seg_fn, ref_fn in ((token_segment_ids, token_ratios), (sequence_segment_ids, gspo_token_ratios)):
        x1 = cur.clone().requires_grad_()
        x2 = cur.clone().requires_grad_()
        r1 = segment_ratios(x1, old, mask, seg_fn(mask))
        r2 = ref_fn(x2, old, mask)
        (r1 * w).sum().backward()
        (r2 * w).sum().backward()
        torch.testing.assert_close(r1, r2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)


def test_empty_response_has_unit_ratio_and_no_gradient():
    cur = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    s = sequence_ratios(cur, torch.zeros(2, 3, dtype=torch.float64), mask)
    assert s[1].item() == 1.0
    s.sum().backward()
    assert (cur.grad[1] == 0).all()


def test_segment_mean_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    seg = torch.randint(0, 3, (3, 8), generator=g)
    mask = torch.rand(3, 8, generator=g) > 0.2
    out = segment_mean(x, mask, seg)
    for b in range(3):
        for t in range(8):
            if mask[b, t]:
                sel = mask[b] & (seg[b] == seg[b, t])
                assert abs(out[b, t].item() - x[b][sel].mean().item()) < 1e-12
            else:
                assert out[b, t].item() == 0.0


@pytest.mark.parametrize("call", [
    lambda: token_ratios(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)),
    lambda: token_ratios(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2)),
    lambda: token_ratios(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.ones(2, 3)),
    lambda: token_ratios([[0.0]], torch.zeros(1, 1), torch.ones(1, 1)),
    lambda: segment_ratios(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 2, dtype=torch.long)),
    lambda: segment_ids_from_delimiters(torch.zeros(3, dtype=torch.long), [1]),
    lambda: segment_ids_from_delimiters(torch.zeros(2, 3, dtype=torch.long), [1], torch.ones(2, 4)),
    lambda: entropy_adaptive_bounds(torch.zeros(2, 3), torch.ones(2, 3), alpha=-0.1),
    lambda: entropy_adaptive_bounds(torch.zeros(2, 3), torch.ones(2, 3), scale=0.0),
    lambda: entropy_adaptive_bounds(torch.full((2, 3), float("nan")), torch.ones(2, 3)),
    lambda: entropy_adaptive_bounds(torch.zeros(2, 3), torch.ones(2, 3), clip_low=-0.1),
])
def test_bad_input_raises(call):
    with pytest.raises((ValueError, TypeError)):
        call()
