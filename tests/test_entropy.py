"""Bad-input sweep and half-precision checks for entropy_rl.entropy (the maths is tested in nbs/00_entropy.ipynb)."""
import math

import numpy as np
import pytest
import torch

from entropy_rl.entropy import (IGNORE_INDEX, entropy_from_logits, logprobs_and_entropy_chunked,
                                logprobs_from_logits, next_token_summary, nucleus_entropy, nucleus_mask,
                                plot_next_token_distribution)

Z = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
Y = torch.zeros(2, 3, dtype=torch.long)
NINF = float("-inf")


def _all_fns_on(logits):
    "Every public function called on `logits` (with matching valid labels)."
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long)
    return [lambda: entropy_from_logits(logits),
            lambda: logprobs_from_logits(logits, labels),
            lambda: logprobs_and_entropy_chunked(logits, labels, chunk_size=2),
            lambda: nucleus_entropy(logits),
            lambda: nucleus_mask(logits)]


BAD_LOGITS = [
    ("list", [[0.0, 1.0]], TypeError, "torch.Tensor"),
    ("numpy", np.zeros((2, 3)), TypeError, "torch.Tensor"),
    ("int64", torch.zeros(2, 3, dtype=torch.long), TypeError, "floating"),
    ("bool", torch.zeros(2, 3, dtype=torch.bool), TypeError, "floating"),
    ("complex", torch.zeros(2, 3, dtype=torch.complex64), TypeError, "floating"),
    ("0-d", torch.tensor(1.0), ValueError, "0-d"),
    ("empty vocab", torch.zeros(2, 0), ValueError, "empty vocabulary"),
    ("nan", torch.tensor([[0.0, float("nan"), 1.0]]), ValueError, "NaN"),
    ("+inf", torch.tensor([[0.0, float("inf"), 1.0]]), ValueError, r"\+inf"),
    ("all -inf row", torch.tensor([[0.0, 1.0, 2.0], [NINF, NINF, NINF]]), ValueError, "entirely -inf"),
]


@pytest.mark.parametrize("name,logits,exc,msg", BAD_LOGITS, ids=[b[0] for b in BAD_LOGITS])
def test_bad_logits(name, logits, exc, msg):
    if isinstance(logits, torch.Tensor) and logits.ndim >= 1:
        fns = _all_fns_on(logits)
    else:  # no valid labels can be built for these: use generic ones (the logits check comes first)
        fns = [lambda: entropy_from_logits(logits), lambda: logprobs_from_logits(logits, Y),
               lambda: logprobs_and_entropy_chunked(logits, Y), lambda: nucleus_entropy(logits),
               lambda: nucleus_mask(logits)]
    for fn in fns:
        with pytest.raises(exc, match=msg):
            fn()


BAD_TEMPERATURES = [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
                    ("1.0", TypeError), (None, TypeError), (True, TypeError), (torch.tensor(1.0), TypeError)]


@pytest.mark.parametrize("temperature,exc", BAD_TEMPERATURES, ids=[repr(t[0]) for t in BAD_TEMPERATURES])
def test_bad_temperature(temperature, exc):
    fns = [lambda: entropy_from_logits(Z, temperature), lambda: logprobs_from_logits(Z, Y, temperature),
           lambda: logprobs_and_entropy_chunked(Z, Y, temperature), lambda: nucleus_entropy(Z, 0.8, temperature),
           lambda: nucleus_mask(Z, 0.8, temperature)]
    for fn in fns:
        with pytest.raises(exc, match="temperature"):
            fn()


BAD_LABELS = [
    ("float", Y.float(), TypeError, "integer"),
    ("bool", Y.bool(), TypeError, "integer"),
    ("list", [[0, 0, 0], [0, 0, 0]], TypeError, "torch.Tensor"),
    ("wrong shape", torch.zeros(2, 4, dtype=torch.long), ValueError, r"shape logits.shape\[:-1\]"),
    ("full shape", torch.zeros(2, 3, 5, dtype=torch.long), ValueError, r"shape logits.shape\[:-1\]"),
    ("too large", torch.tensor([[0, 5, 0], [0, 0, 0]]), ValueError, r"\[0, 5\).*e.g. 5"),
    ("negative", torch.tensor([[0, -1, 0], [0, 0, 0]]), ValueError, r"out of range, e.g. -1"),
    ("-99", torch.tensor([[0, 0, 0], [0, -99, 0]]), ValueError, "IGNORE_INDEX"),
]


@pytest.mark.parametrize("name,labels,exc,msg", BAD_LABELS, ids=[b[0] for b in BAD_LABELS])
def test_bad_labels(name, labels, exc, msg):
    for fn in (lambda: logprobs_from_logits(Z, labels), lambda: logprobs_and_entropy_chunked(Z, labels)):
        with pytest.raises(exc, match=msg):
            fn()


@pytest.mark.parametrize("chunk_size,exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError), (True, TypeError),
                                            ("8", TypeError)])
def test_bad_chunk_size(chunk_size, exc):
    with pytest.raises(exc, match="chunk_size"):
        logprobs_and_entropy_chunked(Z, Y, chunk_size=chunk_size)


@pytest.mark.parametrize("top_p,exc", [(0.0, ValueError), (-0.1, ValueError), (1.01, ValueError),
                                       (float("nan"), ValueError), ("0.8", TypeError), (None, TypeError)])
def test_bad_top_p(top_p, exc):
    for fn in (lambda: nucleus_entropy(Z, top_p), lambda: nucleus_mask(Z, top_p)):
        with pytest.raises(exc, match="top_p"):
            fn()


def test_plot_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        next_token_summary(Z)
    with pytest.raises(ValueError, match="labels has 2 entries"):
        plot_next_token_distribution(Z[0, 0], labels=["a", "b"])


def test_valid_edge_inputs_accepted():
    "Things that look odd but are valid: int32 labels, the ignore label, numpy-scalar temperature, top_p = 1."
    y = torch.tensor([[0, IGNORE_INDEX, 4], [1, 2, 3]], dtype=torch.int32)
    lp = logprobs_from_logits(Z, y, np.float32(0.5))
    assert lp[0, 1] == 0 and torch.isfinite(lp).all()
    assert torch.equal(nucleus_entropy(Z, 1), entropy_from_logits(Z))


def _ref_entropy_and_logprob(x: torch.Tensor, y: torch.Tensor):
    "float64 reference on the values `x` holds (after its own rounding)."
    z = x.double()
    logp = z - z.max(-1, keepdim=True).values
    logp = logp - logp.exp().sum(-1, keepdim=True).log()
    H = -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0)).sum(-1)
    return H, logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 30.0, 6e4])
def test_half_precision_inputs(dtype, scale):
    """fp16/bf16 logits: float32 results, finite (fp16 exp overflows above 11.1, fp16 max is 65504),
    and equal to a float64 reference on the same rounded values up to float32 accumulation."""
    g = torch.Generator().manual_seed(1)
    x = (scale * torch.rand(4, 16, 257, generator=g) - scale / 2).to(dtype)
    x[0, 0, 10:] = NINF
    y = torch.randint(0, 257, (4, 16), generator=g)
    y[0, 0] = 3
    H_ref, lp_ref = _ref_entropy_and_logprob(x, y)
    H, lp = entropy_from_logits(x), logprobs_from_logits(x, y)
    lpc, Hc = logprobs_and_entropy_chunked(x, y, chunk_size=5)
    Hn = nucleus_entropy(x, top_p=1.0)
    for t in (H, lp, lpc, Hc, Hn):
        assert t.dtype == torch.float32 and t.shape == (4, 16)
        assert torch.isfinite(t).all()
    atol = 1e-5 * max(1.0, scale / 100)
    torch.testing.assert_close(H.double(), H_ref, atol=atol, rtol=1e-5)
    torch.testing.assert_close(lp.double(), lp_ref, atol=atol, rtol=1e-5)
    torch.testing.assert_close(Hc, H, atol=1e-6, rtol=0)
    torch.testing.assert_close(lpc, lp, atol=1e-6, rtol=0)
    assert torch.equal(Hn, H)
    assert 0 <= float(H[0, 0]) <= math.log(10) + 1e-6


def test_float64_stays_float64():
    x = Z.double()
    assert entropy_from_logits(x).dtype == torch.float64
    assert logprobs_from_logits(x, Y).dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in logprobs_and_entropy_chunked(x, Y))
    assert nucleus_entropy(x).dtype == torch.float64


def test_half_precision_gradient_dtype():
    "Gradients flow back to half-precision logits in their own dtype."
    x = Z.to(torch.bfloat16).requires_grad_()
    lp, H = logprobs_and_entropy_chunked(x, Y, chunk_size=4)
    (lp.sum() + H.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
