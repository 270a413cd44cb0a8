"""One prepared GPU check of the fused log-prob + entropy head (issue 20).

Four sections, each in its own process under a time budget, so that a CUDA fault or a hang in one
still leaves the others' output:

  correctness  Triton forward and backward on CUDA against the float64 naive head: V = 49,152,
               151,936 and a prime; fp32 and bf16; ignore labels, temperature, tied weights.
  failures     the peer failure classes of MECHANISMS.md §6: vocabularies that are not a multiple
               of the tile (verl #2899), positive log-probs (verl #2656), sequence parallelism
               (verl #3723), ignore rows under torch.compile (Liger #1338); plus empty inputs.
  speed        naive vs the trainer's unfused path vs chunked torch vs Triton vs Liger (when it
               imports) vs a bf16 matmul of the same shape, forward and forward+backward, at
               M = 8,192 / 32,768, D = 4,096, V = 131,072 / 151,936: time, TFLOP/s, peak memory,
               and chapter 07's targets with how much each is missed by.
  train        one RLVR update through the Trainer on a randomly initialised Qwen2.5-1.5B-shaped
               model (bf16), fused head on and off on the same rollout: s/step, tokens/s, peak
               memory, equality of per-token values and of gradients (stated tolerances).

Usage (repository root):
  bench/gpu_check.sh OUT              # one H100/H200, < 8 min; outputs under OUT
  bench/gpu_check.sh OUT --dry-run    # the same code paths on CPU: TRITON_INTERPRET=1, tiny shapes, tiny model
  python bench/gpu_check.py OUT --summarize   # print the summary of OUT/results.json again

Outputs (at most 8 files, what the device tool brings back): results.json (everything), summary.md
(the summary printed last), speed.png, log.txt (written by gpu_check.sh).
"""
import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

# Run as a script, this folder is first on sys.path, where bench/kernels.py would shadow the `kernels` package
# that transformers imports: take it off.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

SECTIONS = ("correctness", "failures", "speed", "train")
# Hard budgets in seconds per section (the child process is killed at its budget; items that would not
# fit are skipped and recorded). GPU: 60 + 75 + 150 + 150 = 435 s, inside the 8-minute limit (failures compiles
# extra tilings and runs inductor; speed needs ~100 s by estimate).
BUDGETS = {"gpu": dict(correctness=60, failures=75, speed=150, train=150),
           "dry": dict(correctness=45, failures=45, speed=45, train=90)}
TOTAL_S = {"gpu": 465, "dry": 280}
PRIME_V = {"gpu": 100_003, "dry": 251}

SHAPES = {
    "gpu": dict(
        correctness=dict(n=300, d=520, vs=[49_152, 151_936, PRIME_V["gpu"]], dtypes=["float32", "bfloat16"],
                         temperature=0.7),
        failures=dict(n=200, d=256, v=151_936, v_prime=PRIME_V["gpu"], compile_backend="inductor", compile_head="triton"),
        # the largest shape first: the matmul-limit target is judged there
        speed=dict(shapes=[(32_768, 151_936), (8_192, 131_072), (8_192, 151_936), (32_768, 131_072)],
                   d=4096, dtype="bfloat16", item_s=4.0, need_s=8.0),
        train=dict(arch="qwen2.5-1.5b", prompts=8, group=8, new_tokens=128, grad_accum=2, score_rows=8)),
    "dry": dict(
        correctness=dict(n=20, d=16, vs=[256, 300, PRIME_V["dry"]], dtypes=["float32", "bfloat16"], temperature=0.7),
        # dynamo cannot trace the Triton interpreter's kernels (it fakes numpy pointer arithmetic): the dry run
        # compiles the chunked torch head through the same check
        failures=dict(n=40, d=16, v=300, v_prime=PRIME_V["dry"], compile_backend="aot_eager", compile_head="torch"),
        speed=dict(shapes=[(32, 300), (16, 256)], d=16, dtype="bfloat16", item_s=0.2, need_s=0.5),
        train=dict(arch="qwen2-tiny", prompts=2, group=2, new_tokens=6, grad_accum=2, score_rows=2)),
}

# Tolerances: max |got - ref| / max |ref| against float64 on the same rounded inputs (as tests/test_kernels.py).
# Values accumulate in fp32 for every input dtype; gradients come back in the input dtype (bf16: 2^-8 and dz
# rounded to bf16 for the tensor cores); fp32 gradients sum 10^5 vocabulary terms: 1e-4.
TOL = {"float32": dict(values=1e-5, grads=1e-4), "bfloat16": dict(values=1e-5, grads=1.5e-2)}
# Chapter 07 / issue 8 targets on an H100.
TARGETS = dict(fb_vs_naive=1.0, fb_vs_matmul_largest=1.5, mem_vs_naive=0.05)
# Training step, fused vs unfused in bf16: the unfused head rounds the logits to bf16 before the softmax (the
# fused head keeps them in fp32), so per-token values differ by that rounding and gradients by its effect.
# The first minibatch's loss does not depend on the values (its ratio is exactly 1): equal to 1e-6.
TRAIN_TOL = dict(fused_vs_fp64_logp=1e-3, loss_rel=1e-6, grad_rel_l2=3e-2, grad_cosine=0.999)
LOGITS_STD = 3.0   # random inputs are scaled to logits of about this standard deviation, like a trained LM's


# ----------------------------------------------------------------------------------------------- records
class Part:
    "What one section found; written to its JSON file after every item, so a killed section keeps what it had."

    def __init__(self, path: str, name: str, budget_s: float):
        self.path, self.budget, self.t0 = path, budget_s, time.perf_counter()
        self.data = {"section": name, "items": [], "errors": [], "notes": [], "info": {}}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.data["notes"].append(text)
        self.save()

    def item(self, name: str, fn, need_s: float = 1.0) -> dict:
        "Run fn() -> dict and record it (with its seconds) or its exception; skip it when under need_s is left."
        if self.left() < need_s:
            r = {"name": name, "ok": None, "skipped": f"time budget: {self.left():.0f} s left, needs ~{need_s:.0f} s"}
        else:
            t = time.perf_counter()
            try:
                r = {"name": name, **fn()}
            except Exception as e:  # recorded; the section goes on with its next item
                r = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:1000],
                     "trace": traceback.format_exc()[-2500:]}
                free_memory()
            r["seconds"] = round(time.perf_counter() - t, 3)
        self.data["items"].append(r)
        self.save()
        print(f"  {_verdict(r.get('ok')):>4}  {name}  {_item_brief(r)}", flush=True)
        return r


def _verdict(ok) -> str:
    return {True: "ok", False: "FAIL", None: "--"}[ok]


def _item_brief(r: dict) -> str:
    if "error" in r:
        return r["error"].splitlines()[0][:160]
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    keys = [k for k in r if k.startswith("err_") or k in ("fb_ms", "fwd_ms", "peak_mb", "oom", "s_per_step")]
    return " ".join(f"{k}={_fmt(r[k])}" for k in keys)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def free_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- helpers
def environment(dev: str) -> dict:
    "Device, library versions and Triton mode of this process."
    import torch
    import triton
    import transformers
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        name = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor})"
    else:
        name = f"CPU ({os.cpu_count()} cores visible)"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}   # False: fp32 heads use full fp32


def sync(dev: str) -> None:
    import torch
    if dev == "cuda":
        torch.cuda.synchronize()


def make_case(n: int, d: int, v: int, dtype, dev: str, seed: int = 0, logits_std: float = LOGITS_STD,
              ignore_every: int = 5, ignore_index: int = -100):
    "hidden [n, d], weight [v, d] (logits of about `logits_std`), labels [n] with every k-th row ignored (row 0 too)."
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    h = torch.randn(n, d, generator=g, device=dev)
    w = torch.randn(v, d, generator=g, device=dev).mul_(logits_std / d ** 0.5)
    y = torch.randint(0, v, (n,), generator=g, device=dev)
    if ignore_every:
        y[::ignore_every] = ignore_index
    return h.to(dtype), w.to(dtype), y


def rel_err(got, ref) -> float:
    "max |got - ref| / max |ref| in float64."
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(fn, h, w, y, a, b, **kw):
    "Values of fn and the gradients of sum(a * logp + b * H) with respect to hidden and weight."
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    lp, H = fn(h, w, y, **kw)
    (lp.double() * a + H.double() * b).sum().backward()
    return lp.detach(), H.detach(), h.grad, w.grad


def output_weights(n: int, dev: str, seed: int = 1):
    "Random float64 weights a, b on the two outputs, so both gradient paths carry signal."
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    return (torch.randn(n, generator=g, device=dev, dtype=torch.float64),
            torch.randn(n, generator=g, device=dev, dtype=torch.float64))


def triton_head(h, w, y, **kw):
    from entropy_rl.kernels import triton_logprob_entropy
    return triton_logprob_entropy(h, w, y, **kw)


def naive_head(h, w, y, **kw):
    from entropy_rl.kernels import naive_logprob_entropy
    return naive_logprob_entropy(h, w, y, **kw)


def chunked_head(h, w, y, **kw):
    from entropy_rl.kernels import chunked_logprob_entropy
    return chunked_logprob_entropy(h, w, y, **kw)


HEADS = {"triton": triton_head, "torch": chunked_head}


def against_fp64(fn, h, w, y, tol: dict, temperature: float = 1.0, ignore_index: int = -100, **kw) -> dict:
    "Errors of fn's values and gradients against the float64 naive head on the same inputs; ok within `tol`."
    a, b = output_weights(len(y), h.device.type)
    lp, H, dh, dw = outputs_and_grads(fn, h, w, y, a, b, temperature=temperature, ignore_index=ignore_index, **kw)
    ref = outputs_and_grads(naive_head, h.double(), w.double(), y, a, b, temperature=temperature,
                            ignore_index=ignore_index)
    ign = y == ignore_index
    r = {"err_logp": rel_err(lp, ref[0]), "err_entropy": rel_err(H, ref[1]),
         "err_dhidden": rel_err(dh, ref[2]), "err_dweight": rel_err(dw, ref[3]),
         "max_logp": lp.max().item(), "min_entropy": H.min().item(),
         "ignored_rows_zero": bool((lp[ign] == 0).all() and (H[ign] == 0).all() and (dh[ign] == 0).all()),
         "dtypes_ok": str(lp.dtype) == str(H.dtype) == "torch.float32" and dh.dtype == h.dtype and dw.dtype == w.dtype,
         "tol": tol}
    r["ok"] = (r["err_logp"] < tol["values"] and r["err_entropy"] < tol["values"]
               and r["err_dhidden"] < tol["grads"] and r["err_dweight"] < tol["grads"]
               and r["max_logp"] <= 0 and r["min_entropy"] >= 0 and r["ignored_rows_zero"] and r["dtypes_ok"])
    return r


# ------------------------------------------------------------------------------------- correctness
def section_correctness(part: Part, cfg: dict, dev: str) -> None:
    "Triton values and gradients against float64 at each vocabulary size and dtype; ignore labels, temperature, tied weights."
    import torch
    n, d, temp = cfg["n"], cfg["d"], cfg["temperature"]
    for v in cfg["vs"]:
        for dt in cfg["dtypes"]:
            part.item(f"triton V={v} {dt} T={temp} ignore_index=-100 (every 5th row)",
                      lambda v=v, dt=dt: against_fp64(triton_head, *make_case(n, d, v, getattr(torch, dt), dev, seed=v),
                                                      TOL[dt], temperature=temp))
    v = cfg["vs"][1]
    part.item(f"triton V={v} float32 T=1.3 ignore_index=-1 (every 3rd row)",
              lambda: against_fp64(triton_head, *make_case(n, d, v, torch.float32, dev, seed=2, ignore_every=3,
                                                           ignore_index=-1), TOL["float32"], temperature=1.3,
                                   ignore_index=-1))
    for dt in cfg["dtypes"]:
        part.item(f"triton tied weights (head = input embedding) V={v} {dt}", lambda dt=dt: tied_weights(n, d, v, dt, dev))
    part.item(f"auto backend on {dev}", lambda: auto_backend(n, d, v, dev))


def tied_weights(n: int, d: int, v: int, dtype_name: str, dev: str) -> dict:
    "hidden = E[ids] and the head's weight is E: both gradient contributions to E must match float64."
    import torch
    dt = getattr(torch, dtype_name)
    g = torch.Generator(device=dev).manual_seed(7)
    ids = torch.randint(0, v, (n,), generator=g, device=dev)
    y = torch.randint(0, v, (n,), generator=g, device=dev)
    y[::4] = -100
    e0 = torch.randn(v, d, generator=g, device=dev).mul_((LOGITS_STD / d ** 0.5) ** 0.5).to(dt)   # rounded once
    a, b = output_weights(n, dev)
    grads = []
    for fn, t in ((triton_head, dt), (naive_head, torch.float64)):
        e = e0.to(t).clone().requires_grad_()  # the gather is exact, so both see the same hidden states
        lp, H = fn(e[ids], e, y, temperature=0.8)
        (lp.double() * a + H.double() * b).sum().backward()
        grads.append(e.grad)
    err = rel_err(grads[0], grads[1])
    return {"err_dweight": err, "tol": TOL[dtype_name]["grads"], "ok": err < TOL[dtype_name]["grads"]}


def auto_backend(n: int, d: int, v: int, dev: str) -> dict:
    "backend='auto' is the Triton head on CUDA (the chunked torch head elsewhere), bit for bit."
    import torch
    from entropy_rl.kernels import fused_logprob_entropy
    h, w, y = make_case(n, d, v, torch.bfloat16, dev, seed=4)
    got = fused_logprob_entropy(h, w, y)
    expect_name = "triton" if dev == "cuda" else "torch"
    expect = HEADS[expect_name](h, w, y)
    same = all(torch.equal(a, b) for a, b in zip(got, expect))
    return {"expected_backend": expect_name, "identical": same, "ok": same}


# ---------------------------------------------------------------------------------------- failures
def section_failures(part: Part, cfg: dict, dev: str) -> None:
    "The failure classes of MECHANISMS.md §6, each on the Triton head."
    import torch
    n, d, v, vp = cfg["n"], cfg["d"], cfg["v"], cfg["v_prime"]
    for blocks in (dict(BLOCK_V=64, num_splits=7), dict(BLOCK_V=128, num_splits=1)):
        part.item(f"verl#2899 vocabulary not a multiple of the tile: V={vp} (prime), tiles {blocks}",
                  lambda b=blocks: against_fp64(triton_head, *make_case(n, d, vp, torch.float32, dev, seed=3),
                                                TOL["float32"], temperature=0.9, blocks=b))
    for dt in ("float32", "bfloat16"):
        part.item(f"verl#2656 no positive log-probs: logits ~60, label = argmax, V={v} {dt}",
                  lambda dt=dt: large_logits(n, d, v, dt, dev))
    part.item(f"verl#3723 sequence parallelism: uneven token shards, V={v}", lambda: token_shards(n, d, v, dev))
    part.item(f"liger#1338 ignore rows under torch.compile (backend={cfg['compile_backend']}, "
              f"{cfg['compile_head']} head), V={vp}",
              lambda: compiled_ignore_rows(n, d, vp, dev, cfg["compile_backend"], HEADS[cfg["compile_head"]]), need_s=5.0)
    part.item("no tokens; every row ignored", lambda: empty_and_all_ignored(d, v, dev))


def large_logits(n: int, d: int, v: int, dtype_name: str, dev: str) -> dict:
    "Huge logits stress the log-sum-exp: log p <= 0 and H >= 0 everywhere, and close to float64 in absolute terms."
    import torch
    h, w, _ = make_case(n, d, v, getattr(torch, dtype_name), dev, seed=5, logits_std=60.0, ignore_every=0)
    y_top = (h.double() @ w.double().T).argmax(1)
    g = torch.Generator(device=dev).manual_seed(6)
    y_rand = torch.randint(0, v, (n,), generator=g, device=dev)
    r = {}
    for tag, y in (("argmax", y_top), ("random", y_rand)):
        lp, H = triton_head(h, w, y)
        ref = naive_head(h.double(), w.double(), y)
        r[f"max_logp_{tag}"] = lp.max().item()
        r[f"min_entropy_{tag}"] = H.min().item()
        r[f"err_logp_{tag}"] = (lp.double() - ref[0]).abs().max().item() / max(1.0, ref[0].abs().max().item())
        r[f"err_entropy_{tag}"] = (H.double() - ref[1]).abs().max().item() / max(1.0, ref[1].abs().max().item())
    r["tol"] = 1e-4   # |error| / max(1, max |ref|): fp32 sums of D terms of size ~60/sqrt(D)
    r["ok"] = (all(r[f"max_logp_{t}"] <= 0 and r[f"min_entropy_{t}"] >= 0 for t in ("argmax", "random"))
               and all(r[k] < r["tol"] for k in r if k.startswith("err_")))
    return r


def token_shards(n: int, d: int, v: int, dev: str) -> dict:
    "Tokens split into uneven shards (as sequence parallelism does) give the same values, dh, and dW once summed."
    import torch
    h, w, y = make_case(n, d, v, torch.float32, dev, seed=11)
    a, b = output_weights(n, dev)
    full = outputs_and_grads(triton_head, h, w, y, a, b)
    cuts = sorted({0, n // 5 + 1, (2 * n) // 3 + 1, n})
    parts = [outputs_and_grads(triton_head, h[i:j], w, y[i:j], a[i:j], b[i:j]) for i, j in zip(cuts, cuts[1:])]
    lp, H = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    dh, dw = torch.cat([p[2] for p in parts]), sum(p[3] for p in parts)
    strided = h.t().contiguous().t()          # same values, column-major strides
    lp_s, H_s = triton_head(strided, w, y)
    r = {"shards": [j - i for i, j in zip(cuts, cuts[1:])], "err_logp": rel_err(lp, full[0]),
         "err_entropy": rel_err(H, full[1]), "err_dhidden": rel_err(dh, full[2]), "err_dweight": rel_err(dw, full[3]),
         "strided_input_identical": bool(torch.equal(lp_s, full[0]) and torch.equal(H_s, full[1])), "tol": 1e-5}
    r["ok"] = r["strided_input_identical"] and all(r[k] < r["tol"] for k in r if k.startswith("err_"))
    return r


def compiled_ignore_rows(n: int, d: int, v: int, dev: str, backend: str, head) -> dict:
    "A loss over the head with ignore rows: compiled and eager agree with each other and with float64."
    import torch
    h, w, y = make_case(n, d, v, torch.float32, dev, seed=13, ignore_every=3)
    c = torch.linspace(-1, 1, n, device=dev)

    def loss(fn, hh, ww):
        lp, H = fn(hh, ww, y, temperature=0.8)
        return (lp * c).sum() + 0.3 * H.sum()

    compiled = torch.compile(lambda hh, ww: loss(head, hh, ww), backend=backend)
    runs = []
    for f, dt in ((lambda hh, ww: loss(head, hh, ww), torch.float32), (compiled, torch.float32),
                  (lambda hh, ww: loss(naive_head, hh, ww), torch.float64)):
        hh, ww = h.detach().to(dt).clone().requires_grad_(), w.detach().to(dt).clone().requires_grad_()
        val = f(hh, ww)
        val.backward()
        runs.append((val.detach().double(), hh.grad, ww.grad))
    torch._dynamo.reset()
    (le, dhe, dwe), (lc, dhc, dwc), (lr, dhr, dwr) = runs
    ign = y == -100
    r = {"err_loss_compiled_vs_eager": rel_err(lc, le), "err_dhidden_compiled_vs_eager": rel_err(dhc, dhe),
         "err_dweight_compiled_vs_eager": rel_err(dwc, dwe), "err_loss_vs_fp64": rel_err(lc, lr),
         "err_dhidden_vs_fp64": rel_err(dhc, dhr), "err_dweight_vs_fp64": rel_err(dwc, dwr),
         "ignored_rows_zero_grad": bool((dhc[ign] == 0).all()), "tol": 1e-4}
    r["ok"] = r["ignored_rows_zero_grad"] and all(r[k] < r["tol"] for k in r if k.startswith("err_"))
    return r


def empty_and_all_ignored(d: int, v: int, dev: str) -> dict:
    "N = 0 gives empty outputs that still backpropagate; rows that are all ignored give zeros and zero gradients."
    import torch
    h, w, _ = make_case(8, d, v, torch.float32, dev, seed=17)
    e = h[:0].clone().requires_grad_()
    w0 = w.clone().requires_grad_()
    lp, H = triton_head(e, w0, torch.zeros(0, dtype=torch.long, device=dev))
    (lp.sum() + H.sum()).backward()
    empty_ok = lp.shape == H.shape == (0,) and (w0.grad is None or bool((w0.grad == 0).all()))
    a, b = output_weights(8, dev)
    lp, H, dh, dw = outputs_and_grads(triton_head, h, w, torch.full((8,), -100, device=dev), a, b)
    ignored_ok = bool((lp == 0).all() and (H == 0).all() and (dh == 0).all() and (dw == 0).all())
    return {"empty_ok": empty_ok, "all_ignored_ok": ignored_ok, "ok": empty_ok and ignored_ok}


# --------------------------------------------------------------------------------------------- speed
def section_speed(part: Part, cfg: dict, dev: str) -> None:
    "Every head and the bf16 matmul at each shape, side by side: time, TFLOP/s and peak memory of forward+backward."
    import torch
    dtype, d = getattr(torch, cfg["dtype"]), cfg["d"]
    heads = speed_heads(part, dev)
    part.data["info"]["impls"] = ["matmul", *heads]
    for m, v in cfg["shapes"]:
        if part.left() < cfg["need_s"]:
            part.note(f"M={m} V={v} skipped: {part.left():.0f} s left in the section's budget")
            continue
        h, w, y = make_case(m, d, v, dtype, dev, seed=m + v, ignore_every=16)
        h.requires_grad_()
        w.requires_grad_()
        shape = {"m": m, "d": d, "v": v, "dtype": cfg["dtype"], "logits_fp32_mb": m * v * 4 / 2**20,
                 "grads_mb": (m + v) * d * h.element_size() / 2**20}
        ref = {}
        part.item(f"M={m} V={v} matmul", lambda: {**shape, "impl": "matmul",
                                                  **measure(matmul_pair(), h, w, y, dev, cfg["item_s"])},
                  need_s=cfg["need_s"])
        for name, head in heads.items():
            part.item(f"M={m} V={v} {name}", lambda name=name, head=head: {
                **shape, "impl": name, **measure(head_pair(head), h, w, y, dev, cfg["item_s"], ref, name)}, need_s=cfg["need_s"])
        del h, w, y, ref
        free_memory()


def speed_heads(part: Part, dev: str) -> dict:
    "name -> head(h, w, y) -> (logp, entropy or None): ours, the trainer's unfused path, and Liger's when it imports."
    import torch.nn.functional as F
    from entropy_rl.entropy import entropy_from_logits, logprobs_from_logits
    from entropy_rl.kernels import fused_logprob_entropy

    def ours(backend):
        return lambda h, w, y: fused_logprob_entropy(h, w, y, backend=backend)

    def unfused(h, w, y):   # Trainer(fused=False): logits in the input dtype, then fp32 log-softmax and entropy
        z = F.linear(h, w)
        return logprobs_from_logits(z, y), entropy_from_logits(z)

    heads = {"triton": ours("triton"), "torch": ours("torch")}
    heads.update(liger_heads(part, dev))
    heads.update({"unfused": unfused, "naive": ours("naive")})
    return heads


def liger_heads(part: Part, dev: str) -> dict:
    "Liger's fused linear cross-entropy with entropy, and its log-prob-only fused linear cross-entropy, if they import."
    import torch
    try:
        from liger_kernel.ops import fused_linear_scaled_cross_entropy as lsce
    except Exception as e:
        part.note(f"Liger skipped: liger-kernel does not import ({type(e).__name__}: {e})")
        return {}
    info = part.data["info"]
    try:   # on sm_90 this loads Liger's CuTe kernel, which needs nvidia-cutlass-dsl
        impl = lsce._resolve_implementation(torch.device(dev))
        info["liger_entropy_impl"] = impl.__name__

        def scaled(h, w, y):
            return lsce.LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, y, 1.0, -100, 1, True)
    except Exception as e:
        info["liger_entropy_impl"] = "_FusedLinearPPOFallbackFunction"
        part.note(f"Liger's own entropy kernel does not load ({type(e).__name__}: {e}); measuring its torch fallback "
                  "(512-token chunks) instead")

        def scaled(h, w, y):
            return lsce._FusedLinearPPOFallbackFunction.apply(h, w, y, 1.0, -100, True)

    def liger_entropy(h, w, y):
        nll, ent = scaled(h, w, y)
        return -nll, ent

    heads = {"liger_entropy": liger_entropy}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce
        heads["liger_flce"] = lambda h, w, y: (-flce(h, w, y, reduction="sum"), None)   # summed log-prob, no entropy
    except Exception as e:
        part.note(f"Liger's fused linear cross-entropy skipped ({type(e).__name__}: {e})")
    return heads


def head_pair(head):
    "(forward, forward+backward) of a head; the backward weighs both outputs."
    import torch

    def fwd(h, w, y):
        with torch.no_grad():
            return head(h, w, y)

    def fwd_bwd(h, w, y):
        lp, H = head(h, w, y)
        loss = lp.sum() if H is None else lp.sum() + 0.1 * H.sum()
        loss.backward()
        h.grad = w.grad = None
    return fwd, fwd_bwd


def matmul_pair():
    """The matmul limit as bench/kernels.py defines it (z = h W^T; forward+backward adds dh = dz W and dW = dz^T h),
    so that both benchmarks compare against the same work."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
    bench_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernels)
    return bench_kernels.make_impls("cpu")["matmul"]   # "cpu": builds no Triton or Liger closures; works on any device


def timed(fn, dev: str, item_s: float, peak: bool = False):
    "One warm-up call, then the median of as many calls (1-5) as fit in item_s; with peak, extra peak memory (MiB)."
    import torch
    from entropy_rl.kernels import cpu_peak_memory_mb
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    warm = time.perf_counter() - t
    reps = max(1, min(5, int(item_s / max(warm, 1e-9))))
    peak_mb = None
    if dev == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(reps):
        t = time.perf_counter()
        if peak and dev == "cpu" and i == 0:
            peak_mb, out = cpu_peak_memory_mb(fn)
        else:
            out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    if peak and dev == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), reps, warm, out, peak_mb


def measure(pair, h, w, y, dev: str, item_s: float, ref: dict | None = None, name: str = "") -> dict:
    "Forward and forward+backward time, TFLOP/s (2MDV, 6MDV) and peak memory; out of memory is a result, not a failure."
    import torch
    fwd, fwd_bwd = pair
    m, d, v = h.shape[0], h.shape[1], w.shape[0]
    r = {}
    try:
        t_f, reps_f, warm_f, out, _ = timed(lambda: fwd(h, w, y), dev, item_s)
        agree = {} if ref is None else agreement(out, ref, name, y != -100)
        del out
        t_fb, reps_fb, warm_fb, _, peak = timed(lambda: fwd_bwd(h, w, y), dev, item_s, peak=True)
    except torch.cuda.OutOfMemoryError as e:
        h.grad = w.grad = None
        free_memory()
        return {"oom": True, "ok": None, "note": str(e).splitlines()[0][:200]}
    r.update(fwd_ms=t_f * 1e3, fb_ms=t_fb * 1e3, peak_mb=peak, reps=[reps_f, reps_fb],
             first_call_ms=[warm_f * 1e3, warm_fb * 1e3], tflops_fwd=2 * m * d * v / t_f / 1e12,
             tflops_fb=6 * m * d * v / t_fb / 1e12, **agree)
    r["ok"] = r.get("agrees", True)
    return r


def agreement(out, ref: dict, name: str, valid) -> dict:
    "The first head measured at a shape (Triton) is the reference; later heads' forward values are compared with it."
    if not isinstance(out, tuple):
        return {}
    lp, H = out
    if lp.dim() == 0:           # a summed log-prob (Liger's cross-entropy): compare the sums
        if "logp_sum" not in ref:
            return {}
        diff = abs(lp.item() - ref["logp_sum"]) / max(1.0, abs(ref["logp_sum"]))
        return {"agreement_ref": ref["name"], "rel_diff_logp_sum": diff, "agrees": diff < 1e-3}
    if not ref:
        ref.update(name=name, logp=lp.float(), entropy=H.float(), logp_sum=lp.double().sum().item())
        return {}
    d_lp = (lp.float() - ref["logp"])[valid].abs().max().item()     # ignored rows: the unfused path does not zero H
    d_h = (H.float() - ref["entropy"])[valid].abs().max().item()
    # logits rounded to bf16 (the unfused path, Liger's fallback) move z by up to 2^-9 |z|: allow 0.1 nats
    return {"agreement_ref": ref["name"], "max_abs_diff_logp": d_lp, "max_abs_diff_entropy": d_h,
            "agrees": d_lp < 0.1 and d_h < 0.1}


# --------------------------------------------------------------------------------------------- train
ARCHS = {   # sizes of the published configs; random weights, no download
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32_768,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "smollm2-1.7b": ("llama", dict(vocab_size=49_152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2-tiny": ("qwen2", dict(vocab_size=1009, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True)),
}


def random_model(arch: str, dev: str, seed: int = 0):
    """A randomly initialised bf16 causal LM of a real architecture, a tokenizer covering its whole vocabulary, and
    the device its weights were initialised on."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from entropy_rl.models import tiny_tokenizer
    kind, sizes = ARCHS[arch]
    tok = tiny_tokenizer()   # characters for the prompts; filler tokens for the ids a random model samples
    tok.add_tokens([f"<v{i}>" for i in range(sizes["vocab_size"] - len(tok))])
    cfg = AutoConfig.for_model(kind, **sizes, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    built_on = str(next(model.parameters()).device)
    model = model.to(dev).eval()
    gc_ = model.generation_config
    gc_.pad_token_id, gc_.eos_token_id, gc_.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    return model, tok, built_on


def crc_reward(text: str, problem) -> float:
    "A deterministic reward that varies within a group, so that advantages (and gradients) are not zero."
    return float(zlib.crc32(text.encode()) % 2)


class Replay:
    "Stands in for the trainers' rollout engine: the first generate() samples, every later call returns that batch."

    def __init__(self):
        self.engine = self.batch = None
        self.seconds = 0.0

    def attach(self, engine):
        self.engine = self.engine or engine
        return self

    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def release(self) -> None:
        self.engine.release()

    def generate(self, *args, **kwargs):
        if self.batch is None:
            t = time.perf_counter()
            self.batch = self.engine.generate(*args, **kwargs)
            self.seconds = time.perf_counter() - t
        return self.batch


def rlvr_update(st: dict, fused: bool) -> dict:
    "One Trainer.train_step from the initial weights on the replayed rollout; the gradients of its optimizer step."
    import torch
    from entropy_rl.trainer import Trainer
    model, cfg, dev = st["model"], st["cfg"], st["dev"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(st["init"][name])
    conf = dict(model=cfg["arch"], steps=1, prompts_per_step=cfg["prompts"], group_size=cfg["group"],
                max_new_tokens=cfg["new_tokens"], grad_accum=cfg["grad_accum"], lr=1e-5, max_grad_norm=1e9,
                fused=fused, output_dir=st["tmp"], progress=False, plot=False, seed=0)
    trainer = Trainer(conf, policy=model, tokenizer=st["tok"], reward_fn=crc_reward)
    trainer.engine = st["replay"].attach(trainer.engine)
    names = {p: n for n, p in model.named_parameters()}
    grads = {}

    def grab(opt, args, kwargs):   # before the optimizer step: the (unclipped: max_grad_norm=1e9) gradients
        grads.update({names[p]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                      if p.grad is not None})
    hook = trainer.optimizer.optimizer.register_step_pre_hook(grab)
    base = 0
    if dev == "cuda":
        sync(dev)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    try:
        metrics = trainer.train_step(0)
    finally:
        hook.remove()
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev == "cuda" else None
    del trainer
    free_memory()
    if "loss" not in metrics:
        raise RuntimeError(f"the step made no update: {sorted(metrics)}")
    keep = ("loss", "entropy", "grad_norm", "time_step_s", "train_tokens_per_s", "tokens_per_s", "response_len",
            "reward_mean")
    times = {k: v for k, v in metrics.items() if k.startswith("time_") and k != "time_step_s"}
    # the head works in the scoring pass (old log-probs) and in the update: everything but the rollout
    return {"fused": fused, **{k: metrics[k] for k in keep if k in metrics}, **times,
            "s_per_step": metrics["time_step_s"] - metrics.get("time_rollout_s", 0.0), "extra_peak_gib": peak_gib,
            "grads": grads}


def grad_difference(ga: dict, gb: dict) -> dict:
    "Relative L2 difference and cosine of two whole gradients (and the tensor that differs most, for information)."
    num = den = dot = na = 0.0
    worst, worst_name = 0.0, None
    for k, b in gb.items():
        a, b = ga[k].double(), b.double()
        dd, bb = (a - b).pow(2).sum().item(), b.pow(2).sum().item()
        num, den, dot, na = num + dd, den + bb, dot + (a * b).sum().item(), na + a.pow(2).sum().item()
        if bb > 0 and math.sqrt(dd / bb) > worst:
            worst, worst_name = math.sqrt(dd / bb), k
    if set(ga) != set(gb):
        raise RuntimeError(f"the two updates gave gradients for different parameters: {sorted(set(ga) ^ set(gb))[:5]}")
    return {"rel_l2": math.sqrt(num / max(den, 1e-300)), "cosine": dot / max(math.sqrt(na * den), 1e-300),
            "worst_tensor": worst_name, "worst_tensor_rel_l2": worst, "n_tensors": len(gb)}


def head_values(st: dict) -> dict:
    "Per-token log-probs and entropies of the replayed batch: fused and unfused heads against a float64 head."
    import torch
    from entropy_rl.kernels import naive_logprob_entropy
    from entropy_rl.trainer import _response_hidden, policy_logprobs_and_entropy
    model, b, dev = st["model"], st["replay"].batch, st["dev"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(st["init"][name])
    ids = torch.cat([b.prompt_ids, b.response_ids], 1).to(dev)
    attn = torch.cat([b.prompt_mask.long(), b.response_mask.long()], 1).to(dev)
    mask = b.response_mask.bool().to(dev)
    T, W = mask.shape[1], model.get_output_embeddings().weight
    W64 = W.detach().double()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    err = {"fused": [0.0, 0.0], "unfused": [0.0, 0.0]}
    with torch.no_grad(), amp:
        for i in range(0, ids.shape[0], st["cfg"]["score_rows"]):
            sl = slice(i, i + st["cfg"]["score_rows"])
            hid = _response_hidden(model, ids[sl], attn[sl], T)
            labels = ids[sl, -T:].masked_fill(~mask[sl], -100).reshape(-1)
            ref = naive_logprob_entropy(hid.reshape(-1, hid.shape[-1]).double(), W64, labels)
            for key, fused in (("fused", True), ("unfused", False)):
                lp, H = policy_logprobs_and_entropy(model, ids[sl], attn[sl], mask[sl], 1.0, fused)
                err[key][0] = max(err[key][0], (lp.reshape(-1).double() - ref[0]).abs().max().item())
                err[key][1] = max(err[key][1], (H.reshape(-1).double() - ref[1]).abs().max().item())
    tol = TRAIN_TOL["fused_vs_fp64_logp"]
    return {"fused_max_abs_err_logp": err["fused"][0], "fused_max_abs_err_entropy": err["fused"][1],
            "unfused_max_abs_err_logp": err["unfused"][0], "unfused_max_abs_err_entropy": err["unfused"][1],
            "tol_fused": tol, "tokens": int(mask.sum()), "ok": max(err["fused"]) < tol}


def section_train(part: Part, cfg: dict, dev: str) -> None:
    "One RLVR update at real scale through the Trainer, fused head on and off, on one recorded rollout."
    import torch
    st = {"cfg": cfg, "dev": dev, "replay": Replay(), "tmp": tempfile.mkdtemp(prefix="gpu_check_train_")}

    def build():
        t = time.perf_counter()
        st["model"], st["tok"], built_on = random_model(cfg["arch"], dev)
        st["init"] = {n: p.detach().clone() for n, p in st["model"].named_parameters()}
        n_params = sum(p.numel() for p in st["model"].parameters())
        return {"arch": cfg["arch"], "params": n_params, "vocab": ARCHS[cfg["arch"]][1]["vocab_size"],
                "dtype": "bfloat16", "initialised_on": built_on, "build_s": time.perf_counter() - t, "ok": True}

    def update(fused, key, against=None):
        def run():
            r = rlvr_update(st, fused)
            grads = r.pop("grads")
            if against is None:
                st[key], st[key + "_loss"] = grads, r["loss"]
            else:   # a repeat of the same configuration: how far two identical updates differ (atomics, kernels)
                r["repeat_vs_first"] = grad_difference(grads, st[against])
            if st["replay"].seconds and "rollout_s" not in st:
                st["rollout_s"] = r["rollout_s"] = st["replay"].seconds
            r["ok"] = math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
            return r
        return run

    def compare():
        r = grad_difference(st["grads_fused"], st["grads_unfused"])
        lf, lu = st["grads_fused_loss"], st["grads_unfused_loss"]
        r["loss_fused"], r["loss_unfused"] = lf, lu
        r["loss_rel_diff"] = abs(lf - lu) / max(1.0, abs(lu))
        r["tol"] = {k: TRAIN_TOL[k] for k in ("loss_rel", "grad_rel_l2", "grad_cosine")}
        r["ok"] = (r["loss_rel_diff"] <= TRAIN_TOL["loss_rel"] and r["rel_l2"] < TRAIN_TOL["grad_rel_l2"]
                   and r["cosine"] > TRAIN_TOL["grad_cosine"])
        return r

    need = 20.0 if dev == "cuda" else 2.0
    try:
        part.item(f"build {cfg['arch']} (random init, bf16)", build, need_s=need)
        part.item("update, fused head (samples the rollout)", update(True, "grads_fused"), need_s=need)
        part.item("update, unfused head", update(False, "grads_unfused"), need_s=need)
        part.item("gradients: fused vs unfused", compare)
        part.item("update, fused head again (timed warm)", update(True, None, "grads_fused"), need_s=need)
        part.item("update, unfused head again (timed warm)", update(False, None, "grads_unfused"), need_s=need)
        part.item("per-token log-probs and entropies vs float64", lambda: head_values(st), need_s=need / 2)
    finally:
        shutil.rmtree(st["tmp"], ignore_errors=True)


# ------------------------------------------------------------------------------------ targets, summary
def speed_table(items: list) -> dict:
    "(m, v) -> impl -> measured item, in the order measured."
    table = {}
    for it in items:
        if "impl" in it:
            table.setdefault((it["m"], it["v"]), {})[it["impl"]] = it
    return table


def _measured(it) -> bool:
    return bool(it) and it.get("fb_ms") is not None


def evaluate_targets(items: list) -> list:
    """Chapter 07's targets for the Triton head: forward+backward never slower than naive; within 1.5x of the
    matmul at the largest shape; peak memory under 5% of naive's. Each with its ratio and, when missed, by how much."""
    table = speed_table(items)
    out = []

    def judge(target, shape, ratio, limit, strict, why=""):
        met = None if ratio is None else (ratio < limit if strict else ratio <= limit)
        out.append({"target": target, "shape": shape, "ratio": ratio, "limit": limit, "met": met,
                    "missed_by": (ratio / limit if met is False else None), "why": why})

    for (m, v), row in table.items():
        tri, naive, shape = row.get("triton"), row.get("naive"), f"M={m} V={v}"
        if not _measured(tri):
            judge("fwd+bwd <= naive", shape, None, TARGETS["fb_vs_naive"], False, "Triton not measured")
            judge("peak < 5% of naive", shape, None, TARGETS["mem_vs_naive"], True, "Triton not measured")
            continue
        if _measured(naive):
            judge("fwd+bwd <= naive", shape, tri["fb_ms"] / naive["fb_ms"], TARGETS["fb_vs_naive"], False)
            if naive["peak_mb"] > 0:
                judge("peak < 5% of naive", shape, tri["peak_mb"] / naive["peak_mb"], TARGETS["mem_vs_naive"], True)
            else:
                judge("peak < 5% of naive", shape, None, TARGETS["mem_vs_naive"], True,
                      "naive's peak below the meter's resolution")
        elif naive and naive.get("oom"):   # naive cannot run at all; it needs at least the fp32 logits
            judge("fwd+bwd <= naive", shape, 0.0, TARGETS["fb_vs_naive"], False, "naive ran out of memory")
            judge("peak < 5% of naive", shape, tri["peak_mb"] / tri["logits_fp32_mb"], TARGETS["mem_vs_naive"], True,
                  "naive ran out of memory: against the fp32 logits alone, a lower bound of its peak")
        else:
            judge("fwd+bwd <= naive", shape, None, TARGETS["fb_vs_naive"], False, "naive not measured")
            judge("peak < 5% of naive", shape, None, TARGETS["mem_vs_naive"], True, "naive not measured")
    if table:
        m, v = max(table, key=lambda k: k[0] * k[1])
        tri, mm = table[(m, v)].get("triton"), table[(m, v)].get("matmul")
        ok = _measured(tri) and _measured(mm)
        judge("fwd+bwd <= 1.5x matmul (largest shape)", f"M={m} V={v}", tri["fb_ms"] / mm["fb_ms"] if ok else None,
              TARGETS["fb_vs_matmul_largest"], False, "" if ok else "Triton or matmul not measured")
    return out


def _items_line(sec: dict) -> str:
    items = sec.get("items", [])
    ok = sum(1 for i in items if i.get("ok") is True)
    bad = sum(1 for i in items if i.get("ok") is False)
    skipped = sum(1 for i in items if "skipped" in i)
    s = f"{ok}/{len(items)} ok"
    if bad:
        s += f", {bad} FAILED"
    if skipped:
        s += f", {skipped} skipped (time)"
    return s


def _worst(items: list, keys: tuple) -> float | None:
    vals = [i[k] for i in items for k in keys if isinstance(i.get(k), (int, float))]
    return max(vals) if vals else None


def _correctness_line(sec: dict) -> str:
    items = sec.get("items", [])
    parts = [_items_line(sec)]
    for dt in TOL:
        its = [i for i in items if f" {dt} " in i["name"] or i["name"].endswith(f" {dt}")]
        v, g = _worst(its, ("err_logp", "err_entropy")), _worst(its, ("err_dhidden", "err_dweight"))
        if v is not None or g is not None:
            parts.append(f"{dt}: worst values {_sci(v)} (tol {TOL[dt]['values']:g}), "
                         f"grads {_sci(g)} (tol {TOL[dt]['grads']:g})")
    return "; ".join(parts)


def _mib(mb: float) -> str:
    return f"{mb / 1024:.3g} GiB" if mb >= 1024 else f"{mb:.3g} MiB"


def _sci(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def _speed_lines(sec: dict) -> list:
    items = sec.get("items", [])
    table = speed_table(items)
    lines = [_items_line(sec)]
    for (m, v), row in table.items():
        cells = []
        for name, it in row.items():
            if it.get("oom"):
                cells.append(f"{name} OOM")
            elif _measured(it):
                cells.append(f"{name} {it['fb_ms']:.4g} ms {it['tflops_fb']:.3g} TF/s {_mib(it['peak_mb'])}")
            elif "error" in it or "skipped" in it:
                cells.append(f"{name} {'error' if 'error' in it else 'skipped'}")
        d = next(iter(row.values())).get("d")
        lines.append(f"M={m} V={v} D={d} fwd+bwd: " + " | ".join(cells))
    verdicts = {}
    for t in evaluate_targets(items):
        verdicts.setdefault(t["target"], []).append(t)
    for name, ts in verdicts.items():
        missed = [t for t in ts if t["met"] is False]
        unknown = [t for t in ts if t["met"] is None]
        if missed:
            worst = max(missed, key=lambda t: t["missed_by"])
            s = (f"MISSED at {len(missed)}/{len(ts)} shape(s), worst {worst['shape']}: ratio {worst['ratio']:.3g} vs "
                 f"{worst['limit']:g} (missed by {worst['missed_by']:.2f}x)")
        elif unknown and len(unknown) == len(ts):
            s = "not judged (" + unknown[0]["why"] + ")"
        else:
            rs = [t["ratio"] for t in ts if t["ratio"] is not None]
            s = f"met at {len(ts) - len(unknown)}/{len(ts)} shape(s) (worst ratio {max(rs):.3g} vs {ts[0]['limit']:g})"
        lines.append(f"target {name}: {s}")
    return lines


def _train_lines(sec: dict) -> list:
    items = {i["name"]: i for i in sec.get("items", [])}
    lines = [_items_line(sec)]
    b = next((i for n, i in items.items() if n.startswith("build")), {})
    if b.get("ok"):
        n = b["params"]
        size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
        lines.append(f"{b['arch']}: {size} params, V={b['vocab']}, bf16, built on {b['initialised_on']} in "
                     f"{b['build_s']:.0f} s")
    runs = []
    for key, label in (("update, fused head again (timed warm)", "fused"),
                       ("update, unfused head again (timed warm)", "unfused")):
        r = items.get(key) or {}
        if r.get("ok") is not None and "s_per_step" in r:
            mem = "" if r.get("extra_peak_gib") is None else f", peak +{r['extra_peak_gib']:.1f} GiB"
            runs.append(f"{label} {r['s_per_step']:.3g} s/step without rollout ({r['time_update_s']:.3g} s update, "
                        f"{r['train_tokens_per_s']:,.0f} tokens/s){mem}")
    first = items.get("update, fused head (samples the rollout)") or {}
    if runs:
        roll = f" (rollout {first['rollout_s']:.1f} s, once)" if "rollout_s" in first else ""
        lines.append("; ".join(runs) + roll)
    c = items.get("gradients: fused vs unfused") or {}
    if "rel_l2" in c:
        rep = [f"{lab} {items[k]['repeat_vs_first']['rel_l2']:.1e}" for k, lab in
               (("update, fused head again (timed warm)", "fused"), ("update, unfused head again (timed warm)", "unfused"))
               if "repeat_vs_first" in (items.get(k) or {})]
        lines.append(f"fused vs unfused [{_verdict(c['ok'])}]: loss rel diff {c['loss_rel_diff']:.1e} "
                     f"(tol {c['tol']['loss_rel']:.0e}); gradients rel L2 {c['rel_l2']:.2e} "
                     f"(tol {c['tol']['grad_rel_l2']:.0e}), cosine {c['cosine']:.6f} (tol > {c['tol']['grad_cosine']})"
                     + (f"; repeat noise {', '.join(rep)}" if rep else ""))
    hv = items.get("per-token log-probs and entropies vs float64") or {}
    if "fused_max_abs_err_logp" in hv:
        lines.append(f"per-token max |error| vs float64 over {hv['tokens']} tokens [{_verdict(hv['ok'])}]: fused "
                     f"logp {hv['fused_max_abs_err_logp']:.1e} H {hv['fused_max_abs_err_entropy']:.1e} "
                     f"(tol {hv['tol_fused']:.0e}); unfused logp {hv['unfused_max_abs_err_logp']:.1e} "
                     f"H {hv['unfused_max_abs_err_entropy']:.1e}")
    return lines


def summary_text(res: dict) -> str:
    "The short summary printed last: one block per section, the failures, the outputs."
    secs = res.get("sections", {})
    env = next((s["info"]["env"] for s in secs.values() if "env" in s.get("info", {})), {})
    lines = ["=" * 24 + " entropy_rl GPU check: summary " + "=" * 24,
             f"mode {res.get('mode')} | device {env.get('device', '?')} | torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}, transformers {env.get('transformers', '?')} | "
             f"{res.get('elapsed_s', 0):.0f} s (limit {res.get('limit_s')} s)"]
    body = {"correctness": lambda s: [_correctness_line(s)], "failures": lambda s: [_items_line(s)],
            "speed": _speed_lines, "train": _train_lines}
    problems = []
    for name in SECTIONS:
        sec = secs.get(name)
        if sec is None:
            continue
        try:
            got = body[name](sec)
        except Exception as e:   # the summary must print whatever the results hold
            got = [f"(summary of this section failed: {type(e).__name__}: {e})"]
        status = sec.get("status", "?")
        head = f"{name:<12}" + ("" if status == "ok" else f"[{status}] ")
        lines.append(head + got[0] + f"   ({sec.get('wall_s', 0):.0f} s)")
        lines += [" " * 12 + g for g in got[1:]]
        problems += [f"{name}: {e}" for e in sec.get("errors", [])]
        problems += [f"{name}: {i['name']}: {i.get('error', 'check failed').splitlines()[0][:200]}"
                     for i in sec.get("items", []) if i.get("ok") is False]
        problems += [f"{name}: note: {n}" for n in sec.get("notes", [])]
    if res.get("interrupted"):
        problems.insert(0, res["interrupted"])
    lines.append("problems and notes: " + ("none" if not problems else ""))
    lines += ["  - " + p for p in problems]
    lines.append(f"outputs: {res.get('out', '?')}/results.json, summary.md, speed.png, log.txt")
    return "\n".join(lines)


def speed_figure(res: dict, path: Path) -> None:
    "Forward+backward time and peak memory of every head at every shape (log scales); OOM marked."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = speed_table(res["sections"]["speed"].get("items", []))
    if not table:
        return
    impls = list(dict.fromkeys(k for row in table.values() for k in row))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(impls)
    for ax, key, label in ((axes[0], "fb_ms", "forward+backward (ms)"), (axes[1], "peak_mb", "extra peak memory (MiB)")):
        for j, name in enumerate(impls):
            xs, ys = [], []
            for i, row in enumerate(table.values()):
                it = row.get(name, {})
                if _measured(it):
                    xs.append(i + j * width)
                    ys.append(max(it[key], 1e-3))
                elif it.get("oom"):
                    ax.text(i + j * width, 1, "OOM", rotation=90, ha="center", va="bottom", fontsize=7)
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], [f"M={m}\nV={v}" for m, v in table])
        ax.set_yscale("log")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    env = next((s["info"]["env"] for s in res["sections"].values() if "env" in s.get("info", {})), {})
    fig.suptitle(f"fused log-prob + entropy head, {env.get('device', '?')} ({res.get('mode')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- driver
def write_results(res: dict, out: Path) -> None:
    "results.json and summary.md, rewritten after every section."
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "summary.md").write_text("```\n" + summary_text(res) + "\n```\n")


def run_section(name: str, out: Path, mode: str, budget: float, part_path: str) -> dict:
    "Run one section in its own process group; kill the group at its budget; return what it wrote and how it ended."
    cmd = [sys.executable, os.path.abspath(__file__), str(out), "--section", name, "--part", part_path,
           "--budget-s", f"{budget:.1f}"] + (["--dry-run"] if mode == "dry" else [])
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        status = "ok" if rc == 0 else f"crashed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        status = f"killed at its {budget:g} s budget"
    except KeyboardInterrupt:   # gpu_check.sh's outer limit: stop this section too; the driver summarizes
        os.killpg(proc.pid, 9)
        proc.wait()
        status = "stopped from outside"
    sec = {"items": [], "errors": [], "notes": [], "info": {}}
    if os.path.exists(part_path):
        with open(part_path) as f:
            sec = json.load(f)
    sec.update(status=status, wall_s=time.perf_counter() - t, budget_s=budget)
    if status != "ok":
        sec["errors"].append(f"section {status}; items recorded before that are kept")
    return sec


def drive(out: Path, mode: str, only: list, budgets: dict) -> int:
    "Every section in turn within the total limit; results after each; the figure; the summary printed last."
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"mode": mode, "out": str(out), "limit_s": TOTAL_S[mode], "budgets_s": budgets, "sections": {},
           "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "elapsed_s": 0.0}
    parts = tempfile.mkdtemp(prefix="gpu_check_parts_")
    for name in only:
        left = TOTAL_S[mode] - (time.perf_counter() - t0) - 5
        budget = min(budgets[name], left)
        print(f"\n## {name} (budget {budget:.0f} s)", flush=True)
        if left < 5:
            res["sections"][name] = {"status": "skipped: no time left", "items": [], "errors": [], "notes": [],
                                     "info": {}, "wall_s": 0.0}
        else:
            res["sections"][name] = run_section(name, out, mode, budget, os.path.join(parts, name + ".json"))
        res["elapsed_s"] = time.perf_counter() - t0
        write_results(res, out)
        if res["sections"][name]["status"] == "stopped from outside":
            res["interrupted"] = f"stopped from outside after {res['elapsed_s']:.0f} s; later sections did not run"
            break
    if "speed" in res["sections"]:
        try:
            speed_figure(res, out / "speed.png")
        except Exception as e:
            res["sections"]["speed"]["notes"].append(f"figure failed: {type(e).__name__}: {e}")
    shutil.rmtree(parts, ignore_errors=True)
    res["elapsed_s"] = time.perf_counter() - t0
    write_results(res, out)
    print("\n" + summary_text(res), flush=True)
    bad = "interrupted" in res or any(s.get("status") != "ok" or s.get("errors") or any(i.get("ok") is False for i in s.get("items", []))
              for s in res["sections"].values())
    return 1 if bad else 0


def child(args) -> int:
    "One section in this process, recording into its part file."
    import torch
    mode = "dry" if args.dry_run else "gpu"
    part = Part(args.part, args.section, args.budget_s - 3)
    dev = "cpu" if args.dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        part.data["errors"].append("no CUDA device here: run this on the GPU machine, or pass --dry-run")
        part.save()
        return 1
    if args.dry_run:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    part.data["info"]["env"] = environment(dev)
    part.save()
    fn = {"correctness": section_correctness, "failures": section_failures, "speed": section_speed,
          "train": section_train}[args.section]
    try:
        fn(part, SHAPES[mode][args.section], dev)
    except Exception as e:
        part.data["errors"].append(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")
    part.save()
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output directory (created)")
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes and model")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these sections")
    p.add_argument("--budget", nargs="+", default=[], metavar="SECTION=SECONDS", help="override section budgets")
    p.add_argument("--summarize", action="store_true", help="print the summary of OUT/results.json and exit")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)   # internal: run one section
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        print(summary_text(json.loads((out / "results.json").read_text())))
        return 0
    if args.section:
        return child(args)
    mode = "dry" if args.dry_run else "gpu"
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0") != "1":
        os.environ["TRITON_INTERPRET"] = "1"   # the sections' processes inherit it (set before triton is imported)
    budgets = dict(BUDGETS[mode])
    for spec in args.budget:
        name, _, secs = spec.partition("=")
        if name not in budgets or not secs:
            raise SystemExit(f"--budget takes SECTION=SECONDS with SECTION in {SECTIONS}, got {spec!r}")
        budgets[name] = float(secs)
    return drive(out, mode, [s for s in SECTIONS if s in args.only], budgets)


if __name__ == "__main__":
    sys.exit(main())
