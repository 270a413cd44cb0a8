"""Chapter 20's samplers inside the engine, on the tiny model: the first token's empirical distribution matches each rule
(total variation, with negative controls), the recorded log-probs equal the rule's probabilities at every generated token
(Mirostat's mu re-run by hand), bad options are refused, and one training step runs with each sampler on.

The references here are written independently of entropy_rl.samplers: plain Python loops over float64 probabilities."""
import math

import pytest
import torch

import entropy_rl.samplers  # noqa: F401  (registers the samplers)
from entropy_rl.models import tiny_model
from entropy_rl.rollout import SAMPLERS, TransformersEngine, sampling_transform
from entropy_rl.trainer import TrainConfig, train

PROMPT = "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n"


# ---- naive float64 references: a probability vector (list) in, the kept token set out -----------------------------
def ref_typical(p, tau):
    H = -sum(x * math.log(x) for x in p if x > 0)
    order = sorted((i for i in range(len(p)) if p[i] > 0), key=lambda i: abs(-math.log(p[i]) - H))
    keep, mass = [], 0.0
    for i in order:
        keep.append(i)
        mass += p[i]
        if mass >= tau:
            break
    return set(keep)


def ref_min_p(p, base):
    return {i for i, x in enumerate(p) if x >= base * max(p)}


def ref_top_h(p, top_h):
    order = sorted(range(len(p)), key=lambda i: -p[i])[:100]
    tot = sum(p[i] for i in order)
    terms = [-(p[i] / tot) * math.log(p[i] / tot) for i in order]
    keep, cum = [order[0]], terms[0]
    for i, t in zip(order[1:], terms[1:]):
        cum += t
        if cum > top_h * sum(terms):
            break
        keep.append(i)
    return set(keep)


def ref_mirostat_v1_k(p, mu, reading, m=100):
    s = sorted(p, reverse=True)
    n_ratios, n = (m, 50_000) if reading == "official" else (m - 1, len(p))
    n_ratios = min(n_ratios, len(p) - 1)
    num = den = 0.0
    for i in range(n_ratios):
        t = math.log((i + 2) / (i + 1))
        num += t * math.log(s[i] / s[i + 1])
        den += t * t
    sh = num / den
    eps = sh - 1
    k_raw = (eps * 2 ** mu / (1 - n ** (-eps))) ** (1 / sh)
    k = round(k_raw) + 1 if reading == "official" else max(int(k_raw), 1)
    return min(k, len(p))


def ref_top_k(p, k):
    return set(sorted(range(len(p)), key=lambda i: -p[i])[:k])


def renorm(p, keep):
    tot = sum(p[i] for i in keep)
    return [p[i] / tot if i in keep else 0.0 for i in range(len(p))]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(0)
    model.eval()
    return model, tok


def prompt_logits(model, tok, text=PROMPT):
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt", add_special_tokens=False)).logits[0, -1].double()


def hapo_state(z):
    "Statistics placing this step's entropy at h = -1 (s = 1, c = log H + 1): the paper reading gives h_hat = -1."
    H = float(-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum())
    return {"ready": True, "c": math.log(H) + 1.0, "s": 1.0, "scale_pos": 1.0, "scale_neg": -1.0}


T = 0.7
CASES = {   # name, options, reference q from pi^T (list) and the raw logits
    "typical": ({"typical_p": 0.5}, lambda p, z: renorm(p, ref_typical(p, 0.5))),
    "min_p": ({"p_base": 0.3}, lambda p, z: renorm(p, ref_min_p(p, 0.3))),
    "top_h": ({"top_h": 0.6}, lambda p, z: renorm(p, ref_top_h(p, 0.6))),
    "mirostat_v1_official": ({"reading": "official", "tau": 2.0}, lambda p, z: renorm(p, ref_top_k(p, ref_mirostat_v1_k(p, 4.0, "official")))),
    "mirostat_v1_llamacpp": ({"reading": "llamacpp", "tau": 2.0, "eta": 0.1}, lambda p, z: renorm(p, ref_top_k(p, ref_mirostat_v1_k(p, 4.0, "llamacpp")))),
    "mirostat_v2": ({"tau": 2.0}, lambda p, z: renorm(p, {i for i, x in enumerate(p) if -math.log2(x) <= 4.0} | {max(range(len(p)), key=p.__getitem__)})),
    "hapo_temperature": ({"reading": "paper", "tau": 0.5}, lambda p, z: torch.softmax(z / (T * 0.5), -1).tolist()),
}


def sampler_name(case):
    return case.rsplit("_", 1)[0] if case.startswith("mirostat_v1") else case


@pytest.mark.parametrize("case", list(CASES))
def test_first_token_distribution_matches_the_rule(tiny, case):
    model, tok = tiny
    name, (opts, rule) = sampler_name(case), CASES[case]
    z = prompt_logits(model, tok)
    pi = torch.softmax(z / T, -1)
    q = torch.tensor(rule(pi.tolist(), z), dtype=torch.float64)
    N = 4000
    state = hapo_state(z) if name == "hapo_temperature" else None
    b = TransformersEngine(model, tok, max_batch_size=N).generate([PROMPT], num_samples=N, max_new_tokens=1, seed=[7],
                                                                  temperature=T, sampler=name, sampler_options=opts,
                                                                  sampler_state=state)
    first = b.response_ids[:, 0]
    freq = torch.bincount(first, minlength=q.numel()).double() / N
    tv = lambda a, c: 0.5 * (a - c).abs().sum().item()
    # E TV <= 1/2 sum sqrt(q(1-q)/N); McDiarmid: exceeding the mean by sqrt(ln(1e6)/2N) has probability < 1e-6
    tol = 0.5 * (q * (1 - q) / N).sqrt().sum().item() + math.sqrt(math.log(1e6) / (2 * N))
    assert tv(freq, q) < tol, (tv(freq, q), tol)
    assert (freq[q == 0] == 0).all()                                      # nothing outside the kept set is ever drawn
    alts = {"untruncated pi^T": pi, "uniform": torch.full_like(q, 1 / q.numel())}
    for k, alt in alts.items():                                           # negative controls: a sampler ignoring the rule fails
        assert tv(q, alt) > 2 * tol and tv(freq, alt) > 2 * tol, (k, tv(q, alt), tol)
    # the recorded log-probs are the rule's probabilities and pi^T's, at temperature T (or T_t)
    torch.testing.assert_close(b.sampling_logprobs[:, 0].double(), q[first].log(), atol=2e-4, rtol=0)
    torch.testing.assert_close(b.policy_logprobs[:, 0].double(), pi[first].log(), atol=2e-4, rtol=0)
    H = lambda d: float(-(d[d > 0] * d[d > 0].log()).sum())
    assert abs(b.sampling_entropy[0, 0].item() - H(q)) < 2e-4 and abs(b.policy_entropy[0, 0].item() - H(pi)) < 2e-4
    want = T * (1 - 0.5 / (1 + 1e-6)) if name == "hapo_temperature" else T    # h = -1/(s + 1e-6) with s = 1
    torch.testing.assert_close(b.sampling_temperature[:, 0], torch.full((N,), want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["typical", "min_p", "top_h", "mirostat_v1_official", "mirostat_v1_llamacpp", "mirostat_v2"])
def test_recorded_logprobs_follow_the_rule_at_every_token(tiny, case):
    "Teacher-forced float64 logits, the rule applied by the naive reference, Mirostat's mu updated by hand per row."
    model, tok = tiny
    name, (opts, _) = sampler_name(case), CASES[case]
    prompts = [PROMPT, "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"]
    b = TransformersEngine(model, tok, max_batch_size=3).generate(prompts, num_samples=3, max_new_tokens=8, seed=[1, 2],
                                                                  temperature=T, sampler=name, sampler_options=opts)
    P = b.prompt_ids.shape[1]
    with torch.no_grad():
        z = model(**b.model_inputs()).logits[:, P - 1:-1].double()
    o = SAMPLERS.resolve(name, opts)
    checked = 0
    for r in range(len(b)):
        mu = 2 * o.get("tau", 0.0)
        for t in range(int(b.lengths[r])):
            p = torch.softmax(z[r, t] / T, -1).tolist()
            y = int(b.response_ids[r, t])
            if name == "typical":
                q = renorm(p, ref_typical(p, o["typical_p"]))
            elif name == "min_p":
                q = renorm(p, ref_min_p(p, o["p_base"]))
            elif name == "top_h":
                q = renorm(p, ref_top_h(p, o["top_h"]))
            elif name == "mirostat_v1":
                q = renorm(p, ref_top_k(p, ref_mirostat_v1_k(p, mu, o["reading"])))
                S = -math.log2(p[y] if o["reading"] == "official" else q[y])
                mu -= o["eta"] * (S - o["tau"])
            else:
                q = renorm(p, {i for i, x in enumerate(p) if -math.log2(x) <= mu} | {max(range(len(p)), key=p.__getitem__)})
                mu -= o["eta"] * (-math.log2(q[y]) - o["tau"])
            assert q[y] > 0, (r, t)
            assert abs(b.sampling_logprobs[r, t].item() - math.log(q[y])) < 2e-4, (r, t)
            assert abs(b.policy_logprobs[r, t].item() - math.log(p[y])) < 2e-4, (r, t)
            checked += 1
        assert (b.sampling_logprobs[r, int(b.lengths[r]):] == 0).all() and (b.policy_entropy[r, int(b.lengths[r]):] == 0).all()
    assert checked >= 12


def test_mirostat_rows_do_not_depend_on_their_batch(tiny):
    "mu is per row and restarts with each generation: a prompt alone samples what it samples in a batch."
    model, tok = tiny
    prompts = [PROMPT, "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\n9+9=<|im_end|>\n<|im_start|>assistant\n"]
    kw = dict(num_samples=2, max_new_tokens=8, sampler="mirostat_v2", sampler_options={"tau": 2.0})
    together = TransformersEngine(model, tok, max_batch_size=4).generate(prompts, seed=[5, 6, 7], **kw)
    for i, (p, s) in enumerate(zip(prompts, [5, 6, 7])):
        alone = TransformersEngine(model, tok).generate([p], seed=[s], **kw)
        assert together.texts[2 * i:2 * i + 2] == alone.texts
        torch.testing.assert_close(together.sampling_logprobs[2 * i:2 * i + 2, :alone.response_ids.shape[1]], alone.sampling_logprobs)


def test_hapo_state_sets_the_temperature_per_token(tiny):
    "Empty state: plain T everywhere; with statistics: T_t = T(1 + tau h_hat) from each step's raw-logit entropy."
    model, tok = tiny
    eng = TransformersEngine(model, tok)
    kw = dict(num_samples=2, max_new_tokens=6, seed=[3], temperature=T, sampler="hapo_temperature")
    b0 = eng.generate([PROMPT], **kw)
    assert (b0.sampling_temperature[b0.response_mask] == T).all()
    torch.testing.assert_close(b0.sampling_logprobs, b0.policy_logprobs)
    state = {"ready": False}
    SAMPLERS.get("hapo_temperature").meta["observe"](state, {"entropy": b0.policy_entropy, "mask": b0.response_mask},
                                                     entropy_pivot=0.8)
    assert state["ready"] and state["s"] > 0
    b = eng.generate([PROMPT], sampler_options={"reading": "paper", "tau": 0.3}, sampler_state=state, **kw)
    P = b.prompt_ids.shape[1]
    with torch.no_grad():
        z = model(**b.model_inputs()).logits[:, P - 1:-1].double()
    m = b.response_mask
    H = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    h = (H.clamp(min=1e-6).log() - state["c"]) / (state["s"] + 1e-6)
    hh = torch.where(h > 0, h * state["scale_pos"], h * abs(state["scale_neg"])).clamp(-1, 1)
    Tt = T * (1 + 0.3 * hh)
    torch.testing.assert_close(b.sampling_temperature[m].double(), Tt[m], atol=1e-5, rtol=0)
    lq = torch.log_softmax(z / Tt[..., None], -1).gather(-1, b.response_ids[..., None])[..., 0]
    torch.testing.assert_close(b.sampling_logprobs[m].double(), lq[m], atol=2e-4, rtol=0)
    assert (b.sampling_temperature[m] != T).any()


@pytest.mark.parametrize("name, opts, words", [
    ("typical", {"typical_p": 0.0}, "typical_p must be in (0, 1]"),
    ("typical", {"typical_p": 1.5}, "typical_p must be in (0, 1]"),
    ("typical", {"top_p": 0.9}, "valid options: ['typical_p']"),
    ("min_p", {"p_base": -0.1}, "p_base must be in [0, 1]"),
    ("top_h", {"top_h": 0.0}, "top_h must be in (0, 1]"),
    ("mirostat_v1", {"reading": "paper"}, "'official' (the paper's script) or 'llamacpp'"),
    ("mirostat_v1", {"tau": 0.0}, "tau (target surprise, bits) must be"),
    ("mirostat_v2", {"eta": -1.0}, "eta (learning rate of mu) must be"),
    ("mirostat_v1", {"m": 1}, "m (tokens in the Zipf fit) must be an int >= 2"),
    ("hapo_temperature", {"reading": "both"}, "reading must be one of ['code', 'paper']"),
    ("hapo_temperature", {"tau": 1.0}, "tau (relative temperature swing) must be in [0, 1)"),
    ("hapo_temperature", {"entropy_pivot": 1.2}, "entropy_pivot must be in [0, 1]"),
])
def test_bad_options_are_refused_with_a_clear_message(name, opts, words):
    with pytest.raises(ValueError, match=None) as e:
        sampling_transform(name, 1.0, 1.0, opts)
    assert words in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:                                  # and up front, in the run's config
        TrainConfig.from_dict(sampler=name, sampler_options=opts)
    assert words in str(e.value), str(e.value)


def test_other_refusals(tiny):
    with pytest.raises(ValueError, match="top_p = 1"):
        sampling_transform("mirostat_v2", 1.0, 0.9)
    with pytest.raises(ValueError, match="keeps no state"):
        sampling_transform("min_p", 1.0, 1.0, None, state={"ready": True})
    model, tok = tiny
    with pytest.raises(ValueError, match="keeps no state"):
        TransformersEngine(model, tok).generate([PROMPT], sampler="typical", sampler_state={})


TINY = dict(model="tiny", prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-2, progress=False, plot=False,
            task_options={"instruction": None})


@pytest.mark.parametrize("name, opts", [("typical", {"typical_p": 0.9}), ("min_p", {"p_base": 0.1}), ("top_h", {"top_h": 0.8}),
                                        ("mirostat_v1", {"reading": "llamacpp", "tau": 5.0, "eta": 0.1}),
                                        ("mirostat_v2", {"tau": 5.0}), ("hapo_temperature", {"reading": "paper"})])
def test_one_training_step_with_each_sampler(tmp_path, name, opts):
    """Through the trainer by name. hapo_temperature: the trainer does not pass a sampler_state yet (its stage state is
    another change), so this step samples at the plain T — the sampler's step-1 behaviour; the state path is tested above."""
    res = train(steps=1, output_dir=str(tmp_path / name), **{**TINY, "prompts_per_step": 4}, sampler=name,
                sampler_options=opts, reward_fn=lambda text, problem: float(sum(map(ord, text)) % 2))   # varies within groups
    m = res.metrics[0]
    assert m["loss"] == m["loss"] and m["grad_norm"] > 0 and m["entropy"] == m["entropy"]


@pytest.mark.parametrize("name, opts", [("typical", {"typical_p": 1.0}), ("min_p", {"p_base": 0.0})])
def test_off_settings_sample_exactly_the_default(tiny, name, opts):
    "typical_p = 1 and p_base = 0 remove nothing: the same seeds give the default sampler's batch, bit for bit."
    model, tok = tiny
    kw = dict(num_samples=3, max_new_tokens=8, seed=[1, 2], temperature=T)
    prompts = [PROMPT, "<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"]
    a = TransformersEngine(model, tok).generate(prompts, **kw)
    b = TransformersEngine(model, tok).generate(prompts, sampler=name, sampler_options=opts, **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.sampling_logprobs, b.sampling_logprobs) and torch.equal(b.sampling_logprobs, b.policy_logprobs)
