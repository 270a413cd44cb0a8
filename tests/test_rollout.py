"Rollout on the real default model (slow) and end-to-end with the tiny model and a task."
import pytest, torch
from entropy_rl.models import tiny_model, load_model
from entropy_rl.tasks import ArithmeticTask, build_prompt
from entropy_rl.rollout import TransformersEngine, response_logprobs


def test_tiny_end_to_end_rewards():
    model, tok = tiny_model(1)
    task = ArithmeticTask()
    probs = task.sample(3, seed=0)
    b = TransformersEngine(model, tok).generate([build_prompt(tok, p.question) for p in probs], num_samples=2,
                                                max_new_tokens=6, seed=0)
    rewards = torch.tensor([task.reward(t, probs[g]) for t, g in zip(b.texts, b.group_ids.tolist())])
    assert rewards.shape == (6,) and set(rewards.tolist()) <= {0.0, 1.0}
    assert b.group_ids.tolist() == [0, 0, 1, 1, 2, 2]                       # rows grouped by prompt
    for t, ids, m in zip(b.texts, b.response_ids, b.response_mask):      # texts are the decoded response tokens
        assert t == tok.decode(ids[m.bool()], skip_special_tokens=True)
    # the same grading path rewards a correct reply and only a correct one
    assert [task.reward(f"{int(p.answer) + d}", p) for p in probs for d in (0, 1)] == [1.0, 0.0] * 3


@pytest.mark.slow
def test_default_model_rollout_logprobs_match_recompute():
    model, tok = load_model()
    task = ArithmeticTask()
    probs = task.sample(2, seed=0)
    b = TransformersEngine(model, tok).generate([build_prompt(tok, p.question) for p in probs], num_samples=2,
                                                max_new_tokens=12, seed=0)
    assert b.response_ids.shape[0] == 4 and all(isinstance(t, str) for t in b.texts)
    ref = response_logprobs(model, b)
    assert torch.allclose(b.sampling_logprobs, ref, atol=2e-3), (b.sampling_logprobs - ref).abs().max()


@pytest.mark.slow
def test_default_model_records_match_a_float64_recompute():
    "The per-token records on the real model, with a truncating sampler (q != pi^T): teacher-forced float64 references."
    import entropy_rl.samplers  # noqa: F401  (registers typical)
    from entropy_rl.samplers import typical_keep
    model, tok = load_model()
    task = ArithmeticTask()
    probs = task.sample(2, seed=0)
    T = 0.8
    b = TransformersEngine(model, tok).generate([build_prompt(tok, p.question) for p in probs], num_samples=2,
                                                max_new_tokens=12, seed=[0, 1], temperature=T, sampler="typical",
                                                sampler_options={"typical_p": 0.8})
    P, m, y = b.prompt_ids.shape[1], b.response_mask, b.response_ids
    with torch.no_grad():
        z = model(**b.model_inputs()).logits[:, P - 1:-1].float()
    lpi = torch.log_softmax(z.double() / T, -1)
    lq = torch.log_softmax((z / T).masked_fill(~typical_keep(z / T, 0.8), float("-inf")).double(), -1)   # float32 rule, as run
    H = lambda lp: -(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1)
    at = lambda lp: lp.gather(-1, y[..., None])[..., 0]
    for got, want in ((b.policy_logprobs, at(lpi)), (b.sampling_logprobs, at(lq)), (b.policy_entropy, H(lpi)), (b.sampling_entropy, H(lq))):
        assert torch.allclose(got[m].double(), want[m], atol=5e-3), (got[m].double() - want[m]).abs().max()
    assert torch.equal(b.top1_ids[m], z.argmax(-1)[m])
    assert (b.sampling_entropy[m] <= b.policy_entropy[m] + 1e-4).all()
