"""What one RLVR step costs on this machine, with and without prompt sharing, measured side by side.

`share_prompts=False minibatch_split=rows` runs exactly the code path from before prompt sharing (one prompt prefill
per sample in the rollout, one full forward per row in the old-policy and training passes, minibatches of shuffled
rows); `share_prompts=True minibatch_split=groups` (the defaults now) runs each distinct prompt once per forward and
shares its KV cache across the group's samples, minibatches holding whole groups (chapters 10 and 11). Everything else is
the same config, seed and starting weights. The two settings alternate (`--repeats` times each), so drift in the
machine's load hits both alike. The first step of each run is reported apart (allocator warm-up). Each phase is timed
twice: wall clock, and this process's CPU time (one thread: the compute it did, which waiting for a core on a shared
machine does not inflate).

Reported: seconds per step and per phase (rollout, score = old log-probs, advantages, update, and one checkpoint save
timed separately), each phase's share of the step, the ratio shared / unshared, and the token-forwards each phase
does against what this machine's measured matmul rate allows for them (2 * params FLOPs per token forward, 6 * params
per token forward + backward; attention and the output head counted in the params' matmuls only roughly).

Usage (repository root; about 10 minutes with the defaults on 2 idle cores):
  PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/step_cost.py --steps 4 --repeats 3 > bench/results/step_cost_cpu.txt
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

# bench/kernels.py would shadow the `kernels` package transformers imports: keep this folder off the import path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch

import entropy_rl.trainer as trainer_module
from entropy_rl.models import load_model, tiny_model
from entropy_rl.trainer import TrainConfig, Trainer


class _TimedWithCPU(trainer_module._timed):
    "The trainer's phase timer, also adding the block's process CPU time to `times[name + '_cpu']`."
    def __enter__(self):
        self.c0 = time.process_time(); super().__enter__()
    def __exit__(self, *exc):
        super().__exit__(*exc)
        k = self.name + "_cpu"
        self.times[k] = self.times.get(k, 0.0) + time.process_time() - self.c0


trainer_module._timed = _TimedWithCPU      # the metrics then carry time_<phase>_cpu_s beside time_<phase>_s

PHASES = ("rollout", "score", "advantages", "update")


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    "This process's float32 matmul rate (GFLOP/s) at n x n x n, best of `reps`."
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def one_run(model, tokenizer, args, share: bool) -> dict:
    "Phase times of `args.steps` steps from the given starting weights, plus one timed checkpoint save."
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model="tiny" if args.tiny else "default", output_dir=out, steps=args.steps, seed=0,
                          prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                          minibatches=args.minibatches, lr=2e-5, share_prompts=share,
                          minibatch_split="groups" if share else "rows", progress=False, plot=False,
                          save_every=0, save_minutes=0, resume=False)
        tr = Trainer(cfg, policy=copy.deepcopy(model), tokenizer=tokenizer)
        steps = []
        for s in range(args.steps):
            t, c = time.perf_counter(), time.process_time()
            m = tr.train_step(s)
            m["wall_s"], m["cpu_s"] = time.perf_counter() - t, time.process_time() - c
            steps.append(m)
        t = time.perf_counter(); tr.save(args.steps); save_s = time.perf_counter() - t
        return dict(steps=steps, save_s=save_s)


def summarize(runs: list, clock: str = "") -> dict:
    """Mean per-phase seconds over the steps after the first, pooled over repeats; and the first step apart.
    `clock`: "" for wall time, "_cpu" for process CPU time."""
    later = [s for r in runs for s in r["steps"][1:]]
    step = "wall_s" if not clock else "cpu_s"
    first = [r["steps"][0][step] for r in runs]
    out = {p: statistics.mean(s.get(f"time_{p}{clock}_s", 0.0) for s in later) for p in PHASES}
    out["step"] = statistics.mean(s[step] for s in later)
    out["step_sd"] = statistics.stdev(s[step] for s in later) if len(later) > 1 else 0.0
    out["first_step"] = statistics.mean(first)
    out["save"] = statistics.mean(r["save_s"] for r in runs)
    out["entropy"] = statistics.mean(s["entropy"] for s in later)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (a smoke test of this script)")
    args = ap.parse_args()
    if args.steps < 2 or args.repeats < 1:
        ap.error("--steps must be >= 2 (the first step is reported apart) and --repeats >= 1")
    model, tokenizer = tiny_model(seed=0) if args.tiny else load_model(None)
    n_params = sum(p.numel() for p in model.parameters())
    rate = matmul_gflops()
    print(f"# step cost: {'tiny' if args.tiny else 'default'} model ({n_params / 1e6:.1f} M params), "
          f"{args.prompts} prompts x {args.group_size} samples, {args.max_new_tokens} new tokens, "
          f"{args.minibatches} minibatches, {args.steps} steps x {args.repeats} repeats per setting, alternated")
    print(f"# device: CPU {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; measured float32 matmul rate {rate:.1f} GFLOP/s")
    runs = {False: [], True: []}
    for rep in range(args.repeats):
        for share in (False, True):
            r = one_run(model, tokenizer, args, share)
            runs[share].append(r)
            print(f"repeat {rep} share_prompts={share}: " + " ".join(f"{s['wall_s']:.2f}" for s in r["steps"])
                  + f" s/step; save {r['save_s']:.2f} s", flush=True)
    for clock, label in (("", "wall clock"), ("_cpu", "process CPU time")):
        res = {k: summarize(v, clock) for k, v in runs.items()}
        print(f"\n## {label} (steps 2..{args.steps}, {args.repeats} repeats pooled)\n")
        print("| phase | unshared s | shared s | shared / unshared | share of step (unshared → shared) |")
        print("|---|---|---|---|---|")
        for p in (*PHASES, "step"):
            a, b = res[False][p], res[True][p]
            print(f"| {p} | {a:.2f} | {b:.2f} | {b / a:.2f} | {a / res[False]['step']:.0%} → {b / res[True]['step']:.0%} |"
                  if a > 0.005 else f"| {p} | {a:.3f} | {b:.3f} | – | – |")
        print(f"\nstep s.d. over steps: unshared {res[False]['step_sd']:.2f} s, shared {res[True]['step_sd']:.2f} s; "
              f"first step: {res[False]['first_step']:.2f} s vs {res[True]['first_step']:.2f} s")
    res = {k: summarize(v, "_cpu") for k, v in runs.items()}
    saves = {k: statistics.mean(r["save_s"] for r in v) for k, v in runs.items()}
    print(f"\ncheckpoint save (once per run, wall): {saves[False]:.2f} s vs {saves[True]:.2f} s; with the default "
          f"save_minutes=10 that is one save per ~{600 / max(res[True]['step'], 1e-9):.0f} steps at the shared step's CPU time")
    print(f"mean entropy over the measured steps: {statistics.mean(s['entropy'] for r in runs[False] for s in r['steps'][1:]):.4f}"
          f" vs {statistics.mean(s['entropy'] for r in runs[True] for s in r['steps'][1:]):.4f} (same samples; the updates "
          "differ in minibatch composition)")
    # what the matmul rate allows: token-forwards per phase at 2 * params FLOPs each (x3 with the backward)
    from entropy_rl.tasks import ArithmeticTask
    task = ArithmeticTask()
    P = max(len(tokenizer(task.prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
            for p in task.sample(32, seed=0))
    B, G, T = args.prompts * args.group_size, args.group_size, args.max_new_tokens
    flop = 2 * n_params / 1e9
    limits = {
        "rollout": (B * (P + T), args.prompts * P + B * T),
        "score": (B * (P + T) * (args.minibatches - 1) / args.minibatches,
                  (args.prompts * P + B * T) * (args.minibatches - 1) / args.minibatches),
        "update": (3 * B * (P + T), 3 * (args.prompts * P + B * T)),
    }
    print(f"\nmatmul-rate floor (prompt ≈ {P} tokens, {n_params / 1e6:.0f} M params, {rate:.1f} GFLOP/s; token-forwards "
          "as counted, the update's backward as 2 forwards, the score pass for the minibatches after the first):")
    for p, (a, b) in limits.items():
        fa, fb = a * flop / rate, b * flop / rate
        print(f"  {p}: unshared {a:.0f} token-fwd → {fa:.2f} s floor (CPU time measured {res[False][p]:.2f}); "
              f"shared {b:.0f} → {fb:.2f} s (measured {res[True][p]:.2f})")


if __name__ == "__main__":
    main()
