"""Data-parallel training over 2 CPU processes (torchrun, gloo) against 1 process with the same seed and global batch:
the same loss, the same metrics and the same trained weights, for losses whose statistics are batch-global
(token means, Clip-Cov / KL-Cov covariance selection, BAPO's sums, the 80/20 entropy mask, Dr. GRPO's 1/(B L)).

Tolerance: rtol 1e-4, atol 1e-6. The two runs do the same arithmetic on the same rows except that each process pads
its own rows to its own widest prompt / response, so sums run over different lengths: float32 rounding, not
exactness. Runtime: one torchrun launch (2 processes, every configuration in one launch), ~20-40 s on 2 busy cores."""
import math
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

BASE = dict(model="tiny", prompts_per_step=4, group_size=4, max_new_tokens=4, lr=1e-2, steps=1, epochs_per_step=2, progress=False,
            plot=False, task_options={"instruction": None}, save_every=0, resume=False, device="cpu")
CONFIGS = {
    "grpo": dict(algo="grpo"),
    "dr_grpo": dict(algo="dr_grpo"),
    "grpo_8020": dict(algo="grpo", loss_options={"top_entropy_frac": 0.2}),
    "clip_cov": dict(algo="clip_cov", loss_options={"clip_ratio": 0.2, "cov_lb": 0.0, "cov_ub": 1e9}),
    "kl_cov": dict(algo="kl_cov", loss_options={"k": 0.2}),
    "bapo_paper": dict(algo="bapo_paper"),
    "tis": dict(algo="dapo", tis_cap=2.0),
    # the pipeline's stages (issue 15): another estimator, a reward shaper, the reference KL
    "stages": dict(algo="dapo", advantage="rloo", reward_shaping=["overlong"], kl_coef=0.05),
    "cure": dict(algo="grpo", rollout_structure="cure", rollout_structure_options={"n2": 1, "min_token_chars": 1}),
    "eb_tree": dict(algo="grpo", rollout_structure="eb_tree", rollout_structure_options={"branch_probability": 0.1,
                                                                                         "segment_tokens": 2}),
    # decoding samplers (chapter 20): per-row state (Mirostat's mu), per-token temperature from stage state (HAPO)
    **{f"sampler_{n}": dict(algo="grpo", sampler=n, sampler_options=o) for n, o in (
        ("typical", {"typical_p": 0.99}), ("min_p", {}), ("top_h", {"top_h": 0.99}), ("mirostat_v1", {"tau": 8.0}),
        ("mirostat_v2", {}), ("hapo_temperature", {}))},
    "kl_cov_local": dict(algo="kl_cov", loss_options={"k": 0.2}, batch_scope="local"),   # per-process statistics
}
GLOBAL = [n for n in CONFIGS if CONFIGS[n].get("batch_scope") != "local"]

WORKER = textwrap.dedent('''
    import json, sys, torch
    from entropy_rl.trainer import train
    from entropy_rl.distributed import world, leave_process_group
    out, base, configs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    odd_length = lambda text, problem: float(len(text) % 2)
    for name, cfg in configs.items():
        r = train(dict(base, **cfg, output_dir=f"{out}/{name}"), reward_fn=odd_length)
        rank, w = world()
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in r.model.state_dict().items()}, f"{out}/{name}/weights.pt")
            json.dump({"world": w, "metrics": r.metrics}, open(f"{out}/{name}/result.json", "w"))
    resume = dict(base, algo="grpo", save_every=1, output_dir=f"{out}/ddp_resume")
    train(dict(resume, steps=1), reward_fn=odd_length)                   # stop after step 1 ...
    r = train(dict(resume, steps=2, resume=True), reward_fn=odd_length)  # ... and continue to step 2
    if world()[0] == 0:
        json.dump({"metrics": r.metrics}, open(f"{out}/ddp_resume/result.json", "w"))
    leave_process_group()
''')


def odd_length(text, problem):
    return float(len(text) % 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if "time" not in k and "per_s" not in k and k != "processes"}


def _assert_same_metrics(one: list, two: list, tag: str, rel=1e-4):
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        a, b = comparable(a), comparable(b)
        assert set(a) == set(b), set(a) ^ set(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-6), (tag, a["step"], k, a[k], b[k])


def subprocess_env(extra: dict | None = None) -> dict:
    "The environment for a launched process: this checkout importable, one thread per process."
    return {**os.environ, **(extra or {}), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _worker_errors(stderr: str, limit: int = 8000) -> str:
    "The workers' own tracebacks and messages from a torchrun stderr, without library warnings and torchrun's report."
    keep = [l for l in stderr.splitlines() if "Warning:" not in l and l.strip() != "warnings.warn("]
    text = "\n".join(keep)
    launcher = re.search(r'Traceback \(most recent call last\):\n  File "[^"]*torchrun"', text)
    exits = [l.strip() for l in keep if l.strip().startswith(("rank", "exitcode"))]   # torchrun's per-rank summary
    return (text[:launcher.start()] if launcher else text)[-limit:] + "\n" + "\n".join(exits)


def run_two_processes(out: Path, worker: str, configs: dict, extra_env: dict | None = None) -> Path:
    "Run `worker` (its argv: out, BASE, configs) as 2 torchrun processes over gloo; `out` holds what they wrote."
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on the PATH")
    script = out / "worker.py"
    script.write_text(worker)
    env = subprocess_env(extra_env)
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), str(out), json.dumps(BASE), json.dumps(configs)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(out))
    (out / "torchrun.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    assert p.returncode == 0, f"torchrun exited {p.returncode}; full log: {out / 'torchrun.log'}\n" + _worker_errors(p.stderr)
    return out


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    return run_two_processes(tmp_path_factory.mktemp("dist"), WORKER, CONFIGS)


@pytest.mark.parametrize("name", GLOBAL)
def test_two_processes_equal_one(two_process_runs, tmp_path, name):
    from entropy_rl.trainer import train
    res = json.loads((two_process_runs / name / "result.json").read_text())
    assert res["world"] == 2
    one = train(dict(BASE, **CONFIGS[name], output_dir=str(tmp_path / name)), reward_fn=odd_length)
    two = res["metrics"]
    assert [m["step"] for m in two] == [1] and two[0]["processes"] == 2
    assert any(m["groups_with_signal"] > 0 for m in one.metrics)        # the updates had something to do
    _assert_same_metrics(one.metrics, two, name)
    w2 = torch.load(two_process_runs / name / "weights.pt")
    w1 = one.model.state_dict()
    moved = False
    for k, v in w1.items():
        # CURE's and eb_tree's branch prompts are left-padded to each process's own widest prefix: float noise in the
        # logits, which Adam turns into up to ~lr-sized steps on the few weights whose gradient is near its eps (seen:
        # 1 of 4096 elements off by 8e-5). For them the weights are held to a tenth of one Adam step (lr 1e-2); the
        # metrics above still match to 1e-4
        torch.testing.assert_close(w2[k], v.detach(), rtol=1e-4, atol=1e-3 if name in ("cure", "eb_tree") else 1e-6)
    init = __import__("entropy_rl.models", fromlist=["tiny_model"]).tiny_model(seed=0)[0].state_dict()
    assert any(not torch.equal(init[k], v) for k, v in w1.items())      # training changed the weights


def test_ddp_resume_continues_the_run(two_process_runs, tmp_path):
    "Two processes stopped after step 1 and resumed give the uninterrupted one-process run's two steps."
    from entropy_rl.trainer import train
    one = train(dict(BASE, algo="grpo", steps=2, output_dir=str(tmp_path / "one")), reward_fn=odd_length).metrics
    two = json.loads((two_process_runs / "ddp_resume" / "result.json").read_text())["metrics"]
    _assert_same_metrics(one, two, "ddp resume")


def test_local_scope_differs_from_one_process(two_process_runs, tmp_path):
    "batch_scope='local' (each process selects its own top-covariance tokens) is a different computation: it runs, and it differs."
    from entropy_rl.trainer import train
    two = json.loads((two_process_runs / "kl_cov_local" / "result.json").read_text())["metrics"]
    one = train(dict(BASE, **CONFIGS["kl_cov_local"], output_dir=str(tmp_path / "one")), reward_fn=odd_length).metrics
    assert [m["step"] for m in two] == [1]
    assert any(abs(a[k] - b[k]) > 1e-6 for a, b in zip(one, two) for k in ("loss", "selected_frac", "grad_norm"))


TORCHRUN = lambda port: ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
LAUNCHERS = {   # name: (command before `-m`, extra environment)
    "torchrun": (TORCHRUN, {}),
    # accelerate's torchrun-based launcher; `--cpu` would pick its single-process launcher instead
    "accelerate": (lambda port: ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                                 "--main_process_port", str(port)], {}),
    # FSDP asked for through the environment alone: accelerate keeps CPU processes plain data parallel
    "fsdp_env_on_cpu": (TORCHRUN, {"ACCELERATE_USE_FSDP": "true"}),
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_module_under_launchers(tmp_path, launcher):
    """`torchrun -m entropy_rl.cli train ...` and `accelerate launch -m entropy_rl.cli train ...` on CPU: two processes,
    one log and one summary line from process 0, metrics over both. FSDP asked for on CPU processes: accelerate runs
    plain data parallel instead, and the trainer says so. (`accelerate launch --use_fsdp` on CPU stops earlier, with
    accelerate's own error that no accelerator was found.)"""
    launch, extra_env = LAUNCHERS[launcher]
    if shutil.which(launch(0)[0]) is None:
        pytest.skip(f"{launch(0)[0]} is not on the PATH")
    env = subprocess_env(extra_env)
    cmd = launch(free_port()) + [
        "-m", "entropy_rl.cli", "train", "--model", "tiny", "--steps", "1", "--output-dir", str(tmp_path / "run"),
        "--fresh", "device=cpu", "prompts_per_step=2", "group_size=4", "max_new_tokens=4", "progress=false", "plot=false"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-4000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["processes"] == 2
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000001"]
    summaries = [l for l in p.stdout.splitlines() if l.startswith('{"run_dir"')]
    assert len(summaries) == 1, p.stdout
    assert ("FSDP was asked for" in p.stderr) == bool(extra_env), p.stderr[-2000:]


def _two_nodes(cwds: list, steps: int, timeout: int = 300) -> list:
    """The several-nodes command of chapter 15, as two 'machines' of one process each on this machine (each
    `accelerate launch` in its own working directory, output_dir relative to it). Returns the two CompletedProcess."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate is not on the PATH")
    env = subprocess_env()
    port = free_port()
    procs = []
    for rank, cwd in enumerate(cwds):
        Path(cwd).mkdir(parents=True, exist_ok=True)
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "-m", "entropy_rl.cli", "train", "--model", "tiny", "--steps", str(steps), "--output-dir", "run",
               "device=cpu", "prompts_per_step=2", "group_size=4", "max_new_tokens=4", "progress=false", "plot=false",
               "save_every=1"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def test_two_nodes_share_a_run(tmp_path):
    """Two single-process 'nodes' with one shared output_dir: one log with both processes' metrics; a second launch
    resumes from process 0's checkpoint on both nodes and continues to step 2."""
    shared = tmp_path / "shared"
    for steps in (1, 2):
        for p in _two_nodes([shared, shared], steps):
            assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(l) for l in (shared / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["processes"] == 2 for r in records)


def test_nodes_without_a_shared_output_dir_are_told(tmp_path):
    """Node 0 sees a checkpoint, node 1 (another directory, as on a machine without a shared filesystem) does not:
    both stop with a message naming the cause instead of training from different states."""
    for p in _two_nodes([tmp_path / "a", tmp_path / "a"], 1):
        assert p.returncode == 0, p.stderr[-3000:]
    results = _two_nodes([tmp_path / "a", tmp_path / "b"], 2)
    for p in results:
        assert p.returncode != 0 and "must be a directory they all share" in p.stderr, p.stderr[-3000:]
    assert len((tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()) == 1     # nothing trained


def test_vllm_engine_missing_gives_clear_message(tmp_path):
    import importlib.util
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from entropy_rl.trainer import Trainer
    with pytest.raises(ImportError, match=r"pip install entropy_rl\[gpu\]"):
        Trainer(dict(BASE, rollout_engine="vllm", output_dir=str(tmp_path)))


def test_bad_distributed_options(tmp_path):
    from entropy_rl.trainer import TrainConfig
    with pytest.raises(ValueError, match="rollout_engine"):
        TrainConfig.from_dict(rollout_engine="sglang")
    with pytest.raises(ValueError, match="batch_scope"):
        TrainConfig.from_dict(batch_scope="node")
    with pytest.raises(ValueError, match="tis_cap"):
        TrainConfig.from_dict(tis_cap=0)
    assert TrainConfig.from_dict(tis_cap="2").tis_cap == 2.0 and TrainConfig.from_dict(tis_cap="none").tis_cap is None


class _StandInVLLM:
    """A stand-in for the `vllm` module with the small surface VLLMEngine uses (LLM, SamplingParams, sleep/wake_up,
    apply_model(load_weights), generate with per-request seeds and logprobs=0), sampling with transformers underneath.
    It checks the engine's plumbing on CPU; it says nothing about real vLLM. `logprob_shift` lowers every reported
    log-prob by a known amount, standing in for an engine whose numerics differ from the policy's."""
    logprob_shift = 0.0

    class Logprob:
        def __init__(self, logprob):
            self.logprob = logprob

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, model, gpu_memory_utilization, enable_sleep_mode, dtype, logprobs_mode=None):
            from transformers import AutoModelForCausalLM, AutoTokenizer
            assert enable_sleep_mode and logprobs_mode == "processed_logprobs"
            self.model = AutoModelForCausalLM.from_pretrained(model).eval()
            self.tok = AutoTokenizer.from_pretrained(model)
            self.events = []

        def apply_model(self, fn):
            model = self.model

            class Loader:
                def load_weights(self, weights):
                    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
                    assert not unexpected, unexpected
            return fn(Loader())

        def sleep(self, level):
            self.events.append(f"sleep{level}")

        def wake_up(self):
            self.events.append("wake")

        def reset_prefix_cache(self):
            self.events.append("reset")

        def generate(self, prompts, params, use_tqdm=False):
            from types import SimpleNamespace as NS
            from entropy_rl.rollout import TransformersEngine
            eng, outs = TransformersEngine(self.model, self.tok), []
            for prompt, sp in zip(prompts, params):
                assert sp.logprobs == 20
                text = self.tok.decode(prompt["prompt_token_ids"])
                b = eng.generate([text], num_samples=sp.n, max_new_tokens=sp.max_tokens, temperature=sp.temperature,
                                 top_p=sp.top_p, seed=[sp.seed])
                rows = []
                for ids, m, lp in zip(b.response_ids, b.response_mask, b.sampling_logprobs):
                    ids, lp = ids[m].tolist(), lp[m].tolist()
                    rows.append(NS(token_ids=ids, logprobs=[{t: _StandInVLLM.Logprob(l - _StandInVLLM.logprob_shift)} for t, l in zip(ids, lp)]))
                outs.append(NS(outputs=rows))
            return outs


def test_vllm_engine_plumbing_with_stand_in(monkeypatch):
    import types
    from entropy_rl.models import apply_lora, tiny_model
    from entropy_rl.rollout import TransformersEngine, VLLMEngine
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = _StandInVLLM.LLM, _StandInVLLM.SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    policy, tok = tiny_model(seed=0)
    policy = apply_lora(policy, {"r": 2, "target_modules": "all-linear"})
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)             # the adapter changes the policy
    policy.eval()
    eng = VLLMEngine(policy, tok)
    prompts = ["1+1=", "What is 4 + 3?"]
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(eng.llm.model(x).logits, policy(x).logits, rtol=1e-4, atol=1e-4)  # merged copy
    b = eng.generate(prompts, num_samples=3, max_new_tokens=6, seed=[11, 12])
    ref = TransformersEngine(policy, tok).generate(prompts, num_samples=3, max_new_tokens=6, seed=[11, 12])
    assert b.texts == ref.texts and b.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    T = ref.response_ids.shape[1]
    assert torch.equal(b.response_mask[:, :T], ref.response_mask) and not b.response_mask[:, T:].any()
    torch.testing.assert_close(b.sampling_logprobs[:, :T], ref.sampling_logprobs, rtol=1e-4, atol=1e-5)
    eng.release()
    assert eng.sleeping and eng.llm.events[-1] == "sleep1"
    with torch.no_grad():                                 # the policy moves; sync wakes vLLM and copies it
        for n, p in policy.named_parameters():
            if "lora_A" in n:
                p.add_(0.3)
    eng.sync_weights(policy)
    assert not eng.sleeping and eng.llm.events[-2:] == ["wake", "reset"]
    with torch.no_grad():
        torch.testing.assert_close(eng.llm.model(x).logits, policy(x).logits, rtol=1e-4, atol=1e-4)
    assert not any("lora" in k for k in eng.llm.model.state_dict())
    assert all(not getattr(m, "merged", False) for m in policy.modules())   # unmerged again for training


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.0])
def test_trainer_with_stand_in_vllm(monkeypatch, tmp_path, shift):
    """The trainer's vLLM path end to end on CPU (stand-in module): sync before, sleep after each rollout, TIS weights.
    The engine reports log mu = log pi_old - shift, so the logged gap is `shift` and every weight is min(e^shift, 2)."""
    monkeypatch.setattr(_StandInVLLM, "logprob_shift", shift)
    import types
    from entropy_rl.trainer import Trainer
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = _StandInVLLM.LLM, _StandInVLLM.SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    t = Trainer(dict(BASE, algo="dapo", rollout_engine="vllm", tis_cap=2.0, steps=2, prompts_per_step=2, epochs_per_step=1,
                     plot=False, output_dir=str(tmp_path)),
                reward_fn=odd_length)
    ms = t.train().metrics
    # step 1: vLLM is awake after loading (no wake), load, sleep; step 2: wake, load, sleep
    assert t.engine.llm.events == ["reset", "sleep1", "wake", "reset", "sleep1"], t.engine.llm.events
    for m in ms:
        assert abs(m["sample_logp_gap"] - shift) < 1e-4                              # |log pi_old - log mu|
        assert abs(m["token_weights/mean"] - min(math.exp(shift), 2.0)) < 1e-3        # truncated at tis_cap = 2


# ---------------------------------------------------------------------------------------------------------------
# FSDP (version 2, accelerate's own `fully_shard` preparation, decoder layers as units) over 2 CPU processes.
# accelerate switches FSDP on only for accelerator backends (MULTI_GPU, ...): with CPU processes it stays MULTI_CPU
# and ignores the FSDP settings. The worker therefore flips the distributed type to FSDP after accelerate has set up
# its state, so the rest (prepare, clip_grad_norm_, unwrap) is accelerate's FSDP2 code running over gloo.

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}
FSDP_CONFIGS = {"grpo": dict(algo="grpo", steps=2, save_every=1), "kl_cov": dict(algo="kl_cov", loss_options={"k": 0.2}),
                "lora": dict(algo="grpo", lora_rank=4, lr=5e-2)}

FSDP_WORKER = textwrap.dedent('''
    import json, shutil, sys, torch
    import accelerate.state as state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    _init = state.AcceleratorState.__init__
    def _force_fsdp(self, *a, **kw):
        _init(self, *a, **kw)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = kw.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
            self.distributed_type = DistributedType.FSDP
    state.AcceleratorState.__init__ = _force_fsdp

    from torch.distributed.tensor import DTensor
    from entropy_rl.trainer import Trainer
    from entropy_rl.distributed import fsdp_units, world, leave_process_group
    out, base, configs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    odd_length = lambda text, problem: float(len(text) % 2)

    def run(name, **cfg):
        t = Trainer(dict(base, **cfg, output_dir=f"{out}/{name}"), reward_fn=odd_length)
        r = t.train()
        params = list(t.model.parameters())
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        full = sum(p.numel() for p in params)
        rank, w = world()
        if rank == 0:
            json.dump({"world": w, "metrics": r.metrics, "units": [type(u).__name__ for u in fsdp_units(t.model)],
                       "local_fraction": local / full}, open(f"{out}/{name}/result.json", "w"))
        return t

    for name, cfg in configs.items():
        run(name, **cfg)
    try:
        Trainer(dict(base, rollout_engine="vllm", output_dir=f"{out}/vllm"))
        refused = None
    except ValueError as e:
        refused = str(e)
    if world()[0] == 0:
        json.dump({"refused": refused}, open(f"{out}/vllm_refused.json", "w"))
    run("resume", algo="grpo", steps=1, save_every=1)            # stop after step 1 ...
    if world()[0] == 0:
        shutil.copytree(f"{out}/resume", f"{out}/resume_on_one")  # (a copy for one process to continue)
    t = run("resume", algo="grpo", steps=2, save_every=1, resume=True)  # ... and continue to step 2

    # gathered_params: no collective inside (the processes run different numbers of forwards, as generation does),
    # a nested block changes nothing, and leaving restores the sharding and each unit's reshard setting
    from entropy_rl.distributed import gathered_params, _reshard_setting
    rank = world()[0]
    before = [_reshard_setting(u) for u in fsdp_units(t.model)]
    ids = torch.tensor([[5, 6, 7, 8]])
    with gathered_params(t.model):
        with gathered_params(t.model):
            pass
        whole = not any(isinstance(p, DTensor) for p in t.unwrapped.parameters())
        for _ in range(1 + 3 * rank):
            t.unwrapped(ids)
    after = [_reshard_setting(u) for u in fsdp_units(t.model)]
    logp, H = t.model(ids, torch.ones_like(ids), torch.ones(1, 2, dtype=torch.bool))   # training forward still works
    logp.sum().backward()
    if rank == 0:
        json.dump({"whole_inside": whole, "settings_restored": before == after,
                   "sharded_after": all(isinstance(p, DTensor) for p in t.model.parameters()),
                   "finite": bool(torch.isfinite(logp).all())}, open(f"{out}/gathered.json", "w"))
    leave_process_group()
''')


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return run_two_processes(tmp_path_factory.mktemp("fsdp"), FSDP_WORKER, FSDP_CONFIGS, FSDP_ENV)


def _checkpoint_weights(run_dir) -> dict:
    from safetensors.torch import load_file
    from entropy_rl.trainer import latest_checkpoint
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def test_fsdp_shards_the_policy(fsdp_runs):
    "The policy really is sharded: the root plus one unit per decoder layer, each process holding half of every parameter."
    res = json.loads((fsdp_runs / "grpo" / "result.json").read_text())
    assert res["world"] == 2 and all(m["processes"] == 2 for m in res["metrics"])
    assert res["units"] == ["FSDPPolicyScorer", "FSDPLlamaDecoderLayer", "FSDPLlamaDecoderLayer"], res["units"]
    assert 0.45 < res["local_fraction"] < 0.55, res["local_fraction"]


@pytest.mark.parametrize("name", list(FSDP_CONFIGS))
def test_fsdp_two_processes_equal_one(fsdp_runs, tmp_path, name):
    """Sharded training over 2 processes (generation from gathered weights, loss over both processes' rows, the
    full checkpoint gathered to process 0) gives one process's metrics and checkpointed weights; with LoRA too
    (frozen base weights and trainable adapters in the same FSDP units)."""
    from entropy_rl.trainer import train
    two = json.loads((fsdp_runs / name / "result.json").read_text())["metrics"]
    one = train(dict(BASE, **FSDP_CONFIGS[name], output_dir=str(tmp_path / name)), reward_fn=odd_length)
    assert any(m["groups_with_signal"] > 0 for m in one.metrics)
    _assert_same_metrics(one.metrics, two, name)
    w1, w2 = _checkpoint_weights(tmp_path / name), _checkpoint_weights(fsdp_runs / name)
    assert sorted(w1) == sorted(w2) == sorted(n for n, p in one.model.named_parameters() if p.requires_grad)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    if "lora_rank" in FSDP_CONFIGS[name]:     # only the adapter is saved, and training moved it
        assert all("lora_" in k for k in w1) and any(k for k in w1 if "lora_B" in k and w1[k].abs().max() > 0)


def test_fsdp_resume_continues_the_run(fsdp_runs, tmp_path):
    """Stopped after step 1 and resumed under FSDP, the run's step 2 is the uninterrupted run's step 2; the same
    checkpoint resumed by a single process gives it too (name-keyed checkpoints do not depend on the layout)."""
    from entropy_rl.trainer import train
    straight = json.loads((fsdp_runs / "grpo" / "result.json").read_text())["metrics"]
    resumed = json.loads((fsdp_runs / "resume" / "result.json").read_text())["metrics"]
    one = train(dict(BASE, algo="grpo", steps=2, save_every=1, resume=True, output_dir=str(fsdp_runs / "resume_on_one")),
                reward_fn=odd_length)
    _assert_same_metrics(straight, one.metrics, "resumed on one process")
    _assert_same_metrics(straight, resumed, "fsdp resume", rel=1e-5)
    for k, v in _checkpoint_weights(fsdp_runs / "grpo").items():
        torch.testing.assert_close(dict(one.model.named_parameters())[k].detach(), v, rtol=1e-4, atol=1e-6)


def test_gathered_params_under_fsdp(fsdp_runs):
    """Inside the block every parameter is whole and the processes ran 1 and 4 forwards without hanging (no collective
    inside); a nested block was harmless; after it, every parameter is a shard again, each unit's reshard setting is
    the one it had, and a training forward and backward run."""
    g = json.loads((fsdp_runs / "gathered.json").read_text())
    assert g == {"whole_inside": True, "settings_restored": True, "sharded_after": True, "finite": True}, g


def test_fsdp_refuses_vllm(fsdp_runs):
    "vLLM needs the whole policy on each process's GPU every step: under FSDP the trainer says so instead of failing later."
    refused = json.loads((fsdp_runs / "vllm_refused.json").read_text())["refused"]
    assert refused is not None and "not supported with FSDP" in refused
