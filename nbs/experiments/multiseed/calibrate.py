"""Calibrate candidate tasks for the multi-seed experiment on the default model (chapter 13b).
For each candidate: sampled pass@1 and pass@4 (T = 1) on held-out problems, and, from teacher-forced forward passes,
where the reward is decided (see `answer_stats`).
Writes nbs/experiments/multiseed/calibration.json.  Run from the repository root:
    OMP_NUM_THREADS=1 python nbs/experiments/multiseed/calibrate.py
"""
import json, sys, time
from pathlib import Path
import torch
from entropy_rl.models import load_model
from entropy_rl.tasks import ArithmeticTask
from entropy_rl.trainer import evaluate

CANDIDATES = {   # name -> ArithmeticTask options (the JSON-able form the trainer's task_options take)
    "add_1d": dict(min_digits=1, max_digits=1, operators=["+"]),
    "mul_1d": dict(min_digits=1, max_digits=1, operators=["*"]),
    "addmul_1d": dict(min_digits=1, max_digits=1, operators=["+", "*"]),
    "add_1to2d": dict(min_digits=1, max_digits=2, operators=["+"]),
    "addsub_1d": dict(min_digits=1, max_digits=1, operators=["+", "-"]),
    "add_2d": dict(min_digits=2, max_digits=2, operators=["+"]),
}
BUDGETS = {"add_1to2d_24tok": ("add_1to2d", 24)}   # the same task with a longer reply budget
N_PROBLEMS, N_SAMPLES, MAX_NEW = 20, 8, 16

def _answer_position(model, tok, prompt_ids, prefix: str):
    "Next-token distribution after the prompt and the response prefix `prefix` (teacher-forced)."
    ids = prompt_ids if not prefix else torch.cat([prompt_ids, tok(prefix, add_special_tokens=False, return_tensors="pt").input_ids], 1)
    with torch.no_grad():
        return model(ids).logits[0, -1].float().softmax(-1)

def answer_stats(model, tok, task, problems) -> dict:
    """Where the reward is decided, from teacher-forced forward passes: (a) at the first response position, the probability
    of the answer's first token, its rank, and the first digit's rank among the ten digit tokens (renormalised over them);
    (b) after the response prefix "a op b = " (the form most correct replies take), the probability of the whole answer
    (product over its tokens) and whether every answer token is the most likely one (greedy would write it)."""
    digits = [tok(str(i), add_special_tokens=False).input_ids[0] for i in range(10)]
    assert len(set(digits)) == 10, "the tokenizer must give each digit its own token"
    first = {"p": [], "rank": [], "digit_rank": []}; after = {"p_answer": [], "answer_is_greedy": []}
    for p in problems:
        prompt = tok(task.prompt(tok, p), return_tensors="pt").input_ids
        pi = _answer_position(model, tok, prompt, "")
        ans = tok(p.answer, add_special_tokens=False).input_ids
        first["p"].append(float(pi[ans[0]])); first["rank"].append(int((pi > pi[ans[0]]).sum()) + 1)
        d = pi[digits]; i = int(p.answer.lstrip("-")[0])                       # a negative answer: its first digit
        first["digit_rank"].append(int((d > d[i]).sum()) + 1)
        a, op, b = p.question.removeprefix("What is ").removesuffix("?").split(" ")
        pre = torch.cat([prompt, tok(f"{a} {op} {b} = ", add_special_tokens=False, return_tensors="pt").input_ids], 1)
        ids = torch.cat([pre, torch.tensor([ans])], 1)
        with torch.no_grad():
            logp = model(ids).logits[0, pre.shape[1] - 1:-1].float().log_softmax(-1)
        target = torch.tensor(ans)
        after["p_answer"].append(float(logp.gather(1, target[:, None]).sum().exp()))
        after["answer_is_greedy"].append(bool((logp.argmax(-1) == target).all()))
    n = len(problems)
    return {"first": {**first, "mean_p": sum(first["p"]) / n, "share_top1": sum(r == 1 for r in first["rank"]) / n,
                      "share_top_digit": sum(r == 1 for r in first["digit_rank"]) / n},
            "after_equation": {**after, "mean_p_answer": sum(after["p_answer"]) / n,
                               "share_answer_is_greedy": sum(after["answer_is_greedy"]) / n}}

def main(names):
    torch.manual_seed(0)
    model, tok = load_model(None); model.eval()
    out_path = Path("nbs/experiments/multiseed/calibration.json")
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name in names:
        base, max_new = BUDGETS.get(name, (name, MAX_NEW))
        task = ArithmeticTask(**CANDIDATES[base]); t0 = time.time()
        problems = task.held_out_set(N_PROBLEMS, seed=7)
        res = evaluate(model, tok, task, n_problems=N_PROBLEMS, k=4, samples=N_SAMPLES, max_new_tokens=max_new, seed=7)
        out[name] = {"task_options": CANDIDATES[base], "problems": N_PROBLEMS, "samples": N_SAMPLES, "max_new_tokens": max_new,
                     **res, **answer_stats(model, tok, task, problems), "seconds": round(time.time() - t0, 1)}
        print(name, {k: v for k, v in out[name].items() if not isinstance(v, (list, dict))},
              {w: {k: round(v, 3) for k, v in d.items() if not isinstance(v, list)} for w, d in out[name].items() if w in ('first', 'after_equation')}, flush=True)
        out_path.write_text(json.dumps(out, indent=1))

if __name__ == "__main__":
    main(sys.argv[1:] or list(CANDIDATES) + list(BUDGETS))
