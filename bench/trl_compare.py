"""One RLVR configuration through entropy_rl and through TRL's GRPOTrainer, side by side.

Same model (the embedded default unless --model), task (default arithmetic, chat-template prompts,
exact-match reward), prompts x samples per step, response length, learning rate, loss (GRPO, no KL),
one optimizer step per rollout batch, no gradient checkpointing, device. Each framework runs in its
own subprocess (so peak memory is its own); prints seconds per step (median over the steps after the
first, pooled over --repeats alternated runs of each) and peak memory (CPU: max RSS of the process; GPU: torch.cuda.max_memory_allocated) for both,
and their ratio (TRL / entropy_rl: > 1 means entropy_rl is faster / lighter).

    PYTHONPATH=$PWD python bench/trl_compare.py --steps 4 --prompts 4 --samples 4 --tokens 16
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _peak_memory_mb(device: str) -> float:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def _model(args):
    from entropy_rl.models import load_model, tiny_model
    return tiny_model(seed=0) if args.model == "tiny" else load_model(None if args.model == "default" else args.model)


def run_entropy_rl(args) -> dict:
    import torch
    from entropy_rl.trainer import Trainer
    model, tok = _model(args)
    t = Trainer(dict(model=args.model, algo="grpo", steps=args.steps, prompts_per_step=args.prompts,
                     group_size=args.samples, max_new_tokens=args.tokens, lr=args.lr, seed=0,
                     output_dir=tempfile.mkdtemp(), save_every=0, plot=False, progress=False, resume=False,
                     device=args.device, mixed_precision="bf16" if args.device == "cuda" else "no"),
                policy=model, tokenizer=tok)
    times = []
    for s in range(args.steps):
        t0 = time.perf_counter(); t.train_step(s)
        if args.device == "cuda": torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"step_times": times, "peak_mb": _peak_memory_mb(args.device)}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from entropy_rl.tasks import ArithmeticTask, grade
    model, tok = _model(args)
    task = ArithmeticTask()
    problems = task.sample(args.prompts * args.steps, split="train", seed=0)
    ds = Dataset.from_list([{"prompt": task.prompt(tok, p), "answer": p.answer} for p in problems])  # same prompts as the trainer

    def reward(completions, answer, **_):
        return [grade(c, a) for c, a in zip(completions, answer)]

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k): self.t0 = time.perf_counter()
        def on_step_end(self, *a, **k):
            if args.device == "cuda": torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.samples,
                     num_generations=args.samples, max_completion_length=args.tokens, learning_rate=args.lr,
                     max_steps=args.steps, gradient_accumulation_steps=1, num_iterations=1, beta=0.0,
                     loss_type="grpo", temperature=1.0, top_p=1.0, gradient_checkpointing=False,
                     use_cpu=args.device == "cpu", bf16=args.device == "cuda", report_to="none",
                     save_strategy="no", logging_steps=1, shuffle_dataset=False, seed=0, disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    return {"step_times": times, "peak_mb": _peak_memory_mb(args.device)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help='"default", "tiny", or a model directory')
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--repeats", type=int, default=3, help="runs of each framework, alternated")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--only", choices=["entropy_rl", "trl"], help=argparse.SUPPRESS)   # child mode
    args = p.parse_args()
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.only:
        res = (run_entropy_rl if args.only == "entropy_rl" else run_trl)(args)
        print("RESULT " + json.dumps(res))
        return
    import torch, transformers, trl
    print(f"device: {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"torch threads {torch.get_num_threads()})" if args.device == "cpu" else f"device: {torch.cuda.get_device_name()}")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"config: model={args.model} prompts={args.prompts} x samples={args.samples} tokens={args.tokens} "
          f"steps={args.steps} lr={args.lr} loss=GRPO (no KL), 1 optimizer step per rollout, no grad checkpointing")
    out = {name: {"step_times": [], "peak_mb": []} for name in ("entropy_rl", "trl")}
    for rep in range(args.repeats):   # alternate the two, so slow drifts of a shared machine hit both alike
        for name in ("entropy_rl", "trl") if rep % 2 == 0 else ("trl", "entropy_rl"):
            cmd = [sys.executable, __file__, "--only", name, "--model", args.model, "--steps", str(args.steps),
                   "--prompts", str(args.prompts), "--samples", str(args.samples), "--tokens", str(args.tokens),
                   "--lr", str(args.lr), "--device", args.device]
            r = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"{name} failed:\n{r.stderr[-3000:]}"); sys.exit(1)
            res = json.loads(line[-1][7:])
            st = res["step_times"][1:] or res["step_times"]   # the first step includes warm-up
            out[name]["step_times"] += st; out[name]["peak_mb"].append(res["peak_mb"])
            print(f"run {rep + 1}/{args.repeats} {name:11s} s/step {[round(x, 1) for x in st]}  median {statistics.median(st):6.2f}"
                  f"   peak memory {res['peak_mb']:7.0f} MiB", flush=True)
    for name, res in out.items():
        res["s_per_step"] = statistics.median(res["step_times"]); res["peak"] = max(res["peak_mb"])
        print(f"{name:11s} s/step (median of {len(res['step_times'])} steps, warm-up steps left out) {res['s_per_step']:7.2f}"
              f"   peak memory (max over runs) {res['peak']:7.0f} MiB")
    a, b = out["entropy_rl"], out["trl"]
    print(f"ratio TRL / entropy_rl: time per step {b['s_per_step'] / a['s_per_step']:.2f}x, "
          f"peak memory {b['peak'] / a['peak']:.2f}x")


if __name__ == "__main__":
    main()
