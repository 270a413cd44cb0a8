"""Sampled entropy against each decoding sampler's parameter on the default model (chapter 20's figure).

Run from the repository root:  OMP_NUM_THREADS=2 python nbs/experiments/samplers/sampled_entropy.py
Writes nbs/experiments/samplers/sampled_entropy.json: per sampler and parameter value, the mean over valid response tokens
of H(q) (the sampled distribution), H(pi^T) (the policy at T), the surprise -log2 q(y) of the drawn tokens, and the mean
KL(q || pi^T) where it equals log q(y) - log pi^T(y) (truncation rules, Mirostat); plus the command, device and versions.
"""
import json, platform, subprocess, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import entropy_rl.samplers  # noqa: F401  (registers the samplers)
from entropy_rl.models import load_model
from entropy_rl.rollout import TransformersEngine, SAMPLERS
from entropy_rl.tasks import ArithmeticTask, build_prompt

PROMPTS, SAMPLES, TOKENS, T = 3, 4, 16, 1.0
GRID = {
    "typical": ("typical_p", [0.2, 0.5, 0.9, 1.0]),
    "min_p": ("p_base", [0.0, 0.05, 0.2, 0.4]),
    "top_h": ("top_h", [0.2, 0.5, 0.8, 1.0]),
    "mirostat_v1": ("tau", [1.0, 3.0, 6.0]),
    "mirostat_v2": ("tau", [1.0, 3.0, 6.0]),
    "hapo_temperature": ("tau", [0.0, 0.2, 0.5]),
}
FIXED = {"mirostat_v1": {"reading": "llamacpp", "eta": 0.1}, "mirostat_v2": {"eta": 0.1}}


def summary(b) -> dict:
    m = b.response_mask
    return {"H_q": float(b.sampling_entropy[m].mean()), "H_pi": float(b.policy_entropy[m].mean()),
            "surprise_bits": float((-b.sampling_logprobs[m] / torch.log(torch.tensor(2.0))).mean()),
            "kl_logratio": float((b.sampling_logprobs - b.policy_logprobs)[m].mean()),
            "T_t_mean": float(b.sampling_temperature[m].mean()), "tokens": int(m.sum())}


def main(only: str | None = None):
    "All samplers; with `only`, rerun that one and update its rows in the existing JSON (the rerun is logged in meta)."
    t0 = time.time()
    model, tok = load_model()
    task = ArithmeticTask()
    prompts = [build_prompt(tok, p.question) for p in task.sample(PROMPTS, seed=0)]
    seeds = list(range(PROMPTS))
    eng = TransformersEngine(model, tok)
    gen = lambda **kw: eng.generate(prompts, num_samples=SAMPLES, max_new_tokens=TOKENS, temperature=T, seed=seeds, **kw)
    base = gen()
    out = {"default": summary(base), "samplers": {}}
    # HAPO's statistics come from a previous batch: the default batch's pi^T entropies (what the old pass computes)
    hstate = {"ready": False}
    SAMPLERS.get("hapo_temperature").meta["observe"](hstate, {"entropy": base.policy_entropy, "mask": base.response_mask},
                                                     entropy_pivot=0.8)
    for name, (opt, values) in GRID.items():
        if only is not None and name != only:
            continue
        readings = ("code", "paper") if name == "hapo_temperature" else (None,)
        for reading in readings:
            key = name if reading is None else f"{name}/{reading}"
            rows = []
            for v in values:
                opts = {**FIXED.get(name, {}), opt: v, **({"reading": reading} if reading else {})}
                b = gen(sampler=name, sampler_options=opts, sampler_state=hstate if name == "hapo_temperature" else None)
                rows.append({opt: v, **summary(b)})
                print(key, opt, v, {k: round(x, 3) for k, x in rows[-1].items() if isinstance(x, float)}, flush=True)
            out["samplers"][key] = {"option": opt, "options": FIXED.get(name, {}), "rows": rows}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out["meta"] = {"command": "OMP_NUM_THREADS=2 python nbs/experiments/samplers/sampled_entropy.py", "model": "SmolLM2-135M-Instruct",
                   "device": f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
                             f"{torch.get_num_threads()} threads", "commit": commit, "prompts": PROMPTS, "samples": SAMPLES,
                   "max_new_tokens": TOKENS, "temperature": T, "seeds": seeds, "seconds": round(time.time() - t0, 1)}
    path = Path(__file__).with_name("sampled_entropy.json")
    if only is not None:
        full = json.loads(path.read_text())
        full["samplers"].update(out["samplers"])
        full["meta"].setdefault("reruns", []).append({**out["meta"], "command": out["meta"]["command"] + f" --only {only}"})
        out = full
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path, f"in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(sys.argv[2] if len(sys.argv) == 3 and sys.argv[1] == "--only" else None)
