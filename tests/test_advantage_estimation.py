"Bad input and sweep tests of entropy_rl.advantage_estimation (CANON, RiskPO), and one training step of each entry on the tiny model."
import pytest
import torch

import entropy_rl.advantage_estimation as ae
from entropy_rl.advantages import ADVANTAGES, dr_grpo_advantages
from entropy_rl.trainer import train
from test_trainer import TINY, odd_length      # the tiny-model settings and stand-in verifier of the trainer's tests

D = torch.float64


# ---- CANON ----------------------------------------------------------------------------------------------------------
def test_canon_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of group_size"):
        ae.canon_halves(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="NaN"):
        ae.canon_halves(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="estimator"):
        ae.canon_advantages(torch.zeros(4), 2, torch.zeros(4), estimator="time")
    with pytest.raises(ValueError, match="not divisible"):
        ae.canon_advantages(torch.zeros(5), 2, torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        ae.canon_advantages(torch.tensor([0.0, float("inf")]), 2, torch.zeros(2))


@pytest.mark.parametrize("bad, words", [(dict(metric="time"), "metric"), (dict(schedule="linear"), "schedule"),
                                        (dict(mu=1.5), "mu must"), (dict(schedule="cosine_restart", mu=0.2), "schedule sets"),
                                        (dict(alpha=float("nan")), "alpha"), (dict(mu="half"), "must be a float")])
def test_canon_bad_options_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        ADVANTAGES.resolve("canon", bad)


def test_canon_sweep_properties():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        G = int(torch.randint(2, 9, (1,), generator=g))
        R = torch.randint(0, 2, (3 * G,), generator=g).to(D)
        met = torch.randint(0, 3, (3 * G,), generator=g).to(D)              # ties: the stable sort decides
        inter = ae.canon_advantages(R, G, met).view(3, G)
        high = ae.canon_halves(met, G).view(3, G)
        assert (high.sum(1) == G - G // 2).all()
        # inter at α = 1, β = 0 sums to (|H| − |L|)(R̄_H − R̄_L) per group: zero for even groups
        diff = (R.view(3, G) * high).sum(1) / high.sum(1) - (R.view(3, G) * ~high).sum(1) / (~high).sum(1)
        torch.testing.assert_close(inter.sum(1), (high.sum(1) - (~high).sum(1)).to(D) * diff)
        if G % 2 == 0:
            torch.testing.assert_close(ae.canon_advantages(R, G, met, mu=0.5), dr_grpo_advantages(R, G))
        # permuting within groups permutes the advantages (a continuous metric: no ties)
        mc = torch.rand(3 * G, generator=g, dtype=D)
        rows = torch.cat([q * G + torch.randperm(G, generator=g) for q in range(3)])
        torch.testing.assert_close(ae.canon_advantages(R[rows], G, mc[rows]), ae.canon_advantages(R, G, mc)[rows])


def test_canon_schedule_refuses_a_missing_step():
    with pytest.raises(ValueError, match="training step"):
        ae.canon_intra_weight("cosine_restart_r", step=-1)
    with pytest.raises(ValueError, match="mean reward"):
        ae.canon_intra_weight("annel")
    with pytest.raises(ValueError, match="schedule"):
        ae.canon_intra_weight("none", step=1)


# ---- RiskPO ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, words", [(dict(alpha=0.8, beta=0.2), "alpha < beta"), (dict(beta=1.0), "alpha < beta"),
                                        (dict(bundle_size=0), "bundle_size"), (dict(weight=-1.0), "weight"),
                                        (dict(credit="mean"), "credit"), (dict(reading="tracked"), "reading"),
                                        (dict(tracker_lr=0.0), "tracker_lr"), (dict(bundle_size=2.5), "must be a int")])
def test_riskpo_bad_options_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        ADVANTAGES.resolve("riskpo", bad)


def test_riskpo_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        ae.riskpo_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="two papers"):
        ae.riskpo_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="credit"):
        ae.riskpo_credit(torch.zeros(2, dtype=D), torch.zeros(2, 1, dtype=D), "rank")
    with pytest.raises(ValueError, match="levels"):
        ae.QuantileTracker((0.2, 1.0))
    with pytest.raises(ValueError, match="lr"):
        ae.QuantileTracker((0.2, 0.8), lr=-1)


def test_riskpo_sweep_credit_conserves_the_paper_advantage():
    "sum-mean splits a_j over the bundle's prompts (Σ_q ρ_q/Σρ = 1, or B·a_j/B); uniform gives each response a_j."
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        G, Q = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        R = torch.randint(0, 2, (Q * G,), generator=g).to(D)
        adv = ae.riskpo_advantages(R, G, bundle_size=3)
        uni = ae.riskpo_advantages(R, G, bundle_size=3, credit="uniform")
        for rows in ae.riskpo_bundles(G, Q, 3):
            torch.testing.assert_close(adv[rows].sum(1), uni[rows][:, 0])
            assert (uni[rows] == uni[rows][:, :1]).all()
        nu1 = ae.riskpo_advantages(R, G, bundle_size=3, nu=1.0, credit="uniform")
        assert (nu1 <= 1e-9).all()                                          # ν = 1: no positive advantage
    # a bundle of one prompt: S_j = R_j
    R = torch.tensor([1.0, 0.0, 0.0, 1.0])
    a = ae.riskpo_paper_advantages(R, *torch.quantile(R.double(), torch.tensor([0.2, 0.8], dtype=D)).tolist())
    torch.testing.assert_close(ae.riskpo_advantages(R, 4, credit="uniform"), a.float())


def test_riskpo_track_state_is_per_run_observed_checkpointed_and_resumed(tmp_path):
    "The tracker is the trainer's stage state: fresh per run, folded in once per step, restored exactly on resume."
    from entropy_rl.trainer import Trainer
    from test_trainer import strip_timing
    kw = dict(TINY, advantage="riskpo", advantage_options={"reading": "track", "bundle_size": 1})
    full = Trainer(dict(kw, steps=3, output_dir=str(tmp_path / "full")), reward_fn=odd_length)
    seen, orig = [], full._observe
    full._observe = lambda view: (seen.append(view["rewards"].clone()), orig(view))
    m_full = full.train().metrics
    state = full.stage_states["advantage/riskpo"]
    # independent: with one prompt per bundle the papers are the responses, S = the rewards; the tracker starts at the
    # first step's (0.2, 0.8) quantiles and moves by 0.1 (α − share below) after
    q = torch.quantile(seen[0].double(), torch.tensor([0.2, 0.8], dtype=D))
    for r in seen[1:]:
        q = q + 0.1 * (torch.tensor([0.2, 0.8], dtype=D) - (r.double()[None, :] < q[:, None]).double().mean(1))
    assert len(seen) == 3
    torch.testing.assert_close(torch.tensor(state["tracked"], dtype=D), q)
    Trainer(dict(kw, steps=1, output_dir=str(tmp_path / "split")), reward_fn=odd_length).train()
    split = Trainer(dict(kw, steps=3, output_dir=str(tmp_path / "split")), reward_fn=odd_length)
    assert strip_timing(split.train().metrics) == strip_timing(m_full)
    assert split.stage_states["advantage/riskpo"] == state
    assert Trainer(dict(kw, steps=3, output_dir=str(tmp_path / "other")),
                   reward_fn=odd_length).stage_states["advantage/riskpo"] == {"tracked": None, "q": None}


# ---- one training step on the tiny model ------------------------------------------------------------------------------
@pytest.mark.parametrize("advantage, options", [("canon", {}), ("canon", {"metric": "length", "mu": 0.5}),
                                                ("canon", {"schedule": "annel"}), ("riskpo", {}),
                                                ("riskpo", {"reading": "track", "credit": "std", "nu": 1.0})])
def test_estimators_train_one_step(tmp_path, advantage, options):
    res = train(steps=2, output_dir=str(tmp_path / advantage), **TINY, advantage=advantage, advantage_options=options,
                reward_fn=odd_length)
    assert all(m["grad_norm"] > 0 for m in res.metrics)


def test_canon_step_schedule_reads_the_step_from_the_batch(tmp_path):
    "The trainer's StepBatch carries the step (from 1), so the cosine schedules train; a batch without it is refused."
    res = train(steps=2, output_dir=str(tmp_path / "c"), **TINY, advantage="canon",
                advantage_options={"schedule": "cosine_restart"}, reward_fn=odd_length)
    assert [m["step"] for m in res.metrics] == [1, 2] and all(m["grad_norm"] == m["grad_norm"] for m in res.metrics)
    from entropy_rl.advantages import ADVANTAGES
    e = ADVANTAGES.get("canon")
    batch = {"mask": torch.ones(4, 3, dtype=torch.bool), "entropy": torch.rand(4, 3), "max_new_tokens": 3}
    with pytest.raises(ValueError, match="batch\\['step'\\]"):
        e.fn(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4, batch, **ADVANTAGES.resolve("canon", {"schedule": "cosine_restart"}))


# ---- HAPO's token-level average --------------------------------------------------------------------------------------
def test_hapo_token_level_refuses_bad_input_and_centres_tokens():
    with pytest.raises(ValueError, match="lengths"):
        ae.hapo_token_level_advantages(torch.ones(4), torch.ones(3), 2)
    with pytest.raises(ValueError, match="no tokens"):
        ae.hapo_token_level_advantages(torch.tensor([1.0, 0.0]), torch.zeros(2), 2)
    with pytest.raises(ValueError, match="fallback"):
        ae.hapo_token_level_advantages(torch.tensor([1.0, 0.0]), torch.ones(2), 2, fallback=float("inf"))
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        R = torch.randint(0, 2, (12,), generator=g).float()
        L = torch.randint(1, 10, (12,), generator=g)
        a = ae.hapo_token_level_advantages(R, L, 4, fallback=1e9).view(3, 4)
        assert ((L.view(3, 4) * a).sum(1).abs() < 1e-4).all()               # Σ|o|Â = 0 per group without fallback


def test_hapo_token_level_trains_one_step(tmp_path):
    res = train(steps=1, output_dir=str(tmp_path / "h"), **TINY, algo="hapo", advantage="hapo_token_level",
                reward_fn=odd_length)
    assert res.metrics[0]["grad_norm"] > 0
