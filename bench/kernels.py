"""Benchmark of the fused log-prob + entropy head (entropy_rl.kernels).

Implementations, measured side by side in one run at each shape:
  naive   full [N, V] logits + log_softmax (the reference)
  torch   chunked pure-torch head (its own autograd function)
  triton  Triton kernels (CUDA only; the CPU interpreter is for correctness, not speed)
  liger   Liger's fused linear cross-entropy (log-prob only, no entropy), when installed on CUDA
  matmul  plain h @ W.T (forward) and the three matmuls of a linear layer (forward+backward):
          the matmul limit the fused head is compared with

For each: forward time, forward+backward time, extra peak memory of forward+backward, ratios
to naive and to the matmul, and achieved TFLOP/s counting 2NDV (forward) and 6NDV
(forward+backward) useful flops (the fused backward recomputes the logits: 8NDV done).

Usage (from the repository root):
  PYTHONPATH=$PWD python bench/kernels.py                 # GPU if present, else scaled-down CPU
  PYTHONPATH=$PWD python bench/kernels.py --device cpu --ns 512 1024 --d 128 --v 32768
"""
import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch

from entropy_rl.kernels import HAS_TRITON, cpu_peak_memory_mb, fused_logprob_entropy

GPU_DEFAULT = dict(ns=[4096, 8192, 16384, 32768], d=4096, v=151_936, dtype="bfloat16")
CPU_DEFAULT = dict(ns=[256, 512, 1024, 2048], d=128, v=32_768, dtype="float32")


def device_name(device: str) -> str:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs), CUDA {torch.version.cuda}"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    "Median seconds of `reps` calls after one warm-up."
    fn()
    sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def peak_mb(fn, device):
    "Extra peak memory (MiB) of one call above what was allocated before it."
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return cpu_peak_memory_mb(fn)[0]


def make_impls(device):
    "name -> (forward fn, forward+backward fn) factories taking (h, w, y)."
    impls = {}

    def head(backend):
        def fwd(h, w, y):
            with torch.no_grad():
                return fused_logprob_entropy(h, w, y, backend=backend)

        def fwd_bwd(h, w, y):
            lp, H = fused_logprob_entropy(h, w, y, backend=backend)
            (lp.sum() + 0.1 * H.sum()).backward()
        return fwd, fwd_bwd

    impls["naive"] = head("naive")
    impls["torch"] = head("torch")
    if device == "cuda" and HAS_TRITON:
        impls["triton"] = head("triton")
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger_flce

            def lfwd(h, w, y):
                with torch.no_grad():
                    return liger_flce(h, w, y, reduction="sum")

            def lfwd_bwd(h, w, y):
                liger_flce(h, w, y, reduction="sum").backward()
            impls["liger"] = (lfwd, lfwd_bwd)
        except Exception as e:  # not installed or a different API
            print(f"# liger: not available ({type(e).__name__}: {e})")

    def mfwd(h, w, y):
        with torch.no_grad():
            return h @ w.T

    def mfwd_bwd(h, w, y):
        # the work of a plain linear layer: z = h W^T, dh = dz W, dW = dz^T h (dz stands in as z)
        with torch.no_grad():
            z = h @ w.T
            z @ w
            z.T @ h
    impls["matmul"] = (mfwd, mfwd_bwd)
    return impls


def run_shape(impls, n, d, v, dtype, device, reps):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, d, generator=g) / d ** 0.25).to(dtype).to(device).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.25).to(dtype).to(device).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)
    y[::16] = -100
    rows = {}
    for name, (fwd, fwd_bwd) in impls.items():
        def fb():
            fwd_bwd(h, w, y)
            h.grad = w.grad = None
        try:
            t_f = timed(lambda: fwd(h, w, y), device, reps)
            t_fb = timed(fb, device, reps)
            mem = peak_mb(fb, device)
            rows[name] = dict(fwd=t_f, fwd_bwd=t_fb, mem=mem)
        except torch.cuda.OutOfMemoryError:
            rows[name] = None
            torch.cuda.empty_cache()
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            rows[name] = None
        h.grad = w.grad = None
        gc.collect()
    return rows


def report(rows, n, d, v):
    flops_f, flops_fb = 2 * n * d * v, 6 * n * d * v
    logits_mb = n * v * 4 / 2**20
    base, mm = rows.get("naive"), rows.get("matmul")
    print(f"\nN={n} D={d} V={v}   (fp32 logits would take {logits_mb:,.0f} MiB)")
    print(f"{'impl':<8}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>11}{'fb/naive':>10}{'fb/matmul':>11}"
          f"{'mem/naive':>11}{'TFLOP/s f':>11}{'TFLOP/s fb':>12}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:<8}{'OOM':>10}")
            continue
        ratio = lambda a, b, k: f"{a[k] / b[k]:.3f}" if b else "-"
        print(f"{name:<8}{r['fwd'] * 1e3:>10.2f}{r['fwd_bwd'] * 1e3:>12.2f}{r['mem']:>11.1f}"
              f"{ratio(r, base, 'fwd_bwd'):>10}{ratio(r, mm, 'fwd_bwd'):>11}{ratio(r, base, 'mem'):>11}"
              f"{flops_f / r['fwd'] / 1e12:>11.3f}{flops_fb / r['fwd_bwd'] / 1e12:>12.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--ns", type=int, nargs="+")
    p.add_argument("--d", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    a = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = dict(GPU_DEFAULT if device == "cuda" else CPU_DEFAULT)
    cfg.update({k: getattr(a, k) for k in ("ns", "d", "v", "dtype") if getattr(a, k)})
    dtype = getattr(torch, cfg["dtype"])
    print(f"# entropy_rl fused head benchmark  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"# device: {device_name(device)}")
    print(f"# torch {torch.__version__}, python {sys.version.split()[0]}, triton available: {HAS_TRITON}")
    print(f"# dtype {cfg['dtype']}, D={cfg['d']}, V={cfg['v']}, median of {a.reps} after a warm-up;"
          " peak = extra memory of one forward+backward above the inputs")
    impls = make_impls(device)
    if device == "cpu":
        print("# CPU run: triton is skipped (the interpreter checks correctness, not speed); liger needs CUDA")
    for n in cfg["ns"]:
        report(run_shape(impls, n, cfg["d"], cfg["v"], dtype, device, a.reps), n, cfg["d"], cfg["v"])


if __name__ == "__main__":
    main()
