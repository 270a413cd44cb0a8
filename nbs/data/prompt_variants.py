"Prompt variants on 20 one-digit additions x 4 samples (the numbers quoted in 09_tasks): python nbs/data/prompt_variants.py"
import sys, time, torch
# run from the repository root
from entropy_rl.models import load_model
from entropy_rl.tasks import *
model, tok = load_model()
variants = {
 "calc-system": dict(system="You are a calculator. Reply with only the number.", q="What is {a} + {b}?"),
 "number-only": dict(system=None, q="What is {a} + {b}? Reply with just the number."),
 "equation": dict(system="You are a calculator. Reply with only the number.", q="{a} + {b} ="),
 "answer-marker": dict(system=None, q="What is {a} + {b}? End your reply with 'Answer: <number>'."),
 "calc-system+marker": dict(system="You are a calculator. Reply with only the number.", q="What is {a} + {b}? End your reply with 'Answer: <number>'."),
}
t = ArithmeticTask(1, 1)
probs = [(int(p.id.split('+')[0]), int(p.id.split('+')[1]), p.answer) for p in t.sample(20, seed=0)]
for name, v in variants.items():
    t0 = time.time()
    prompts = [build_prompt(tok, v["q"].format(a=a, b=b), system=v["system"]) for a, b, _ in probs for _ in range(4)]
    torch.manual_seed(0)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    r = [grade(tx, probs[i // 4][2]) for i, tx in enumerate(texts)]
    print(name, sum(r) / len(r), round(time.time() - t0), texts[:3], flush=True)
