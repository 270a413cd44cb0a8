"""Chapter 21's rewards switched on by name in a short run on the default model (issue 18 item 3), with the settings of
run_zoo_cpu.sh (SmolLM2-135M-Instruct, one-digit addition, seed 0, 6 steps of 4 prompts x 4 samples, lr 2e-5), so each
run starts from the same weights and first prompts as nbs/experiments/zoo/grpo, the GRPO baseline; only the reward
differs. Short on purpose: it shows that each entry trains on a real model, not which is better.

Until the rollout engine records `policy_entropy` / `top1_ids` itself (interfaces §1), pear and ares read them from a
teacher-forced pass of the same policy at the run temperature: the stand-in of tests/test_entropy_rewards.py.
Run from the repository root, one name per process (one thread each):
    OMP_NUM_THREADS=1 nice -n 10 python nbs/experiments/run_zoo_rewards_cpu.py pear
Logs (metrics.jsonl, config.json, command.txt) go to nbs/experiments/zoo_rewards/<name>/."""
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import entropy_rl.entropy_rewards  # noqa: F401  (registers pear, ares; not yet in MECHANISM_MODULES)
from entropy_rl.trainer import TrainConfig, Trainer
from test_entropy_rewards import record_rollout_fields

COMMON = dict(model="default", steps=6, seed=0, resume=False, prompts_per_step=4, group_size=4, max_new_tokens=16, lr=2e-5,
              minibatches=2, progress=False, plot=False)
RUNS = {"pear": dict(reward_shaping=["pear"]),
        "ares": dict(reward_shaping=["ares"]),
        "majority": dict(task_options={"reward": "majority"}),
        "spine": dict(recipe="spine")}        # the recipe's lr 5e-7 yields to COMMON's 2e-5, as any override does

if __name__ == "__main__":
    name = sys.argv[1]
    dest = ROOT / "nbs/experiments/zoo_rewards" / name
    work = Path(tempfile.mkdtemp()) / name
    t0 = time.time()
    tr = Trainer(TrainConfig.from_dict({**COMMON, **RUNS[name], "output_dir": str(work)}))
    state = None
    if name in ("pear", "ares"):
        record_rollout_fields(tr, [])
    if name == "ares" and not hasattr(tr, "stage_states"):    # until the trainer keeps stage state (interfaces §3)
        import dataclasses, functools
        from entropy_rl.advantages import REWARD_SHAPERS
        e = REWARD_SHAPERS.get("ares")
        state = e.meta["state"](**tr.config.reward_shaping_options["ares"])
        REWARD_SHAPERS._entries["ares"] = dataclasses.replace(e, fn=functools.partial(e.fn, state=state))
    tr.train()
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "config.json"):
        shutil.copy(work / f, dest / f)
    shutil.rmtree(work.parent)                                # the run's checkpoints (1.6 GB each): logs are copied
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    import os, torch, transformers
    (dest / "command.txt").write_text(
        f"command: OMP_NUM_THREADS=1 nice -n 10 python nbs/experiments/run_zoo_rewards_cpu.py {name}\n"
        f"config: {dict(COMMON, **RUNS[name])}\n"
        f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, wall {time.time() - t0:.0f} s\n"
        f"device: CPU ({os.cpu_count()} cores: {cpu}, shared with other jobs), no GPU; "
        f"torch {torch.__version__} | transformers {transformers.__version__}\n"
        f"code: entropy_rl at commit {commit}\n"
        + ("engine records: policy_entropy / top1_ids from a teacher-forced stand-in pass (interfaces §1 not merged)\n"
           if name in ("pear", "ares") else "")
        + (f"ares state passed by hand (interfaces §3 not merged); final state {state}\n" if state is not None else ""))
    shutil.rmtree(work.parent, ignore_errors=True)
    print(name, "done")
