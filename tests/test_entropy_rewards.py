from entropy_rl.rollout import topk_tail_entropy
"""Chapter 21's reward side (issue 18): PEAR and ARES against independent float64 / numpy references with garbage at
masked positions, the spec's tables, bad options, the view keys and their config-time checks, and one training step on
the tiny model with each shaper on, the label-free majority reward, and the `spine` recipe through the command line.

The rollout engine does not record `policy_entropy` / `top1_ids` yet in every checkout (interfaces §1); where it does
not, `record_rollout_fields` stands in for it with a teacher-forced pass of the same policy at the run temperature.
ARES's state goes through the trainer's stage state (interfaces §3), checkpointed and resumed."""
import dataclasses
import functools
import inspect
import json
import math
import random

import numpy as np
import pytest
import torch

import entropy_rl.entropy_rewards as er
from entropy_rl.advantages import ADVANTAGES, GROUP_FILTERS, REWARD_SHAPERS, group_advantages
from entropy_rl.models import tiny_tokenizer
from entropy_rl.tasks import majority_rewards
from entropy_rl.trainer import ROLLOUT_NEEDS, StepPipeline, TrainConfig, Trainer

TINY = dict(model="tiny", prompts_per_step=2, group_size=4, max_new_tokens=10, lr=1e-2, progress=False, plot=False,
            task_options={"instruction": None})
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789")     # one-character "triggers" for the character-level tiny model


# ------------------------------------------------------------------------------------------------ references
def naive_phases(H, M, ids, marker):
    "PEAR's phases by string search over the valid tokens (a different route from find_marker)."
    out = []
    for h, m, row in zip(H.tolist(), M.tolist(), ids.tolist()):
        toks = [t for t, k in zip(row, m) if k]; hs = [x for x, k in zip(h, m) if k]
        s, sm = ",".join(map(str, toks)) + ",", ",".join(map(str, marker)) + ","
        j = ("," + s).find("," + sm)
        b = len(toks) if j < 0 else s[:j].count(",")
        think = hs[:b]; ans = [] if j < 0 else hs[b + len(marker):]
        out.append((sum(think) / len(think) if think else 0.0, sum(ans) / len(ans) if ans else 0.0, b))
    return out


def numpy_hwe(h, trig, tau, W):
    "ARES's counts and p95 in numpy: window means of every position by convolution, the tail by a running mean."
    h = np.asarray(h, dtype=np.float64); L = len(h)
    full = np.convolve(h[1:], np.ones(W) / W, mode="valid") if L - 1 >= W else np.zeros(0)   # mean h[t+1..t+W], t < L - W
    means = list(full)
    for t in range(len(full), L):
        means.append(np.mean(means) if means else h[t])
    valid = invalid = 0; cost = 0.0
    for t in np.flatnonzero(trig):
        if t < len(full):
            w = full[t]; cost += max(0.0, w - tau)
            valid += w >= tau; invalid += w < tau
    return valid, invalid, cost, (np.percentile(means, 95) if means else 0.0)


# ------------------------------------------------------------------------------------------------ PEAR
def test_pear_phases_against_string_search_with_masked_garbage():
    g = torch.Generator().manual_seed(0); rng = random.Random(0)
    for trial in range(40):
        B, T = 5, rng.randint(1, 12)
        ids = torch.randint(0, 4, (B, T), generator=g)               # a small alphabet: markers occur, also partially
        lens = torch.randint(0, T + 1, (B,), generator=g)
        M = torch.arange(T)[None] < lens[:, None]
        H = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
        H = torch.where(M, H, torch.full_like(H, 1e6)); ids = torch.where(M, ids, torch.full_like(ids, 3))   # garbage + markers
        marker = [3] if trial % 2 else [2, 3]
        th, an, b = er.pear_phases(H, M, ids, marker)
        for k, (t_ref, a_ref, b_ref) in enumerate(naive_phases(H, M, ids, marker)):
            assert b[k].item() == b_ref and abs(th[k].item() - t_ref) < 1e-12 and abs(an[k].item() - a_ref) < 1e-12


def test_pear_spec_check_and_reward_options():
    H = torch.tensor([[1.0, 2.0, 3.0, 0.5, 0.2, 0.4]], dtype=torch.float64); M = torch.ones(1, 6, dtype=torch.bool)
    th, an, b = er.pear_phases(H, M, torch.tensor([[1, 2, 3, 9, 4, 5]]), [9])
    assert (b.item(), round(th.item(), 4), round(an.item(), 4)) == (3, 2.0, 0.3)
    th, an, b = er.pear_phases(H, M, torch.tensor([[1, 2, 3, 8, 4, 5]]), [9])
    assert (b.item(), round(th.item(), 4), an.item()) == (6, 1.1833, 0.0)
    R = er.pear_reward(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([3.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0]),
                       torch.tensor([True, True, False]), lambda_think=0.5, lambda_answer=0.2, clip=1.0)
    assert torch.allclose(R, torch.tensor([1 - 1.0, 1 - 0.25, 0.0], dtype=torch.float64))   # clipped at −1; wrong: untouched
    with pytest.raises(ValueError, match="non-empty token sequence"):
        er.find_marker([1, 2], [])
    with pytest.raises(ValueError, match="must match"):
        er.pear_phases(H, M, torch.zeros(1, 5, dtype=torch.long), [9])


@pytest.mark.parametrize("bad,words", [({"lambda_think": -1.0}, "must be >= 0"), ({"lambda_answer": -0.5}, "must be >= 0"),
                                       ({"clip": -1.0}, "clip must be None"), ({"clip": True}, "clip must be None"),
                                       ({"marker": ""}, "non-empty string"), ({"entropy": "both"}, "entropy must be one of"),
                                       ({"only_correct": 1}, "must be a bool"), ({"lambda": 0.1}, "unknown option")])
def test_pear_bad_options_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        REWARD_SHAPERS.resolve("pear", bad)


def test_pear_refuses_a_missing_or_malformed_view():
    tok = tiny_tokenizer()
    view = {"mask": torch.ones(2, 3, dtype=torch.bool), "response_ids": torch.ones(2, 3, dtype=torch.long), "tokenizer": tok,
            "policy_entropy": torch.zeros(2, 3), "sampling_entropy": None, "scores": torch.zeros(2)}
    fn, o = REWARD_SHAPERS.get("pear").fn, REWARD_SHAPERS.resolve("pear", {})
    with pytest.raises(RuntimeError, match="did not record 'sampling_entropy'"):
        fn(torch.zeros(2), view, **{**o, "entropy": "sampling"})
    with pytest.raises(ValueError, match="has shape"):
        fn(torch.zeros(2), {**view, "policy_entropy": torch.zeros(2, 4)}, **o)
    with pytest.raises(ValueError, match="NaN/inf on valid tokens"):
        fn(torch.zeros(2), {**view, "policy_entropy": torch.full((2, 3), float("nan"))}, **o)
    # NaN where masked is ignored
    R, _ = fn(torch.zeros(2), {**view, "mask": torch.tensor([[1, 0, 0], [1, 1, 0]]).bool(),
                                "policy_entropy": torch.tensor([[1.0, float("nan"), 5], [2.0, 4.0, float("inf")]])}, **o)
    assert torch.allclose(R, torch.tensor([-0.1, -0.3]))


# ------------------------------------------------------------------------------------------------ ARES
def test_hwe_counts_and_percentile_against_numpy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        L, W = int(rng.integers(0, 15)), int(rng.integers(1, 6))
        h = rng.random(L) * 3; trig = rng.random(L) < 0.4; tau = float(rng.random() * 2)
        v, i, c, p = numpy_hwe(h, trig, tau, W)
        got = er.hwe_counts(torch.tensor(h), torch.tensor(trig), tau, W)
        assert got[:2] == (v, i) and abs(got[2] - c) < 1e-12
        assert abs(er.window_percentile(torch.tensor(h), W, 95.0) - p) < 1e-12


def test_ares_spec_checks():
    h = torch.tensor([0.1, 2.0, 1.5, 1.8, 1.2, 0.1, 0.2, 0.1, 0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    tr = torch.zeros(12, dtype=torch.bool); tr[[0, 5, 9]] = True
    assert er.hwe_counts(h, tr, 1.0, 4)[:2] == (1, 1) and round(er.window_percentile(h, 4, 95), 4) == 1.3637
    h = torch.tensor([0.1, 2.0, 1.8, 1.6, 1.9, 0.2, 0.1, 0.3, 0.2, 0.1], dtype=torch.float64)
    tr = torch.zeros(10, dtype=torch.bool); tr[[0, 5]] = True
    v, i, c = er.hwe_counts(h, tr, 1.5, 4)
    assert (v, i, round(c, 4), round(er.window_percentile(h, 4, 95), 4)) == (1, 1, 0.325, 1.6225)
    assert round(topk_tail_entropy(torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64).log()).item(), 4) == 1.2206
    table = [(1, "easy", 10, 4, -0.5), (1, "easy", 7, 4, -0.1667), (1, "easy", 5, 4, 0.0), (0, "easy", 4, 4, 0.15),
             (1, "medium", 1, 8, -0.35), (0, "medium", 4, 4, 0.2), (1, "hard", 10, 4, 0.5531), (1, "hard", 0, 8, -0.1412),
             (0, "hard", 10, 4, 0.4935)]
    for acc, d, n, t, e in table:
        assert round(er.ares_shaping(bool(acc), d, n, t, 0.5), 4) == e
    for d, ok, n, R in [("easy", 1, 14, 0.7857), ("easy", 1, 11, 1.0), ("easy", 0, 10, 0.15), ("medium", 1, 5, 0.9053),
                        ("hard", 1, 14, 1.5545), ("hard", 1, 4, 0.9688), ("hard", 0, 14, 0.3249), ("hard", 0, 0, 0.3)]:
        assert round(ok + er.ares_shaping(bool(ok), d, n, 10, 0.5), 4) == R
    assert min(er.ares_shaping(False, d, n, t, 0.5) for d in er.ARES_SHAPING for n in range(60) for t in range(30)) >= 0.15 - 1e-12
    with pytest.raises(ValueError, match="bucket must be one of"):
        er.ares_shaping(True, "trivial", 1, 1)


def test_ares_shaping_is_the_piecewise_rule_written_out():
    "An independent transcription of §23's cases (float64), over a grid of counts, targets and scales."
    sig = lambda x, t: 1 / (1 + np.exp(-x / t))
    hub = lambda x, k: np.where(x <= k, x * x / (2 * k), x - k / 2)
    P = {"easy": (0.15, 2, 2, 1.0, 0.6), "medium": (0.25, 3, 2.5, 1.0, 0.8), "hard": (0.35, 4, 3, 1.2, 1.0)}
    for d, (f, k, t, cf, wf) in P.items():
        for a in (0.0, 0.3, 1.7):
            for tgt in range(0, 15):
                for n in range(0, 30):
                    c, dl, m = a * cf, n - tgt, max(1, f * max(tgt, 1))
                    want = {True: {"easy": -min(c, hub(max(dl - m, 0), k) * c / (m + k)),
                                   "medium": -min(c, hub(max(abs(dl) - m, 0), k) * c / (m + k)),
                                   "hard": c * sig(dl + m, t) if dl >= -m else -min(c, 0.5 * hub(-dl - m, k) * c / (m + k))}[d],
                            False: wf * c * sig(max(dl - m, 0), t)}
                    for ok in (True, False):
                        assert abs(er.ares_shaping(ok, d, n, tgt, a) - float(want[ok])) < 1e-12


def test_trigger_mask_decodes_the_top1_token():
    class Tok:                                  # SentencePiece / byte-level BPE style token strings
        vocab = {0: "▁Wait", 1: "ĠSo", 2: "so", 3: "Ġsoon", 4: " LET ", 5: "x"}
        def decode(self, ids): return self.vocab[ids[0]]
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 0, 0, 0, 0, 0]])
    M = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).bool()
    got = er.trigger_mask(ids, M, Tok(), ["wait", "so", "let"])
    assert got.tolist() == [[True, True, True, False, True, False], [False, True, False, False, False, False]]
    with pytest.raises(ValueError, match="top1_ids has shape"):
        er.trigger_mask(ids[:, :3], M, Tok(), ["so"])


def test_ares_state_targets_alpha_and_tau_over_two_batches():
    g = torch.Generator().manual_seed(1)
    B, T, G = 8, 12, 4
    H = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    trig = torch.rand(B, T, generator=g) < 0.3
    M = torch.arange(T)[None] < torch.tensor([12, 10, 9, 12, 5, 12, 11, 7])[:, None]
    correct = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])            # 3/4 easy, 1/4 hard
    st = er.ares_reward_state(**REWARD_SHAPERS.resolve("ares", {}))
    assert st == {"tau": 0.0, "tau_set": False, "alpha": [0.5, 0.5, 0.5]}
    rows = [(H[i][M[i]], trig[i][M[i]]) for i in range(B)]
    p95 = np.array([er.window_percentile(h, 4, 95) for h, _ in rows])
    R, met = er.ares_rewards(torch.zeros(B), H, M, trig, correct, G, st)
    tau0 = p95.mean()
    assert abs(met["ares/tau"] - tau0) < 1e-12 and abs(st["tau"] - (0.99 * tau0 + 0.01 * np.median(p95))) < 1e-12
    N = np.array([er.hwe_counts(h, t, tau0, 4)[0] for h, t in rows], dtype=float)
    easy, hard = N[:4].mean(), N[4:].mean()
    want = [er.ares_shaping(bool(c), "easy" if i < 4 else "hard", N[i], round(easy if i < 4 else hard), 0.5)
            for i, c in enumerate(correct.tolist())]
    assert np.allclose(R.numpy(), want, atol=1e-12)
    assert abs(st["alpha"][0] - min(2, max(0, 0.5 + 0.05 * (easy - round(easy))))) < 1e-12
    assert abs(st["alpha"][2] - min(2, max(0, 0.5 + 0.05 * (round(hard) - hard)))) < 1e-12 and st["alpha"][1] == 0.5
    tau1 = st["tau"]
    _, met = er.ares_rewards(torch.zeros(B), H, M, trig, correct, G, st)      # the second batch counts with the EMA'd τ
    assert met["ares/tau"] == tau1
    with pytest.raises(ValueError, match="do not split into groups"):
        er.ares_rewards(torch.zeros(B), H, M, trig, correct, 3, st)


@pytest.mark.parametrize("bad,words", [({"window": 0}, "window must be a positive int"), ({"window": 2.5}, "must be a int"),
                                       ({"percentile": 101.0}, "percentile must be in"), ({"ema": -0.1}, "ema must be in"),
                                       ({"tau": "auto"}, "tau must be None"), ({"alpha_max": 0.0}, "alpha_max > 0"),
                                       ({"alpha_lr": -0.1}, "alpha_lr >= 0"), ({"triggers": "wait"}, "triggers must be None"),
                                       ({"triggers": ["wait", ""]}, "triggers must be None"), ({"entropy": "old"}, "entropy must be one of")])
def test_ares_bad_options_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        REWARD_SHAPERS.resolve("ares", bad)


# ------------------------------------------------------------------------------------------------ the view
def test_rollout_view_needs_are_checked_per_stage():
    "A rollout-phase stage may read the engine's records; an advantage estimator (after the rollout) may not."
    assert {"policy_entropy", "sampling_entropy", "top1_ids", "group_size", "tokenizer"} == set(ROLLOUT_NEEDS)
    TrainConfig.from_dict(model="tiny", reward_shaping=["ares"])            # accepted at config time
    ADVANTAGES.register("_reads_top1", lambda r, G, batch: r, {}, "test only", needs={"top1_ids"})
    GROUP_FILTERS.register("_reads_top1", lambda r, G, view: torch.ones(len(r) // G, dtype=torch.bool), {}, "test only",
                           needs={"top1_ids"})
    try:
        with pytest.raises(ValueError, match=r"the advantage stage as configured needs \['top1_ids'\]"):
            TrainConfig.from_dict(model="tiny", advantage="_reads_top1")
        TrainConfig.from_dict(model="tiny", group_filter="_reads_top1")
    finally:
        del ADVANTAGES._entries["_reads_top1"], GROUP_FILTERS._entries["_reads_top1"]


# ------------------------------------------------------------------------------------------------ training steps
def record_rollout_fields(trainer, seen: list):
    """Stand-in for interfaces §1 where the engine does not record them yet: policy_entropy (entropy of softmax(z / T))
    and top1_ids from a teacher-forced pass of the policy; keeps each rollout in `seen`."""
    generate = trainer.engine.generate

    def wrapped(prompts, **kw):
        rb = generate(prompts, **kw)
        if getattr(rb, "policy_entropy", None) is None or getattr(rb, "top1_ids", None) is None:
            P, m = rb.prompt_ids.shape[1], rb.response_mask
            with torch.no_grad():
                z = trainer.unwrapped(**rb.model_inputs()).logits[:, P - 1:-1].double() / kw["temperature"]
            lp = z.log_softmax(-1)
            rb.policy_entropy = torch.where(m, -(lp.exp() * lp).sum(-1), 0.0).float()
            rb.top1_ids = torch.where(m, z.argmax(-1), 0)
        seen.append(rb)
        return rb
    trainer.engine.generate = wrapped


def _trainer_passes_stage_state() -> bool:
    return "stage_states" in inspect.getsource(StepPipeline) or hasattr(Trainer, "stage_states")


def test_one_step_with_pear_on_the_tiny_model(tmp_path):
    from test_trainer import odd_length
    tr = Trainer(TrainConfig.from_dict(dict(TINY, steps=1, output_dir=str(tmp_path / "pear"), reward_shaping=["pear"],
                                            reward_shaping_options={"pear": {"lambda_think": 0.3}})), reward_fn=odd_length)
    seen = []
    record_rollout_fields(tr, seen)
    m = tr.train().metrics[0]
    rb = seen[0]
    H, M = rb.policy_entropy.double(), rb.response_mask
    think = (H * M).sum(-1) / M.sum(-1).clamp(min=1)               # the tiny model never writes "</think>": all thinking
    scores = torch.tensor([odd_length(t, None) for t in rb.texts], dtype=torch.float64)
    assert abs(m["pear/think_entropy"] - think.mean().item()) < 1e-5 and m["pear/marker_frac"] == 0.0
    assert abs(m["sampling/reward_mean_drawn"] - (scores - 0.3 * think).mean().item()) < 1e-5
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0


def test_one_step_with_ares_on_the_tiny_model(tmp_path, monkeypatch):
    from test_trainer import odd_length
    opts = {"triggers": CHARS, "window": 2}
    cfg = TrainConfig.from_dict(dict(TINY, steps=1, output_dir=str(tmp_path / "ares"), reward_shaping=["ares"],
                                     reward_shaping_options={"ares": opts}))
    state = er.ares_reward_state(**cfg.reward_shaping_options["ares"])
    if not _trainer_passes_stage_state():    # until the stage-state interface (§3) lands: the state the trainer would create
        entry = REWARD_SHAPERS.get("ares")
        monkeypatch.setitem(REWARD_SHAPERS._entries, "ares", dataclasses.replace(entry, fn=functools.partial(entry.fn, state=state)))
    tr = Trainer(cfg, reward_fn=odd_length)
    seen = []
    record_rollout_fields(tr, seen)
    m = tr.train().metrics[0]
    if _trainer_passes_stage_state():
        state = tr.stage_states["reward_shaping/ares"]
    rb = seen[0]
    M = rb.response_mask
    # independent: the triggers (every letter or digit as top-1), τ = mean p95 of the batch, counts, shaping
    trig = torch.tensor([[tiny_tokenizer().decode([i]).strip().lower() in CHARS for i in row] for row in rb.top1_ids.tolist()]) & M
    rows = [(rb.policy_entropy[i][M[i]].double(), trig[i][M[i]]) for i in range(len(M))]
    tau = float(np.mean([numpy_hwe(h.numpy(), t.numpy(), 0.0, 2)[3] for h, t in rows]))
    N = [numpy_hwe(h.numpy(), t.numpy(), tau, 2)[0] for h, t in rows]
    assert abs(m["ares/tau"] - tau) < 1e-5 and abs(m["ares/hwe_count"] - np.mean(N)) < 1e-9 and state["tau_set"]
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and math.isfinite(m["sampling/reward_mean_drawn"])


def test_ares_state_is_checkpointed_and_resumed(tmp_path):
    "Two steps straight = one step, then a resumed second: the same τ, α and metrics (the stage state of chapter 04a)."
    if not _trainer_passes_stage_state():
        pytest.skip("waits on the trainer's stage state (interfaces §3)")
    from test_trainer import odd_length, strip_timing
    kw = dict(TINY, reward_shaping=["ares"], reward_shaping_options={"ares": {"triggers": CHARS, "window": 2}})

    def run(steps, name):
        tr = Trainer(TrainConfig.from_dict(dict(kw, steps=steps, output_dir=str(tmp_path / name))), reward_fn=odd_length)
        record_rollout_fields(tr, [])
        return tr, tr.train().metrics
    full, m_full = run(2, "full")
    run(1, "split")
    split, m_split = run(2, "split")
    assert strip_timing(m_full) == strip_timing(m_split)
    assert full.stage_states["reward_shaping/ares"] == split.stage_states["reward_shaping/ares"]
    s = full.stage_states["reward_shaping/ares"]
    assert s["tau_set"] and s["tau"] != m_full[0]["ares/tau"]                  # the EMA moved τ after step 1
    assert m_full[1]["ares/tau"] == m_split[1]["ares/tau"] != m_full[0]["ares/tau"]


def test_one_step_with_the_majority_reward(tmp_path):
    cfg = TrainConfig.from_dict(dict(TINY, steps=1, output_dir=str(tmp_path / "maj"),
                                     task_options={"instruction": None, "reward": "majority"}))
    tr = Trainer(cfg)
    seen = []
    tr.engine.generate = (lambda gen: lambda prompts, **kw: seen.append(gen(prompts, **kw)) or seen[-1])(tr.engine.generate)
    m = tr.train().metrics[0]
    problems = tr.task.sample(2, "train", seed=cfg.seed * 1_000_003)           # _draw's problems of step 0, round 0
    texts = seen[0].texts
    per = [majority_rewards(texts[4 * g:4 * g + 4], truth=p.answer) for g, p in enumerate(problems)]
    r = torch.tensor([x for rr, _ in per for x in rr], dtype=torch.float64)
    for k in ("reward/majority_ratio", "reward/label_accuracy", "reward/true_accuracy"):
        assert abs(m[k] - np.mean([mm[k] for _, mm in per])) < 1e-9, k
    assert abs(m["pass_rate"] - r.mean().item()) < 1e-6 and abs(m["reward_mean"] - r.mean().item()) < 1e-6
    assert math.isfinite(m["loss"])


def test_majority_reward_spec_and_grpo_advantages():
    r, m = majority_rewards(["2", "2", "3", "none", "2", "5", "3", "2"], truth="2")
    assert r == [1, 1, 0, 0, 1, 0, 0, 1] and m["reward/majority_ratio"] == 0.5
    assert torch.allclose(group_advantages(torch.tensor(r, dtype=torch.float64), 8).abs(), torch.tensor(0.5 / math.sqrt(2 / 7), dtype=torch.float64))
    assert round(0.5 / math.sqrt(2 / 7), 4) == 0.9354
    assert majority_rewards(["3", "2", "2", "3"])[0] == [1, 0, 0, 1] and majority_rewards(["x", "", "7", "8"])[0] == [0, 0, 1, 0]
    from entropy_rl.trainer import build_task
    with pytest.raises(ValueError, match="reward must be one of"):
        build_task(TrainConfig.from_dict(model="tiny", task_options={"reward": "vote"}))


def test_spine_recipe_trains_one_step_from_the_command_line(tmp_path):
    from entropy_rl.cli import main
    run = tmp_path / "spine"
    assert main(["train", "--recipe", "spine", "--model", "tiny", "--steps", "1", "--output-dir", str(run), "prompts_per_step=2",
                 "group_size=4", "max_new_tokens=6", "lr=0.01", "progress=false", "plot=false", "task_options.instruction=null"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["task_options"]["reward"] == "majority" and cfg["loss_options"]["top_entropy_frac"] == 0.2
    assert "spine_band" in cfg["regularizers"] and cfg["recipe"] == "spine"
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()][0]
    assert "reward/majority_ratio" in m and "reg/spine_band" in m and math.isfinite(m["loss"])
