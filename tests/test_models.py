"Default-model tests (slow: they read / rebuild the 517 MB cache) and cache-corruption handling."
import shutil, time
from pathlib import Path
import pytest, torch
from entropy_rl.models import (load_model, tiny_model, default_cache_dir, check_cache_entry, DEFAULT_MODEL,
                               SMOLLM2_PACKAGE, SMOLLM2_VERSION, ModelLoadError)


def test_tiny_model_generates_offline(monkeypatch):
    import socket
    def no_network(*a, **k): raise OSError("network access in an offline test")
    monkeypatch.setattr(socket, "create_connection", no_network)        # any hub access would fail loudly
    monkeypatch.setattr(socket.socket, "connect", no_network)
    m, tok = tiny_model(3)
    enc = tok(["12+3=", "7*8="], return_tensors="pt", padding=True)
    L = enc["input_ids"].shape[1]
    out = m.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and L < out.shape[1] <= L + 5              # it generated, at most 5 new tokens
    assert torch.equal(out[:, :L], enc["input_ids"])                     # the prompts come back unchanged


def test_missing_local_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"): load_model(tmp_path/"nope")


def test_bad_local_dir_is_clear(tmp_path):
    (tmp_path/"config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="Could not load a model from"): load_model(tmp_path)


@pytest.mark.slow
def test_default_model_loads_and_generates():
    t0 = time.perf_counter(); model, tok = load_model(); dt = time.perf_counter() - t0
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"load {dt:.2f}s")


@pytest.mark.slow
def test_corrupt_default_cache_is_rebuilt(tmp_path):
    # seed a private cache with the already fetched GGUF so no network is needed, then corrupt the model entry
    src = default_cache_dir()/"gguf"/f"{SMOLLM2_PACKAGE}-{SMOLLM2_VERSION}"
    if check_cache_entry(src) is not None: pytest.skip("default GGUF not cached yet")
    shutil.copytree(src, tmp_path/"gguf"/src.name)
    model, _ = load_model(cache_dir=tmp_path)                      # builds the entry
    ref = [p.detach().clone() for p in model.parameters()]         # clone: safetensors tensors may be mmapped views
    del model
    entry = tmp_path/"models"/DEFAULT_MODEL
    assert check_cache_entry(entry) is None
    f = entry/"model.safetensors"; n = f.stat().st_size
    f.write_bytes(b"\0" * n)                                       # same size, garbage: manifest passes, load fails
    model2, _ = load_model(cache_dir=tmp_path)                     # rebuilt once, not a deep traceback
    for a, b in zip(ref, model2.parameters()): assert torch.equal(a, b)
    (entry/"entropy_rl.json").unlink()                             # interrupted write: rebuilt too
    load_model(cache_dir=tmp_path); assert check_cache_entry(entry) is None
