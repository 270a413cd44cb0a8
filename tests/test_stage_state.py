"""Stage state (chapter 04a, interfaces §3): a registered entry that keeps controller state across steps gets it as
`state=`, its observer sees the step's gathered rows once per step, and the state is checkpointed and restored so a
resumed run is bit-identical to an uninterrupted one; a state a checkpoint could not read back is refused."""
import math

import numpy as np
import pytest
import torch

from entropy_rl.advantages import ADVANTAGES, group_advantages
from entropy_rl.losses import REGULARIZERS, register_regularizer
from entropy_rl.rundir import latest_checkpoint
from entropy_rl.trainer import Trainer, TrainConfig

from test_trainer import TINY, odd_length, strip_timing


def _toy_advantage(rewards, group_size, batch, *, gain, state):
    "GRPO scaled by a factor the state sets: the state changes the run's numbers."
    state["calls"] += 1
    return group_advantages(rewards, group_size) * (1.0 + gain * math.tanh(state["reward_sum"]))


def _toy_observe(state, view, *, gain):
    "Reads every process's rows: a running reward sum, an entropy trace (tensor), the rows seen and the last step."
    state["reward_sum"] += float(view["rewards"].double().sum()) - 0.5 * view["mask"].shape[0]
    state["entropy_trace"] = torch.cat([state["entropy_trace"], view["entropy"][view["mask"]].double().mean()[None]])
    state["rows"].append(int(view["mask"].shape[0]))
    state["step"] = int(view["step"])


def _toy_regularizer(logp, m, inputs, agg, *, state):
    "agg(logp) times a weight that moves with every call (the state is updated inside the loss)."
    state["calls"] += 1
    state["w"] = 0.9 * state["w"] + 0.1 * float(logp.detach()[m].double().mean())
    state["ws"].append(state["w"])
    return agg(logp) * state["w"], {"toy/w": state["w"]}


@pytest.fixture
def toy_entries():
    ADVANTAGES.register("toy_stateful", _toy_advantage, dict(gain=0.5), "test: GRPO x a state-driven factor",
                        meta={"state": lambda gain: {"calls": 0, "reward_sum": 0.0, "rows": [], "step": 0,
                                                     "entropy_trace": torch.zeros(0, dtype=torch.float64)},
                              "observe": _toy_observe})
    register_regularizer("toy_counter", _toy_regularizer, {}, "test: a regularizer with a call-driven weight",
                         meta={"state": lambda coef: {"calls": 0, "w": 1.0, "ws": []}})
    yield
    ADVANTAGES._entries.pop("toy_stateful", None)
    REGULARIZERS._entries.pop("toy_counter", None)


KW = dict(TINY, advantage="toy_stateful", regularizers={"toy_counter": {"coef": 0.1}}, minibatches=2, grad_accum=2)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _same(a[k], b[k])
        else:
            assert a[k] == b[k] and type(a[k]) is type(b[k]), (k, a[k], b[k])


def test_states_are_created_passed_observed_and_keyed_by_config_key(tmp_path, toy_entries):
    t = Trainer(dict(KW, steps=2, output_dir=str(tmp_path)), reward_fn=odd_length)
    assert set(t.stage_states) == {"advantage/toy_stateful", "regularizers/toy_counter"}
    assert t.stage_states["regularizers/toy_counter"] == {"calls": 0, "w": 1.0, "ws": []}
    m = t.train().metrics
    adv, reg = t.stage_states["advantage/toy_stateful"], t.stage_states["regularizers/toy_counter"]
    assert adv["calls"] == 2 and adv["step"] == 2 and adv["rows"] == [8, 8]       # observed once per step, all rows
    assert len(adv["entropy_trace"]) == 2 and torch.isclose(adv["entropy_trace"][-1], torch.tensor(m[-1]["entropy"],
                                                                                                 dtype=torch.float64))
    assert reg["calls"] == 2 * 2 * 2                    # steps x minibatches x grad_accum loss calls
    assert reg["w"] == reg["ws"][-1] and len(reg["ws"]) == 8
    assert min(reg["ws"][4:]) <= m[-1]["toy/w"] <= max(reg["ws"][4:])  # the step's metric: a mean over its 4 calls


def test_a_stateless_run_keeps_no_state(tmp_path):
    t = Trainer(dict(TINY, steps=1, output_dir=str(tmp_path)), reward_fn=odd_length)
    assert t.stage_states == {} and t._state_kw("sampler", "default", "sampler_state") == {}


def test_resume_restores_the_state_bit_identically(tmp_path, toy_entries):
    full = Trainer(dict(KW, steps=4, output_dir=str(tmp_path / "full")), reward_fn=odd_length)
    m_full = full.train().metrics
    Trainer(dict(KW, steps=2, output_dir=str(tmp_path / "split")), reward_fn=odd_length).train()
    split = Trainer(dict(KW, steps=4, output_dir=str(tmp_path / "split")), reward_fn=odd_length)
    m_split = split.train().metrics
    assert strip_timing(m_full) == strip_timing(m_split)
    _same(full.stage_states, split.stage_states)
    assert full.stage_states["advantage/toy_stateful"]["rows"] == [8, 8, 8, 8]
    ck = torch.load(latest_checkpoint(tmp_path / "split") / "state.pt", weights_only=True)
    _same(ck["extra"]["stage_states"], split.stage_states)                      # what the checkpoint holds
    # a fresh run from step 0 would have a different state: the restore is what made the two agree
    fresh = Trainer(dict(KW, steps=2, output_dir=str(tmp_path / "fresh")), reward_fn=odd_length)
    fresh.train()
    assert fresh.stage_states["advantage/toy_stateful"]["rows"] == [8, 8]


def test_a_state_that_a_checkpoint_cannot_hold_is_refused(tmp_path, toy_entries):
    ADVANTAGES.register("toy_bad_start", lambda r, G, b, *, state: group_advantages(r, G), {}, "test",
                        meta={"state": lambda: {"x": np.float64(1.0)}})
    try:
        with pytest.raises(ValueError, match="toy_bad_start cannot be checkpointed"):
            Trainer(dict(TINY, advantage="toy_bad_start", steps=1, output_dir=str(tmp_path / "a")), reward_fn=odd_length)
    finally:
        ADVANTAGES._entries.pop("toy_bad_start", None)
    # a state that turns bad during the run: refused at the checkpoint, before anything is written
    def drifting(r, G, b, *, state):
        state["rng"] = np.random.default_rng(0)
        return group_advantages(r, G)
    ADVANTAGES.register("toy_bad_later", drifting, {}, "test", meta={"state": lambda: {"rng": None}})
    try:
        with pytest.raises(ValueError, match="advantage/toy_bad_later cannot be checkpointed"):
            Trainer(dict(TINY, advantage="toy_bad_later", steps=1, output_dir=str(tmp_path / "b")),
                    reward_fn=odd_length).train()
        assert latest_checkpoint(tmp_path / "b") is None
    finally:
        ADVANTAGES._entries.pop("toy_bad_later", None)


def test_the_loss_gets_a_fresh_state_per_call_outside_the_trainer(toy_entries):
    "policy_loss called bare (a notebook, the config-time dry run) gives the regularizer a throwaway state."
    from entropy_rl.losses import policy_loss
    lp = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    kw = dict(regularizers={"toy_counter": {"coef": 1.0}})
    _, m1 = policy_loss("grpo", lp, lp, torch.ones(1), torch.ones(1, 2), **kw)
    _, m2 = policy_loss("grpo", lp, lp, torch.ones(1), torch.ones(1, 2), **kw)
    assert m1["toy/w"] == m2["toy/w"]                                 # nothing carried over
    kept = {"regularizers/toy_counter": {"calls": 0, "w": 1.0, "ws": []}}
    for _ in range(2):
        policy_loss("grpo", lp, lp, torch.ones(1), torch.ones(1, 2), states=kept, **kw)
    assert kept["regularizers/toy_counter"]["calls"] == 2
    TrainConfig.from_dict(dict(TINY, regularizers={"toy_counter": {"coef": 0.1}}))   # the dry run accepts it


STATE_WORKER = '''
import json, sys, torch
from entropy_rl.trainer import Trainer
from entropy_rl.distributed import world, leave_process_group
out, base, configs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
t = Trainer(dict(base, **configs["state"], output_dir=f"{out}/state"), reward_fn=lambda text, problem: float(len(text) % 2))
m = t.train().metrics
rank, w = world()
torch.save({"states": t.stage_states, "world": w, "metrics": m}, f"{out}/states_{rank}.pt")
leave_process_group()
'''
STATEFUL = dict(advantage="riskpo", advantage_options={"reading": "track", "bundle_size": 1}, steps=2,
                regularizers={"ares_kl": {"coef": 0.5, "interval": 1, "deadzone": 0.0}})


def _close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b) and all(_close(x, y) is None for x, y in zip(a, b))
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    else:
        assert a == b


def test_two_processes_keep_one_state_equal_to_one_process(tmp_path):
    "Observers read every process's rows and the loss sees the gathered batch: both ranks hold the one-process state."
    from test_distributed import BASE, run_two_processes
    out = run_two_processes(tmp_path, STATE_WORKER, {"state": STATEFUL})
    r0, r1 = (torch.load(out / f"states_{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2
    _close(r0["states"], r1["states"])
    one = Trainer(dict(BASE, **STATEFUL, output_dir=str(tmp_path / "one")), reward_fn=odd_length)
    one.train()
    _close(one.stage_states, r0["states"])
    assert one.stage_states["regularizers/ares_kl"]["calls"] == 2 * 2          # steps x epochs_per_step loss calls
