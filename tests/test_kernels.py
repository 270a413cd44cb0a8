"""entropy_rl.kernels: the Triton kernels (under TRITON_INTERPRET=1 on CPU), the chunked torch
head, their gradients, the peer failure modes of MECHANISMS.md §6, errors and peak memory.

Every comparison is against `naive_logprob_entropy` evaluated in float64 on the same (rounded)
inputs, with random weights on both outputs so that both gradient paths are exercised."""
import json
import os
import subprocess
import sys

import pytest
from memory_child import run_child
import torch

# TRITON_INTERPRET must be set before the first `import triton` (Triton compiles its own
# library functions at import). If some other test module imported triton first, the Triton
# cases run again in a fresh process instead (test_triton_cases_in_fresh_process).
_TRITON_PREIMPORTED = "triton" in sys.modules
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from entropy_rl.kernels import (  # noqa: E402
    HAS_TRITON, chunked_logprob_entropy, cpu_peak_memory_mb, fused_logprob_entropy,
    naive_logprob_entropy, triton_logprob_entropy, _interpreting,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = HAS_TRITON and (DEV == "cuda" or (_interpreting() and not _TRITON_PREIMPORTED))
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="triton missing, or imported before TRITON_INTERPRET "
                                  "(then covered by test_triton_cases_in_fresh_process)")

# Tolerances: max |got - ref| / max |ref| against float64 on the rounded inputs. Values are
# accumulated in fp32 for every input dtype; gradients are returned in the input dtype, so
# their error is the dtype's rounding (bf16: 2^-8 plus dz rounded to bf16; fp16: 2^-11).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1.5e-2), torch.float16: (1e-5, 3e-3),
       torch.float64: (1e-12, 1e-10)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "Tiny tensors: extra threads only contend on a shared CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_case(n, d, v, dtype=torch.float32, seed=0, scale=2.0, ignore_every=5, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype).to(DEV)
    w = (0.7 * torch.randn(v, d, generator=g, dtype=torch.float64)).to(dtype).to(DEV)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = ignore_index
    return h, w, y.to(DEV)


def run(fn, h, w, y, temperature=1.0, seed=1, **kw):
    "Outputs and gradients of sum(a * logp + b * H) with fixed random a, b."
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    lp, H = fn(h, w, y, temperature, **kw)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(len(y), generator=g, dtype=torch.float64).to(DEV)
    b = torch.randn(len(y), generator=g, dtype=torch.float64).to(DEV)
    (lp.double() * a + H.double() * b).sum().backward()
    return lp, H, h.grad, w.grad


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_against_naive(fn, h, w, y, temperature=1.0, ignore_index=-100, tol=None, **kw):
    got = run(fn, h, w, y, temperature, ignore_index=ignore_index, **kw)
    ref = run(naive_logprob_entropy, h.double(), w.double(), y, temperature, ignore_index=ignore_index)
    tv, tg = tol or TOL[h.dtype]
    lp, H, dh, dw = got
    assert lp.dtype == H.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    assert rel_err(lp, ref[0]) < tv and rel_err(H, ref[1]) < tv, (rel_err(lp, ref[0]), rel_err(H, ref[1]))
    assert rel_err(dh, ref[2]) < tg and rel_err(dw, ref[3]) < tg, (rel_err(dh, ref[2]), rel_err(dw, ref[3]))
    ign = y == ignore_index
    assert (lp <= 0).all() and (H >= 0).all()
    assert (lp[ign] == 0).all() and (H[ign] == 0).all() and (dh[ign] == 0).all()
    return got


def tri(**blocks):
    "triton_logprob_entropy with tile overrides."
    return lambda h, w, y, t, **kw: triton_logprob_entropy(h, w, y, t, blocks=blocks or None, **kw)


def chk(chunk_size, vocab_chunk_size):
    return lambda h, w, y, t, **kw: chunked_logprob_entropy(h, w, y, t, chunk_size=chunk_size,
                                                            vocab_chunk_size=vocab_chunk_size, **kw)


# ----------------------------------------------------------------------------- Triton kernels
@needs_triton
@pytest.mark.parametrize("n,d,v", [(16, 16, 100), (37, 24, 257), (64, 64, 1000)])
def test_triton_fp32_matches_naive(n, d, v):
    check_against_naive(tri(), *make_case(n, d, v), temperature=0.7)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_matches_naive(dtype):
    check_against_naive(tri(), *make_case(37, 24, 257, dtype=dtype), temperature=1.3)


@needs_triton
@pytest.mark.parametrize("blocks", [dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_splits=1),
                                    dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, BWD_BLOCK_D=32, num_splits=5)])
def test_triton_tilings(blocks):
    # D = 40 and N = 45 are not multiples of the tiles either
    check_against_naive(tri(**blocks), *make_case(45, 40, 257, seed=3))


@needs_triton
@pytest.mark.parametrize("v,block_v", [(49_152, 32768), (151_936, 1024)])
def test_triton_real_vocabulary_sizes(v, block_v):
    # verl #2899: vocabulary sizes that are not a multiple of the block
    # fp32 sums over 150k vocabulary terms (with cancellation) in dh: a looser gradient bound
    check_against_naive(tri(BLOCK_V=block_v, num_splits=3), *make_case(5, 16, v, ignore_every=4), tol=(1e-5, 1e-4))


@needs_triton
def test_triton_large_logits_never_positive():
    # verl #2656: positive log-probs. Large logits with a dominant label stress the LSE.
    h, w, y = make_case(16, 16, 100, scale=60.0, ignore_every=0)
    z = h.double() @ w.double().T
    y = z.argmax(1)
    lp, H = triton_logprob_entropy(h, w, y)
    assert (lp <= 0).all() and (H >= 0).all()
    ref = naive_logprob_entropy(h.double(), w.double(), y)
    assert (lp.double() - ref[0]).abs().max() < 1e-4 and (H.double() - ref[1]).abs().max() < 1e-4


@needs_triton
def test_triton_one_output_frozen_weight_and_all_ignored():
    h, w, y = make_case(20, 16, 100)
    hh = h.clone().requires_grad_()
    lp, H = triton_logprob_entropy(hh, w, y)           # weight frozen (LoRA-style)
    lp.sum().backward()                                 # only the log-prob carries gradient
    hr = h.double().clone().requires_grad_()
    naive_logprob_entropy(hr, w.double(), y)[0].sum().backward()
    assert rel_err(hh.grad, hr.grad) < 1e-5
    lp, H = triton_logprob_entropy(h, w, torch.full_like(y, -100))
    assert (lp == 0).all() and (H == 0).all()


@needs_triton
def test_triton_custom_ignore_index_and_tied_embedding():
    h, w, y = make_case(24, 16, 100, ignore_every=3, ignore_index=-1)
    check_against_naive(tri(), h, w, y, ignore_index=-1)
    tied_embedding_check(triton_logprob_entropy, tol=1e-5)


@needs_triton
def test_triton_row_split_invariance():
    # verl #3723 (sequence parallelism): a token's outputs must not depend on its neighbours
    h, w, y = make_case(40, 16, 257)
    lp, H = triton_logprob_entropy(h, w, y)
    parts = [triton_logprob_entropy(h[s], w, y[s]) for s in (slice(0, 13), slice(13, 40))]
    assert torch.allclose(lp, torch.cat([p[0] for p in parts]), rtol=1e-6, atol=1e-6)
    assert torch.allclose(H, torch.cat([p[1] for p in parts]), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not (HAS_TRITON and _TRITON_PREIMPORTED and DEV == "cpu"), reason="ran in-process")
def test_triton_cases_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "triton and not fresh_process"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-3000:]


_AOT = r"""
import sys, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from entropy_rl.kernels import _fwd_kernel, _bwd_kernel
common = {"N": "i32", "V": "i32", "D": "i32", "inv_temp": "fp32", "v_per_split": "i32",
          "stride_hn": "i32", "stride_hd": "i32", "stride_wv": "i32", "stride_wd": "i32",
          "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_D": "constexpr",
          "DOT_FP32": "constexpr", "PREC": "constexpr"}
for dt in ("bf16", "fp32"):
    ptrs = {"h_ptr": "*" + dt, "w_ptr": "*" + dt, "y_ptr": "*i64"}
    f32 = dt == "fp32"
    fsig = {**ptrs, **{k: "*fp32" for k in ("m_ptr", "s_ptr", "t_ptr", "zy_ptr")}, **common, "n_splits": "i32"}
    fsig = {k: fsig[k] for k in _fwd_kernel.arg_names}
    bsig = {**ptrs, **{k: "*fp32" for k in ("lse_ptr", "ez_ptr", "glp_ptr", "gh_ptr", "dh_ptr", "dw_ptr")}, **common,
            "LOWP_DZ": "constexpr", "NEED_DH": "constexpr", "NEED_DW": "constexpr"}
    bsig = {k: bsig[k] for k in _bwd_kernel.arg_names}
    tiles = dict(BLOCK_N=64, BLOCK_V=128, DOT_FP32=f32, PREC="ieee")
    for fn, sig, cx in ((_fwd_kernel, fsig, dict(tiles, BLOCK_D=64)),
                        (_bwd_kernel, bsig, dict(tiles, BLOCK_D=32, LOWP_DZ=not f32, NEED_DH=True, NEED_DW=True))):
        k = triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
        assert "cubin" in k.asm, sorted(k.asm)
print("compiled")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_triton_kernels_compile_for_sm90():
    # The interpreter does not type-check like the compiler; this compiles both kernels for an
    # H100 (sm_90, to cubin) without needing a GPU, in a process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env)
    if out.returncode != 0 and ("ptxas" in out.stderr and "not found" in out.stderr.lower()):
        pytest.skip("no ptxas available to the triton install")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------ chunked torch head
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,v,cn,cv", [(37, 24, 257, 8, 31), (64, 64, 1000, 64, 1000),
                                         (16, 16, 100, 1, 1), (16, 16, 100, 500, 5000)])
def test_chunked_matches_naive(dtype, n, d, v, cn, cv):
    check_against_naive(chk(cn, cv), *make_case(n, d, v, dtype=dtype), temperature=0.7)


def test_chunked_gradcheck_float64():
    h, w, y = make_case(5, 6, 13, dtype=torch.float64, ignore_every=3)
    h, w = h.requires_grad_(), w.requires_grad_()
    def f(a, b):
        lp, H = chunked_logprob_entropy(a, b, y, 1.3, chunk_size=2, vocab_chunk_size=4)
        return lp, -0.6 * H
    assert torch.autograd.gradcheck(f, (h, w))


@pytest.mark.parametrize("v", [49_152, 151_936])
def test_chunked_real_vocabulary_sizes(v):
    check_against_naive(chk(3, 8192), *make_case(7, 8, v, ignore_every=4), tol=(1e-5, 1e-4))


def test_chunked_large_logits_never_positive():
    h, w, _ = make_case(32, 16, 100, scale=60.0, ignore_every=0)
    y = (h.double() @ w.double().T).argmax(1)
    lp, H = chunked_logprob_entropy(h, w, y, vocab_chunk_size=7)
    assert (lp <= 0).all() and (H >= 0).all()


def tied_embedding_check(fn, tol):
    "The head's weight is also the input embedding: both gradient contributions accumulate."
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (30,), device=DEV)
    y = torch.randint(0, 100, (30,), device=DEV)
    y[::4] = -100
    grads = []
    for f, dt in ((fn, torch.float32), (naive_logprob_entropy, torch.float64)):
        emb = torch.nn.Embedding(100, 16, dtype=torch.float64, device=DEV)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(100, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
        emb = emb.to(dt)
        hidden = torch.tanh(emb(ids))
        lp, H = f(hidden, emb.weight, y)
        (lp.double().sum() - 0.1 * H.double().sum()).backward()
        grads.append(emb.weight.grad)
    assert rel_err(grads[0], grads[1]) < tol


def test_chunked_tied_embedding_and_hidden_from_3d():
    tied_embedding_check(chunked_logprob_entropy, tol=1e-5)
    # hidden states of a model are [B, T, D]: flattened they give the same per-token values
    h, w, y = make_case(24, 16, 100)
    lp = fused_logprob_entropy(h.reshape(4, 6, 16).flatten(0, 1), w, y)[0]
    assert torch.equal(lp, fused_logprob_entropy(h, w, y)[0])


def test_chunked_row_split_invariance_and_auto_backend():
    h, w, y = make_case(40, 16, 257)
    lp, H = fused_logprob_entropy(h, w, y)
    if DEV == "cpu":   # auto is the chunked torch head on CPU
        lp2, H2 = chunked_logprob_entropy(h, w, y)
        assert torch.equal(lp, lp2) and torch.equal(H, H2)
    lp3 = torch.cat([fused_logprob_entropy(h[s], w, y[s])[0] for s in (slice(0, 13), slice(13, 40))])
    assert torch.allclose(lp, lp3, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ errors
def _bad_inputs():
    h, w, y = make_case(8, 4, 10)
    return [
        (dict(hidden=h.reshape(2, 4, 4)), ValueError, "flatten"),
        (dict(weight=w[:, :3]), ValueError, "D=3"),
        (dict(weight=w[0]), ValueError, "weight must be [V, D]"),
        (dict(labels=y[:5]), ValueError, "labels has 5"),
        (dict(labels=y[:, None]), ValueError, "labels must be [N]"),
        (dict(weight=w.double()), TypeError, "share a dtype"),
        (dict(hidden=h.int(), weight=w.int()), TypeError, "float16/bfloat16"),
        (dict(labels=y.float()), TypeError, "integer"),
        (dict(labels=y.bool()), TypeError, "integer"),
        (dict(labels=torch.full_like(y, 10)), ValueError, "labels must lie"),
        (dict(labels=torch.full_like(y, -5)), ValueError, "labels must lie"),
        (dict(labels=y.to("meta")), ValueError, "devices differ"),
        (dict(weight=w[:0]), ValueError, "empty vocabulary"),
        (dict(hidden=h.numpy()), TypeError, "torch.Tensor"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(temperature=True), TypeError, "temperature"),
        (dict(backend="cuda"), ValueError, "unknown backend"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(vocab_chunk_size=1.5), ValueError, "vocab_chunk_size"),
    ], (h, w, y)


@pytest.mark.parametrize("i", range(len(_bad_inputs()[0])))
def test_clear_errors(i):
    cases, (h, w, y) = _bad_inputs()
    over, exc, msg = cases[i]
    kw = dict(hidden=h, weight=w, labels=y)
    kw.update(over)
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        fused_logprob_entropy(**kw)


def test_triton_backend_errors():
    h, w, y = make_case(8, 4, 10, dtype=torch.float64)
    if not HAS_TRITON:
        with pytest.raises(RuntimeError, match="triton package"):
            fused_logprob_entropy(h, w, y, backend="triton")
        return
    with pytest.raises(TypeError, match="float64"):
        fused_logprob_entropy(h, w, y, backend="triton")
    ok = fused_logprob_entropy(h, w, y, backend="auto")[0]     # float64 goes to the torch head
    assert ok.dtype == torch.float64


# ------------------------------------------------------------------------------------ memory
_MEMORY_CHILD = """
from entropy_rl.kernels import chunked_logprob_entropy, naive_logprob_entropy
def fwd_bwd():
    lp, H = chunked_logprob_entropy(h, w, y)
    (lp.sum() + 0.1 * H.sum()).backward()
    h.grad = w.grad = None
fwd_bwd()                                    # warm-up: allocator and autograd set-up are not the head's memory
fused_mb, _ = cpu_peak_memory_mb(fwd_bwd)
naive_mb, _ = cpu_peak_memory_mb(lambda: naive_logprob_entropy(h.detach(), w.detach(), y))
print(json.dumps([fused_mb, naive_mb]))
"""


def test_chunked_peak_memory_far_below_logits():
    # N = 4096, V = 32768: the fp32 logits alone take 512 MiB. Measured in a fresh process whose allocator returns
    # freed blocks to the OS (MALLOC_MMAP_THRESHOLD_), so the resident-size peak shows what the head holds and not
    # what earlier tests left in the heap.
    logits_mb = 4096 * 32768 * 4 / 2**20
    fused_mb, naive_mb = run_child(_MEMORY_CHILD, 4096, timeout=300)
    # the meter is real: the naive forward alone needs at least the logits
    assert naive_mb > logits_mb, (naive_mb, logits_mb)
    assert fused_mb < logits_mb / 8, (fused_mb, logits_mb)


# ------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("backend", ["torch", "naive", "triton"])
def test_no_tokens(backend):
    if backend == "triton" and not TRITON_HERE:
        pytest.skip("triton not usable in this process")
    h, w, _ = make_case(1, 8, 50)
    h = h[:0].clone().requires_grad_()
    w = w.clone().requires_grad_()
    lp, H = fused_logprob_entropy(h, w, torch.zeros(0, dtype=torch.long, device=DEV), backend=backend)
    assert lp.shape == H.shape == (0,) and lp.dtype == torch.float32
    (lp.sum() + H.sum()).backward()
    assert w.grad is None or (w.grad == 0).all()


def test_chunked_under_torch_compile_with_ignore_rows():
    # Liger #1338: ignore-index rows silently wrong under compilation. aot_eager traces the graph
    # (autograd.Function included) without needing a C++ compiler.
    h, w, y = make_case(24, 16, 100, ignore_every=3)

    def loss(h, w):
        lp, H = chunked_logprob_entropy(h, w, y, 0.8, chunk_size=7, vocab_chunk_size=33)
        return (lp * torch.linspace(-1, 1, len(y), device=DEV)).sum() + 0.3 * H.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=False)
    outs = []
    for f in (loss, compiled):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        val = f(hh, ww)
        val.backward()
        outs.append((val.detach(), hh.grad, ww.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert (outs[1][1][y == -100] == 0).all()
