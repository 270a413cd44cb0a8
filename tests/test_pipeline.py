"""The step as a pipeline of registered stages (issue 15): every entry of every stage trains one step on the tiny
model; dynamic sampling and its bound; recipes through config.json and resume; the reference KL; one name per metric;
the equality tests (resume = uninterrupted, fused = unfused) with the new stages on."""
import json
import math
import warnings

import pytest
import torch

from entropy_rl.advantages import list_advantages, list_group_filters, list_reward_shapers
from entropy_rl.losses import list_regularizers
from entropy_rl.rollout import list_rollouts, list_samplers
from entropy_rl.trainer import (TrainConfig, Trainer, list_recipes, load_recipe, read_metrics, reduce_update_metrics,
                                train)

from test_trainer import TINY, odd_length, strip_timing, paths_rel   # the tiny run, the stand-in verifier, metrics without timings


def _finite_core(m):
    for k in ("reward_mean", "entropy", "loss", "grad_norm", "ratio/mean", "cov_mean"):
        assert k in m and math.isfinite(m[k]), (k, m.get(k))


STAGE_CASES = ([("rollout_structure", n) for n in list_rollouts()] + [("sampler", n) for n in list_samplers()] + [("reward_shaping", n) for n in list_reward_shapers()]
               + [("group_filter", n) for n in list_group_filters()] + [("advantage", n) for n in list_advantages()]
               + [("regularizer", n) for n in list_regularizers()])


# entries whose defaults need a value the trainer does not compute yet: the option that makes them trainable, or None
# when no option does (then the config is refused up front, naming what is missing)
NOT_PROVIDED: dict = {}


@pytest.mark.parametrize("stage,name", STAGE_CASES)
def test_every_registered_stage_entry_trains_one_step(tmp_path, stage, name):
    kw = dict(TINY, minibatches=2, reward_fn=odd_length)
    if stage == "reward_shaping":
        kw["reward_shaping"] = [name]
    elif stage == "rollout_structure":   # CURE: two originals per group (one alone has no signal at 4 tokens), char tokens
        kw.update(rollout_structure=name, rollout_structure_options={"cure": {"n2": 1, "min_token_chars": 1},
                                                                     "aepo": {"prompt_frac": 1.0},
                                                                     "eb_tree": {"branch_probability": 0.1}}.get(name, {}))
    elif stage == "regularizer":
        kw["regularizers"] = {name: {"coef": 0.1}}
        if name in NOT_PROVIDED:
            with pytest.raises(ValueError, match="which the trainer does not compute"):
                TrainConfig.from_dict({k: v for k, v in kw.items() if k != "reward_fn"})
            if NOT_PROVIDED[name] is None:
                return
            kw["regularizers"] = {name: {"coef": 0.1, **NOT_PROVIDED[name]}}
    else:
        kw[stage] = name
        if stage == "sampler":   # truncation at its defaults leaves the tiny model's 4-token samples identical: no signal
            kw["sampler_options"] = {"typical": {"typical_p": 0.99}, "top_h": {"top_h": 0.99},
                                     "mirostat_v1": {"tau": 8.0}}.get(name, {})
    res = train(steps=1, output_dir=str(tmp_path / name), **kw)
    m = res.metrics[0]
    _finite_core(m)
    assert m["grad_norm"] > 0
    if stage == "regularizer":
        assert f"reg/{name}" in m and math.isfinite(m[f"reg/{name}"])
    cfg = json.loads((tmp_path / name / "config.json").read_text())
    assert TrainConfig.from_dict(cfg).to_dict() == cfg                      # the resolved stages are recorded


def test_dynamic_sampling_hits_its_bound_and_says_so(tmp_path):
    "A task whose groups always agree: every round is dropped, the bound is hit, a warning names it, no update."
    with pytest.warns(UserWarning, match="dynamic sampling: 0 of 2 groups .* after 3 sampling rounds"):
        res = train(steps=1, output_dir=str(tmp_path / "r"), **TINY, dynamic_sampling=True, max_resample=2,
                    reward_fn=lambda text, problem: 1.0)
    m = res.metrics[0]
    assert m["sampling/bound_hit"] == 1 and m["sampling/rounds"] == 3 and m["update_skipped"] == 1
    assert m["sampling/groups_drawn"] == 6 and m["sampling/groups_dropped"] == 6


def test_dynamic_sampling_fills_the_step_with_groups_that_have_signal(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the bound must not be hit here
        res = train(steps=2, output_dir=str(tmp_path / "r"), **TINY, dynamic_sampling=True, max_resample=8,
                    reward_fn=odd_length)
    for m in res.metrics:
        assert m["groups_with_signal"] == 1.0     # only groups whose rewards differ were trained on
        assert m["sampling/groups_drawn"] - m["sampling/groups_dropped"] >= 2
        assert "update_skipped" not in m


def test_group_filter_counts_match_an_independent_count(tmp_path):
    "Without resampling the filter drops exactly the groups whose scores are all equal (recounted from the texts)."
    texts = []

    def grade(text, problem):
        texts.append(text)
        return odd_length(text, problem)

    res = train(steps=1, output_dir=str(tmp_path / "r"), **{**TINY, "prompts_per_step": 4}, group_filter="equal_rewards",
                reward_fn=grade)
    g = [[odd_length(t, None) for t in texts[i:i + 4]] for i in range(0, 16, 4)]
    flat = sum(len(set(x)) == 1 for x in g)
    m = res.metrics[0]
    assert m["sampling/groups_dropped"] == flat and m["sampling/groups_drawn"] == 4
    if flat < 4:
        assert m["groups_with_signal"] == 1.0


def test_recipes_ship_and_resolve():
    assert {"grpo", "dapo", "dr_grpo", "clip_cov", "kl_cov", "gspo"} <= set(list_recipes())
    for name in list_recipes():
        cfg = TrainConfig.from_dict(recipe=name, model="tiny")
        assert cfg.recipe == name
    dapo = TrainConfig.from_dict(recipe="dapo")
    assert dapo.algo == "dapo" and dapo.dynamic_sampling and dapo.group_filter == "equal_rewards"
    assert dapo.reward_shaping == ["overlong"] and dapo.loss_options["clip_high"] == 0.28
    # overrides win, dict fields merge key by key
    o = TrainConfig.from_dict(recipe="clip_cov", loss_options={"clip_ratio": 0.01}, steps=3)
    assert o.loss_options["clip_ratio"] == 0.01 and o.loss_options["cov_lb"] == 1.0 and o.steps == 3
    with pytest.raises(ValueError, match="unknown recipe 'dappo'"):
        TrainConfig.from_dict(recipe="dappo")
    assert load_recipe("kl_cov")["loss_options"]["k"] == 0.002


def test_recipe_round_trips_through_config_json_and_resumes(tmp_path):
    kw = dict(TINY, reward_fn=odd_length, recipe="dapo", max_resample=2)
    full = train(steps=3, output_dir=str(tmp_path / "full"), **kw).metrics
    train(steps=2, output_dir=str(tmp_path / "split"), **kw)
    cfg = json.loads((tmp_path / "split" / "config.json").read_text())
    assert cfg["recipe"] == "dapo" and cfg["reward_shaping"] == ["overlong"] and cfg["dynamic_sampling"] is True
    assert cfg["reward_shaping_options"]["overlong"] == {"max_length": None, "cache_length": None, "factor": 1.0}
    resumed = train(steps=3, output_dir=str(tmp_path / "split"), **kw).metrics
    assert strip_timing(full) == strip_timing(resumed)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_reference_kl_is_zero_at_step_one_and_positive_after(tmp_path, lora_rank):
    res = train(steps=3, output_dir=str(tmp_path / "r"), **{**TINY, "lr": 5e-2}, kl_coef=0.1, lora_rank=lora_rank,
                reward_fn=odd_length)
    kl = [m["kl/k3_mean"] for m in res.metrics]
    assert kl[0] == 0.0                                         # the policy is the reference before any update
    assert kl[1] > 0 and kl[2] > 0
    t = Trainer(dict(TINY, kl_coef=0.1, lora_rank=lora_rank, output_dir=str(tmp_path / "x")))
    assert (t.reference is None) == bool(lora_rank)             # LoRA: no second copy, the adapter is switched off


def test_metrics_have_one_name_per_meaning(tmp_path):
    m = train(steps=1, output_dir=str(tmp_path / "r"), **{**TINY, "minibatches": 2}, reward_fn=odd_length,
              loss_options={"entropy_coef": 0.01}).metrics[0]
    for dup in ("ratio_max", "ratio_min", "ratio_mean", "ratio_std", "entropy/mean", "time_train_s"):
        assert dup not in m
    assert m["ratio/min"] <= m["ratio/mean"] <= m["ratio/max"]


def test_update_metrics_are_reduced_over_the_whole_step():
    recs = [({"ratio/max": 1.5, "ratio/min": 0.9, "clip/frac": 0.5}, 2), ({"ratio/max": 1.1, "ratio/min": 0.7, "clip/frac": 0.0}, 6)]
    out = reduce_update_metrics(recs)
    assert out["ratio/max"] == 1.5 and out["ratio/min"] == 0.7
    assert out["clip/frac"] == pytest.approx((0.5 * 2 + 0.0 * 6) / 8)   # the share of all 8 tokens


def test_equalities_hold_with_new_stages_on(tmp_path):
    "fused = unfused and resume = uninterrupted, with RLOO, overlong shaping, a filter and the reference KL on."
    kw = dict(TINY, advantage="rloo", reward_shaping=["overlong"], group_filter="equal_rewards", kl_coef=0.05,
              minibatches=2, reward_fn=odd_length)
    full = train(steps=3, output_dir=str(tmp_path / "full"), **kw).metrics
    train(steps=1, output_dir=str(tmp_path / "split"), **kw)
    resumed = train(steps=3, output_dir=str(tmp_path / "split"), **kw).metrics
    assert strip_timing(full) == strip_timing(resumed)
    unfused = train(steps=3, output_dir=str(tmp_path / "unfused"), **kw, fused=False).metrics
    for a, b in zip(full, unfused):
        for k in ("loss", "kl/k3_mean", "entropy", "reward_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("bad,words", [
    (dict(rollout_structure="aepo", tis_cap=2.0), ["aepo", "tis_cap"]),
    (dict(regularizers={"ares_kl": {"coef": 0.01}}, batch_scope="local"), ["batch_scope='local'", "ares_kl"]),
    (dict(rollout_structure="cure", group_size=6), ["multiple of 1 + n2"]),
    (dict(advantage="gae"), ["advantage estimator", "gae", "rloo"]),
    (dict(advantage_options={"normalise_std": False}), ["normalise_std", "valid options"]),
    (dict(sampler="beam"), ["sampler", "beam", "default"]),
    (dict(reward_shaping=["overlong", "bogus"]), ["reward shaper", "bogus"]),
    (dict(reward_shaping_options={"overlong": {"factor": 1.0}}), ["reward_shaping_options", "does not switch on"]),
    (dict(reward_shaping=["overlong"], reward_shaping_options={"overlong": {"cache_length": "x"}}), ["cache_length"]),
    (dict(group_filter="equal_rewards", group_filter_options={"metric": "acc"}), ["metric must be"]),
    (dict(group_filter_options={"atol": 0.1}), ["no group_filter"]),
    (dict(regularizers={"kl": {"coef": "high"}}), ["coef"]),
    (dict(kl_coef=-1.0), ["kl_coef"]),
    (dict(loss_options={"kl_coef": 0.1}), ["top-level kl_coef"]),
    (dict(loss_options={"ref_logp": 1}), ["tensors the trainer computes"]),
    (dict(loss_options={"clip_high": "abc"}), ["clip_high", "float"]),
    (dict(normalize_adv_std=False, advantage_options={"normalize_std": True}), ["contradicts"]),
    (dict(max_resample=-1), ["max_resample"]),
])
def test_bad_stage_configs_are_refused_before_any_model(bad, words, monkeypatch):
    import entropy_rl.trainer as tr
    monkeypatch.setattr(tr, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError) as e:
        Trainer(dict(TINY, **bad))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_overrides_reach_every_stage():
    from entropy_rl.cli import build_config
    cfg = build_config(None, ["advantage=token_level", "advantage_options.normalize_std=true", "reward_shaping=[overlong]",
                              "reward_shaping_options.overlong.cache_length=2", "dynamic_sampling=true", "kl_coef=0.01",
                              "sampler=default", "regularizers.entropy.coef=0.001"])
    assert cfg.advantage == "token_level" and cfg.advantage_options["normalize_std"] is True
    assert cfg.reward_shaping_options["overlong"]["cache_length"] == 2 and cfg.group_filter == "equal_rewards"
    assert cfg.kl_coef == 0.01 and cfg.regularizers["entropy"]["coef"] == 0.001


def test_a_run_value_is_taken_at_the_first_step_kept_and_resumed(tmp_path):
    "SIREN's anchor: the old-policy nucleus entropy's H̄ over step 1's batch, kept for the run, restored on resume."
    from entropy_rl.entropy import nucleus_entropy        # chapter 00's strict nucleus, on full float64 logits
    from entropy_rl.selective_entropy import siren_anchor
    from entropy_rl.trainer import _response_hidden
    kw = dict(TINY, regularizers={"siren": {"coef": 0.05}}, save_every=1)
    t = Trainer(dict(kw, steps=1, output_dir=str(tmp_path / "one")), reward_fn=odd_length)
    t0 = {k: v.clone() for k, v in t.unwrapped.state_dict().items()}
    captured = {}
    orig = t._take_run_values

    def spy(batch, pending, *view):
        captured["batch"] = batch
        orig(batch, pending, *view)
    t._take_run_values = spy
    m = t.train().metrics[0]
    b = captured["batch"]                                   # independent: the initial weights on step 1's batch
    t.unwrapped.load_state_dict(t0)
    with torch.no_grad():
        T = b.mask.shape[1]
        h = _response_hidden(t.unwrapped, b.ids, b.attn, T)
        W = t.unwrapped.get_output_embeddings().weight
        assert W.shape[0] <= 10_000                          # SIREN's top-k = 10,000 keeps the whole tiny vocabulary
        H = nucleus_entropy(h.double() @ W.double().T, top_p=0.8)
    want = siren_anchor(H.masked_fill(~b.mask, 0.0), b.mask, 0.8)
    assert m["run/siren_anchor"] == pytest.approx(want, rel=1e-5)
    kw["reward_fn"] = odd_length
    full = train(steps=3, output_dir=str(tmp_path / "full"), **kw).metrics
    train(steps=1, output_dir=str(tmp_path / "split"), **kw)
    resumed = train(steps=3, output_dir=str(tmp_path / "split"), **kw).metrics
    assert len({r["run/siren_anchor"] for r in full}) == 1               # taken once, kept
    assert strip_timing(full) == strip_timing(resumed)                    # and restored from the checkpoint


def test_evaluate_refuses_zero_problems_before_sampling():
    "The Python API refuses what the CLI refuses: no NaN pass@1 from an empty evaluation."
    from entropy_rl.trainer import evaluate
    with pytest.raises(ValueError, match="n_problems must be a positive integer"):
        evaluate(None, None, None, n_problems=0)


def test_cure_rollouts_resume_exactly_and_keep_prefixes_out_of_the_loss(tmp_path):
    "CURE's branching: resume = uninterrupted (every draw derives from per-prompt seeds); a branch trains only its continuation."
    kw = dict(TINY, rollout_structure="cure", rollout_structure_options={"n2": 1, "min_token_chars": 1}, minibatches=2,
              reward_fn=odd_length)
    full = train(steps=3, output_dir=str(tmp_path / "full"), **kw).metrics
    train(steps=1, output_dir=str(tmp_path / "split"), **kw)
    resumed = train(steps=3, output_dir=str(tmp_path / "split"), **kw).metrics
    assert strip_timing(full) == strip_timing(resumed)
    assert all(m["cure/stage"] == 1.0 for m in full) and min(m["cure/fresh_frac"] for m in full) < 1   # it branched
    t = Trainer(dict(TINY, rollout_structure="cure", rollout_structure_options={"n2": 1, "min_token_chars": 1},
                     output_dir=str(tmp_path / "t")), reward_fn=odd_length)
    batch, _ = t._rollout(0)
    G, P, branched = 4, batch.ids.shape[1] - batch.mask.shape[1], 0
    for g in range(len(batch) // G):
        for b in range(2):                        # rows 2, 3 of a group branch from originals 0, 1
            orig, row = g * G + b, g * G + 2 + b
            p_orig = batch.ids[orig, :P][batch.attn[orig, :P].bool()].tolist()
            p_row = batch.ids[row, :P][batch.attn[row, :P].bool()].tolist()
            prefix = p_row[len(p_orig):]
            assert p_row[:len(p_orig)] == p_orig and prefix == batch.ids[orig, P:P + len(prefix)].tolist()
            branched += bool(prefix)
            assert batch.mask[row].sum() >= 1   # the loss sees the continuation only: the prefix sits in the prompt
    assert branched > 0


def test_cure_stage_two_is_plain_sampling(tmp_path):
    m = train(steps=2, output_dir=str(tmp_path / "r"), **TINY, rollout_structure="cure",
              rollout_structure_options={"n2": 1, "stage1_steps": 1}, reward_fn=odd_length).metrics
    assert [x["cure/stage"] for x in m] == [1.0, 2.0]


def test_aepo_rows_train_with_advantage_plus_one(tmp_path):
    "AEPO's kept hot samples replace main rows and carry advantage +1 on every token; the others keep the estimator's."
    t = Trainer(dict(TINY, rollout_structure="aepo", rollout_structure_options={"prompt_frac": 1.0, "reinforce_samples": 8},
                     output_dir=str(tmp_path / "t")), reward_fn=odd_length)
    for step in range(4):                        # until some row was replaced
        batch, sampling = t._rollout(step)
        if sampling["aepo/replaced"] > 0:
            break
    assert sampling["aepo/replaced"] > 0 and sampling["aepo/temperature"] == 1.2   # h_prev starts at 0: hot
    rows = torch.isfinite(batch.advantage_override)
    assert int(rows.sum()) == int(sampling["aepo/replaced"])   # one round, one process: the count
    batch.set_advantages(torch.zeros(len(batch)))
    assert torch.all(batch.advantages[rows][batch.mask[rows]] == 1.0)
    assert torch.all(batch.advantages[~rows] == 0.0)


def test_eb_tree_rollouts_resume_exactly(tmp_path):
    kw = dict(TINY, group_size=4, rollout_structure="eb_tree", max_new_tokens=6,
              rollout_structure_options={"segment_tokens": 2, "branch_probability": 0.1}, reward_fn=odd_length)
    full = train(steps=2, output_dir=str(tmp_path / "full"), **kw).metrics
    train(steps=1, output_dir=str(tmp_path / "split"), **kw)
    resumed = train(steps=2, output_dir=str(tmp_path / "split"), **kw).metrics
    assert strip_timing(full) == strip_timing(resumed)
    assert sum(m["eb/branches"] for m in full) > 0


def test_aepo_controller_state_reads_the_last_step_and_resumes(tmp_path):
    "H_prev starts at 0 (the first step heats), then is the last batch's sampled-token NLL; checkpointed with the run."
    kw = dict(TINY, rollout_structure="aepo", rollout_structure_options={"prompt_frac": 1.0, "target_entropy": 2.0},
              reward_fn=odd_length)
    full = train(steps=3, output_dir=str(tmp_path / "full"), **kw).metrics
    assert full[0]["aepo/h_prev"] == 0.0 and full[0]["aepo/temperature"] == 1.2
    for prev, m in zip(full, full[1:]):
        assert m["aepo/h_prev"] > 0
        assert m["aepo/temperature"] == (1.2 if m["aepo/h_prev"] <= 2.0 else 0.8)
    train(steps=1, output_dir=str(tmp_path / "split"), **kw)
    resumed = train(steps=3, output_dir=str(tmp_path / "split"), **kw).metrics
    assert strip_timing(full) == strip_timing(resumed)


def test_aepo_paper_reading_reads_the_last_steps_entropy(tmp_path):
    m = train(steps=2, output_dir=str(tmp_path / "p"), **TINY, reward_fn=odd_length, rollout_structure="aepo",
              rollout_structure_options={"reading": "paper"}).metrics
    assert m[1]["aepo/h_prev"] == pytest.approx(m[0]["entropy"], rel=1e-5)   # the old policy's token-mean entropy


def test_old_logprobs_from_the_rollout_equal_the_recomputed_ones(tmp_path):
    "old_logprobs='rollout' skips the old-policy pass: the engine's records are pi_old at the run's temperature."
    kw = dict(TINY, minibatches=2, epochs_per_step=2, reward_fn=odd_length, sampler="min_p")
    a = train(steps=3, output_dir=str(tmp_path / "a"), **kw).metrics
    b = train(steps=3, output_dir=str(tmp_path / "b"), **kw, old_logprobs="rollout").metrics
    for x, y in zip(a, b):
        for k in ("loss", "entropy", "ratio/mean", "ratio/max", "grad_norm", "reward_mean"):
            assert y[k] == pytest.approx(x[k], rel=paths_rel(x["step"]), abs=1e-6), k
    assert all(y["time_score_s"] < x["time_score_s"] for x, y in zip(a, b))
    with pytest.raises(ValueError, match="old_logprobs='rollout'"):
        TrainConfig.from_dict(old_logprobs="rollout", rollout_structure="aepo")
    with pytest.raises(ValueError, match="old_logprobs='rollout'"):
        TrainConfig.from_dict(old_logprobs="rollout", rollout_engine="vllm")



@pytest.mark.parametrize("name,opts", [("typical", {"typical_p": 0.99}), ("min_p", {}), ("top_h", {"top_h": 0.99}),
                                       ("mirostat_v1", {"tau": 8.0}), ("mirostat_v2", {}), ("hapo_temperature", {})])
def test_resume_equals_uninterrupted_with_each_sampler(tmp_path, name, opts):
    "Per-prompt seeds, per-row sampler state and HAPO's checkpointed statistics: a resumed run samples what an uninterrupted one does."
    kw = dict(TINY, sampler=name, sampler_options=opts, reward_fn=odd_length)
    full = train(steps=3, output_dir=str(tmp_path / "full"), **kw).metrics
    train(steps=1, output_dir=str(tmp_path / "split"), **kw)
    resumed = train(steps=3, output_dir=str(tmp_path / "split"), **kw).metrics
    assert strip_timing(full) == strip_timing(resumed)


def test_aepo_second_rollout_is_reproducible_by_seed():
    "The second rollout at the controlled temperature draws from the prompts' own seeds: the same call, the same rows."
    from entropy_rl.models import tiny_model
    from entropy_rl.rollout import TransformersEngine
    from entropy_rl.rollout_structures import aepo_rollout
    m, tok = tiny_model(seed=0)
    eng = TransformersEngine(m, tok)
    tools = dict(tokenizer=tok, model=m, step=0, grade=lambda texts, idx: torch.tensor([float(len(t) % 2) for t in texts]))
    gen = dict(max_new_tokens=6, seed=[1, 2, 3, 4])
    runs = [aepo_rollout(eng, ["a+b", "c", "2+2=", "x"], 4, gen, tools, prompt_frac=1.0, reinforce_samples=8,
                         state={"h_prev": 0.0}) for _ in range(2)]
    (a, ea), (b, eb) = runs
    assert ea["metrics"] == eb["metrics"] and ea["metrics"]["aepo/kept"] > 0
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert torch.equal(a.advantage_override.isnan(), b.advantage_override.isnan())
