"""VLLMEngine's per-token records (the `topk_tail` reading) against a stand-in `vllm` module that returns, like vLLM with
logprobs=K, the K most likely processed log-probs of each step plus the sampled token's. Nothing here runs real vLLM."""
import math
import sys
import types
from types import SimpleNamespace as NS

import pytest
import torch

from entropy_rl.models import tiny_model
from entropy_rl.rollout import TransformersEngine, VLLMEngine, sampling_transform


class _LLM:
    "Samples with the transformers engine; reports each step's top-K log-probs of q (teacher-forced) like vLLM does."
    def __init__(self, model, **kw):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert kw.get("logprobs_mode") == "processed_logprobs"
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tok = AutoTokenizer.from_pretrained(model)

    def generate(self, prompts, params, use_tqdm=False):
        eng, outs = TransformersEngine(self.model, self.tok), []
        for prompt, sp in zip(prompts, params):
            text = self.tok.decode(prompt["prompt_token_ids"])
            b = eng.generate([text], num_samples=sp.n, max_new_tokens=sp.max_tokens, temperature=sp.temperature,
                             top_p=sp.top_p, seed=[sp.seed])
            P = b.prompt_ids.shape[1]
            with torch.no_grad():
                z = self.model(**b.model_inputs()).logits[:, P - 1:-1]
            lq = torch.log_softmax(sampling_transform("default", sp.temperature, sp.top_p)(z.reshape(-1, z.shape[-1])), -1)
            lq = lq.reshape(z.shape)
            rows = []
            for r, (ids, m) in enumerate(zip(b.response_ids, b.response_mask)):
                steps = []
                for t, y in enumerate(ids[m].tolist()):
                    top = lq[r, t].topk(sp.logprobs)
                    d = {int(i): NS(logprob=float(v)) for v, i in zip(top.values, top.indices)}
                    d[y] = NS(logprob=float(lq[r, t, y]))
                    steps.append(d)
                rows.append(NS(token_ids=ids[m].tolist(), logprobs=steps))
            outs.append(NS(outputs=rows))
        return outs


@pytest.fixture
def stand_in(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = _LLM, lambda **kw: NS(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    model, tok = tiny_model(0)
    return model.eval(), tok


PROMPTS = ["1+1=", "What is 4 + 3?"]


def test_full_vocabulary_k_gives_the_transformers_records(stand_in):
    "K >= V: the tail is empty, the reading is exact, and at top_p = 1 every field equals the transformers engine's."
    model, tok = stand_in
    V = model.config.vocab_size
    b = VLLMEngine(model, tok, logprobs_k=V).generate(PROMPTS, num_samples=3, max_new_tokens=6, temperature=0.8, seed=[1, 2])
    ref = TransformersEngine(model, tok).generate(PROMPTS, num_samples=3, max_new_tokens=6, temperature=0.8, seed=[1, 2])
    T, m = ref.response_ids.shape[1], ref.response_mask
    assert b.texts == ref.texts
    for k in ("sampling_logprobs", "policy_logprobs", "sampling_entropy", "policy_entropy", "sampling_temperature"):
        torch.testing.assert_close(getattr(b, k)[:, :T][m], getattr(ref, k)[m], atol=1e-4, rtol=0, msg=k)
        assert (getattr(b, k)[:, :T][~m] == 0).all(), k
    assert torch.equal(b.top1_ids[:, :T][m], ref.top1_ids[m])


def test_small_k_is_the_tail_bucket_lower_bound(stand_in):
    "K = 3: H_K = -sum_K q log q - r log r from the returned tokens, <= the exact entropy, recomputed here by hand."
    model, tok = stand_in
    b = VLLMEngine(model, tok, logprobs_k=3).generate(PROMPTS, num_samples=2, max_new_tokens=5, seed=[4, 5])
    ref = TransformersEngine(model, tok).generate(PROMPTS, num_samples=2, max_new_tokens=5, seed=[4, 5])
    P, T, m = ref.prompt_ids.shape[1], ref.response_ids.shape[1], ref.response_mask
    with torch.no_grad():
        q = torch.softmax(model(**ref.model_inputs()).logits[:, P - 1:-1].double(), -1)
    for r in range(len(ref)):
        for t in range(int(m[r].sum())):
            y = int(ref.response_ids[r, t])
            known = set(q[r, t].topk(3).indices.tolist()) | {y}
            head = [float(q[r, t, i]) for i in known]
            rest = max(0.0, 1 - sum(head))
            want = -sum(x * math.log(x) for x in head) - (rest * math.log(rest) if rest > 0 else 0.0)
            assert abs(b.sampling_entropy[r, t].item() - want) < 1e-4, (r, t)
            assert b.sampling_entropy[r, t].item() <= ref.sampling_entropy[r, t].item() + 1e-4
            assert int(b.top1_ids[r, t]) == int(q[r, t].argmax())
    assert (b.sampling_entropy[:, :T][m] < ref.sampling_entropy[m] - 1e-3).any()      # the tail bucket loses entropy here


def test_bad_k_and_samplers_are_refused(stand_in):
    model, tok = stand_in
    with pytest.raises(ValueError, match="logprobs_k must be an int >= 1"):
        VLLMEngine(model, tok, logprobs_k=0)
    eng = VLLMEngine(model, tok)
    with pytest.raises(ValueError, match="transformers engine only"):
        eng.generate(PROMPTS, sampler="typical")
