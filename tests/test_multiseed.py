"""The multi-seed analysis (chapter 13b): the law's fit and R², the first-third prediction, seed bands and intervals,
and reading logs of runs that were interrupted."""
import json
import math

import numpy as np
import pytest

from entropy_rl.multiseed import (curve, fit_law, held_out, method_summary, predict_final, read_experiment, read_run,
                                  run_summary, seed_band, seed_interval, t975, versus, versus_baseline)


def _law(H, a, b):
    return -a * np.exp(H) + b


def test_fit_recovers_a_b_exactly_and_under_noise():
    H = np.linspace(0.05, 2.5, 60)
    f = fit_law(H, _law(H, 0.07, 0.95))
    assert abs(f["a"] - 0.07) < 1e-12 and abs(f["b"] - 0.95) < 1e-12 and abs(f["r2"] - 1) < 1e-12
    rng = np.random.default_rng(0)
    errs = []
    for _ in range(200):          # unbiased under noise: the mean estimate is close, single fits within a few sd
        f = fit_law(H, _law(H, 0.07, 0.95) + 0.02 * rng.standard_normal(H.size))
        errs.append((f["a"] - 0.07, f["b"] - 0.95))
    errs = np.array(errs)
    assert np.all(np.abs(errs.mean(0)) < 2e-3), errs.mean(0)
    assert np.all(np.abs(errs).max(0) < [0.02, 0.06])


def test_r2_against_naive_float64():
    rng = np.random.default_rng(1)
    H = rng.uniform(0.1, 2.0, 40)
    R = _law(H, 0.1, 0.9) + 0.05 * rng.standard_normal(40)
    f = fit_law(H, R)
    # naive: ordinary least squares of R on [1, -e^H] with numpy's lstsq, R² = 1 - SSE / SST written out
    X = np.stack([np.ones_like(H), -np.exp(H)], 1)
    (b, a), *_ = np.linalg.lstsq(X, R, rcond=None)
    pred = X @ np.array([b, a])
    r2 = 1 - sum((r - p) ** 2 for r, p in zip(R, pred)) / sum((r - R.mean()) ** 2 for r in R)
    assert abs(f["a"] - a) < 1e-10 and abs(f["b"] - b) < 1e-10 and abs(f["r2"] - r2) < 1e-10
    assert 0 < f["r2"] < 1


def test_first_third_prediction_on_synthetic_runs():
    # a run that follows one law throughout: the early fit predicts the end exactly, both ways when H ends at 0
    T = 60
    H = 2.0 * np.exp(-np.arange(T) / 12)
    p = predict_final(H, _law(H, 0.08, 0.9), last=5)
    assert p["n_fit"] == 20 and abs(p["a"] - 0.08) < 1e-10 and abs(p["b"] - 0.9) < 1e-10
    assert abs(p["error_at_final_entropy"]) < 1e-10
    assert abs(p["final_reward"] - _law(H[-5:], 0.08, 0.9).mean()) < 1e-12
    # the ceiling b - a is the reward at H = 0; this run ends at H ≈ 0.015, so the error is a(e^H_end - 1) on average
    want = (0.9 - 0.08) - _law(H[-5:], 0.08, 0.9).mean()
    assert abs(p["error_ceiling"] - want) < 1e-12 and want > 0
    # a run whose law changes after the first third: the early law mispredicts by the change, with the right sign
    R = _law(H, 0.08, 0.9)
    R[20:] -= 0.1
    p = predict_final(H, R, last=5)
    assert abs(p["error_at_final_entropy"] - 0.1) < 1e-10


def test_prediction_refuses_short_runs():
    with pytest.raises(ValueError, match="too short"):
        predict_final(np.linspace(2, 0, 8), np.linspace(0, 1, 8), last=5)


def test_seed_band_against_numpy():
    rng = np.random.default_rng(2)
    C = rng.normal(size=(3, 12))
    b = seed_band(list(C))
    assert np.allclose(b["mean"], C.mean(0)) and np.allclose(b["std"], C.std(0, ddof=1))
    assert np.allclose(b["lo"], C.mean(0) - C.std(0, ddof=1)) and np.allclose(b["max"], C.max(0))
    assert (b["n"] == 3).all() and (b["steps"] == np.arange(1, 13)).all()
    # a partial run contributes only its steps: after step 5 the band rests on the other two
    b = seed_band([C[0], C[1], C[2, :5]])
    assert (b["n"][:5] == 3).all() and (b["n"][5:] == 2).all()
    assert np.allclose(b["mean"][5:], C[:2, 5:].mean(0)) and np.allclose(b["std"][5:], C[:2, 5:].std(0, ddof=1))
    # one seed: the band has no width
    b = seed_band([C[0]])
    assert np.allclose(b["mean"], C[0]) and (b["std"] == 0).all()


def test_seed_interval_and_t_quantiles():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 10, 29, 30, 45, 120):
        assert abs(t975(df) - stats.t.ppf(0.975, df)) < 2e-3, df
    v = [0.2, 0.35, 0.31]
    s = seed_interval(v)
    h = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / math.sqrt(3)
    assert abs(s["mean"] - np.mean(v)) < 1e-12 and abs(s["hi"] - s["mean"] - h) < 2e-3 * np.std(v, ddof=1)
    assert math.isnan(seed_interval([0.4])["lo"]) and seed_interval([0.4, None])["n"] == 1


def test_held_out_interval_is_over_problems():
    h = held_out({"pass@1": 0.5, "pass@4": 0.8, "problems": 50})
    # Wilson with n = 50 (problems), not 400 (samples): for p = 0.5 the half-width is about 1.96·sqrt(.25/50)
    assert abs((h["pass@1"]["hi"] - h["pass@1"]["lo"]) / 2 - 1.96 * math.sqrt(0.25 / 50)) < 0.01
    assert h["pass@4"]["lo"] < 0.8 < h["pass@4"]["hi"]
    with pytest.raises(ValueError):
        held_out({"pass@1": 0.5})


def _write_run(d, rewards, entropies, target=None, eval_=None, cut_last_line=False):
    d.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "reward_mean": r, "entropy": h}) for i, (r, h) in enumerate(zip(rewards, entropies))]
    text = "\n".join(lines) + "\n"
    if cut_last_line:
        text += '{"step": %d, "reward_me' % (len(lines) + 1)      # killed mid-write
    (d / "metrics.jsonl").write_text(text)
    (d / "config.json").write_text(json.dumps({"steps": target or len(lines)}))
    if eval_: (d / "eval.json").write_text(json.dumps(eval_))


def test_reading_a_partial_experiment(tmp_path):
    H = 2.0 * np.exp(-np.arange(30) / 8)
    R = list(_law(H, 0.1, 0.95))
    _write_run(tmp_path / "grpo" / "seed0", R, H, eval_={"pass@1": 0.6, "pass@4": 0.9, "problems": 50})
    _write_run(tmp_path / "grpo" / "seed1", R[:7], H[:7], target=30, cut_last_line=True)   # interrupted at step 7
    (tmp_path / "kl_cov").mkdir()                                                            # started, nothing logged
    exp = read_experiment(tmp_path, ["grpo", "kl_cov", "siren"])
    assert list(exp) == ["grpo"] and list(exp["grpo"]) == [0, 1]
    part = exp["grpo"][1]
    assert part["steps"] == 7 and not part["complete"] and part["target_steps"] == 30 and part["eval"] is None
    assert np.allclose(curve(part, "entropy"), H[:7])
    s = run_summary(part)
    assert s["prediction"] is None and s["held_out"] is None and s["fit"] is not None
    full = run_summary(exp["grpo"][0])
    assert full["complete"] and abs(full["fit"]["r2"] - 1) < 1e-9 and abs(full["prediction"]["error_at_final_entropy"]) < 1e-9
    m = method_summary(exp["grpo"])
    assert m["seeds"] == 2 and m["complete"] == 1 and m["pass@1"]["n"] == 1 and m["reward_final"]["n"] == 2
    assert read_experiment(tmp_path / "nothing_here") == {}


def test_read_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 3}\n')
    with pytest.raises(ValueError, match="steps must run"):
        read_run(tmp_path)


def test_versus_baseline_against_a_hand_computed_welch_interval(tmp_path):
    """Final entropies 1.0/1.2/1.4 (method) against 0.2/0.5/0.8 (GRPO); pass@1 known per seed. Welch's df for equal n:
    (va + vb)² / ((va² + vb²) / (n − 1)); the half-width t_{0.975, floor(df)} · se worked out here by hand."""
    T = 20
    for m, finals, p1 in (("grpo", (0.2, 0.5, 0.8), (0.3, 0.4, 0.5)), ("siren", (1.0, 1.2, 1.4), (0.3, 0.3, 0.36))):
        for s, (h, p) in enumerate(zip(finals, p1)):
            _write_run(tmp_path / m / f"seed{s}", [0.5] * T, [2.0] * (T - 5) + [h] * 5, eval_={"pass@1": p, "pass@4": p, "problems": 50})
    _write_run(tmp_path / "lonely" / "seed0", [0.5] * T, [1.0] * T)          # one seed: no comparison
    exp = read_experiment(tmp_path, ["grpo", "siren", "lonely"])
    v = versus_baseline(exp)
    assert set(v) == {"siren", "lonely"} and all(x is None for x in v["lonely"].values())
    e = v["siren"]["entropy_final"]
    va, vb = 0.04 / 3, 0.09 / 3                          # sample variances 0.04 and 0.09 over n = 3
    df = 2 * 0.13 ** 2 / (0.04 ** 2 + 0.09 ** 2)          # Welch's df simplified by hand for n = 3: 3.48… → 3 → t = 3.182
    assert abs(e["diff"] - 0.7) < 1e-12 and abs(e["df"] - df) < 1e-12
    assert abs(e["hi"] - 0.7 - 3.182 * math.sqrt(va + vb)) < 1e-9 and e["lo"] > 0     # SIREN's entropy is higher
    half = v["siren"]["entropy_second_half"]             # steps 11–20: five at 2.0, five at the final value
    assert abs(half["diff"] - 0.7 / 2) < 1e-12 and abs(half["se"] - math.sqrt(va + vb) / 2) < 1e-12
    p = v["siren"]["pass@1"]
    assert abs(p["diff"] - (0.32 - 0.4)) < 1e-12 and p["lo"] < 0 < p["hi"]           # accuracy: no difference shown
    with pytest.raises(KeyError, match="baseline"):
        versus_baseline(exp, baseline="nope")
    with pytest.raises(ValueError):
        versus([1.0, float("nan")], [0.0, 1.0])          # a NaN dropped leaves one seed


def test_versus_unequal_seeds_and_a_missing_eval(tmp_path):
    """n = 3 against n = 2 (chapter 13b checks df 2.029884… and t = 4.303 for [1, 2, 3] against [0.5, 0.6]), a df that
    floating point puts just below a whole number, and a method whose third seed has no held-out evaluation yet: its
    pass@1 comparison rests on the two seeds that have one."""
    assert (versus([1.0, 2.0, 3.0], [0.5, 0.6])["n"], versus([1.0, 2.0, 3.0], [0.5, 0.6])["n_baseline"]) == (3, 2)
    # mirror images (equal spread, n = 5): df is 8 in exact arithmetic but 7.999999999999999 in floating point; the
    # interval must still use t_{0.975, 8} = 2.306, not t_{0.975, 7} = 2.365
    w = versus([0.03, 0.12, 0.67, 0.65, 0.62], [0.38, 0.35, 0.33, 0.88, 0.97])
    assert w["df"] < 8 and abs(w["df"] - 8) < 1e-12 and abs(w["hi"] - w["diff"] - 2.306 * w["se"]) < 1e-9
    T = 20
    for m, p1 in (("grpo", (0.3, 0.4, 0.5)), ("kl_cov", (0.5, 0.7, None))):
        for s, p in enumerate(p1):
            _write_run(tmp_path / m / f"seed{s}", [0.5] * T, [1.0] * T,
                       eval_={"pass@1": p, "pass@4": p, "problems": 50} if p is not None else None)
    p = versus_baseline(read_experiment(tmp_path, ["grpo", "kl_cov"]))["kl_cov"]["pass@1"]
    assert (p["n"], p["n_baseline"]) == (2, 3) and abs(p["diff"] - (0.6 - 0.4)) < 1e-12
