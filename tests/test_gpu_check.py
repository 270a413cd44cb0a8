"""bench/gpu_check.sh: the prepared GPU check, rehearsed on CPU so that it cannot rot.

The dry run executes every section's code path (Triton under TRITON_INTERPRET=1, tiny shapes, a tiny
Qwen2-architecture model through the Trainer with the fused head on and off) and must pass its own checks;
a section killed at its budget must leave the others' output and the summary; the pure helpers (targets,
gradient comparison, summary) are checked on hand-computed numbers."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    r = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True, env=_env(),
                       timeout=400, cwd="/")
    return r, out


def test_dry_run_passes_and_prints_summary_last(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    head = next(i for i, l in enumerate(lines) if "entropy_rl GPU check: summary" in l)
    assert lines[-1].startswith("outputs: ") and len(lines) - head < 40      # short, and last
    assert "problems and notes:" in "\n".join(lines[head:])
    # at most 8 files: what the device tool brings back
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "speed.png", "summary.md"]
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "entropy_rl GPU check: summary" in (out / "summary.md").read_text()
    assert "entropy_rl GPU check: summary" in (out / "log.txt").read_text()


def test_dry_run_every_section_ran_its_checks(dry_run):
    _, out = dry_run
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "dry" and list(res["sections"]) == list(gc.SECTIONS)
    for name, sec in res["sections"].items():
        assert sec["status"] == "ok" and not sec["errors"], (name, sec["errors"])
        assert sec["items"] and all(i["ok"] is not False and "skipped" not in i for i in sec["items"]), name
        assert sec["info"]["env"]["triton_interpret"] == "1"
    cor = res["sections"]["correctness"]["items"]
    # 3 vocabularies x 2 dtypes, custom ignore index, tied weights in both dtypes, the auto backend
    assert len(cor) == 10 and all(i["ok"] for i in cor)
    for i in cor[:6]:
        dt = "bfloat16" if "bfloat16" in i["name"] else "float32"
        assert i["err_dweight"] < gc.TOL[dt]["grads"] and i["max_logp"] <= 0 and i["ignored_rows_zero"]
    fail = {i["name"].split()[0] for i in res["sections"]["failures"]["items"]}
    assert {"verl#2899", "verl#2656", "verl#3723", "liger#1338"} <= fail


def test_dry_run_speed_rows_are_consistent(dry_run):
    _, out = dry_run
    items = json.loads((out / "results.json").read_text())["sections"]["speed"]["items"]
    table = gc.speed_table(items)
    assert set(table) == {tuple(s) for s in gc.SHAPES["dry"]["speed"]["shapes"]}
    for (m, v), row in table.items():
        assert {"matmul", "triton", "torch", "unfused", "naive"} <= set(row)
        for it in row.values():
            assert it["fb_ms"] > 0 and it["fwd_ms"] > 0
            assert math.isclose(it["tflops_fb"], 6 * m * it["d"] * v / (it["fb_ms"] * 1e-3) / 1e12, rel_tol=1e-9)
        # the other heads agree with the first one measured (Triton) on every unmasked token
        assert all(row[k]["agreement_ref"] == "triton" and row[k]["agrees"] for k in ("torch", "unfused", "naive"))
    assert {t["target"] for t in gc.evaluate_targets(items)} == {
        "fwd+bwd <= naive", "peak < 5% of naive", "fwd+bwd <= 1.5x matmul (largest shape)"}


def test_dry_run_training_step_fused_equals_unfused(dry_run):
    _, out = dry_run
    items = {i["name"]: i for i in json.loads((out / "results.json").read_text())["sections"]["train"]["items"]}
    fused, unfused = items["update, fused head (samples the rollout)"], items["update, unfused head"]
    assert fused["grad_norm"] > 0 and unfused["grad_norm"] > 0      # the rewards vary: real gradients
    assert fused["rollout_s"] > 0 and "rollout_s" not in unfused     # one rollout, replayed
    cmp = items["gradients: fused vs unfused"]
    assert cmp["ok"] and cmp["loss_rel_diff"] <= gc.TRAIN_TOL["loss_rel"]
    assert 0 < cmp["rel_l2"] < gc.TRAIN_TOL["grad_rel_l2"] and cmp["cosine"] > gc.TRAIN_TOL["grad_cosine"]
    assert items["update, fused head again (timed warm)"]["repeat_vs_first"]["rel_l2"] == 0   # CPU: deterministic
    hv = items["per-token log-probs and entropies vs float64"]
    assert hv["ok"] and hv["tokens"] > 0 and hv["fused_max_abs_err_logp"] < hv["unfused_max_abs_err_logp"]


def test_killed_section_leaves_the_others_and_the_summary(tmp_path):
    out = tmp_path / "out"
    # 0.5 s cannot even import torch: the failures section is killed; speed still runs and the summary follows
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--dry-run",
                        "--only", "failures", "speed", "--budget", "failures=0.5"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 1, r.stdout[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["sections"]["failures"]["status"].startswith("killed at its")
    assert res["sections"]["speed"]["status"] == "ok" and res["sections"]["speed"]["items"]
    summary = r.stdout[r.stdout.index("entropy_rl GPU check: summary"):]
    assert "failures    [killed at its 0.5 s budget]" in summary
    assert r.stdout.strip().splitlines()[-1].startswith("outputs: ")
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--summarize"],
                           capture_output=True, text=True, env=_env(), timeout=60)
    assert again.returncode == 0 and "failures: section killed" in again.stdout


def test_bad_arguments():
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    with pytest.raises(SystemExit, match="SECTION=SECONDS"):
        gc.main(["/tmp/unused", "--dry-run", "--budget", "nope=3"])


# ----------------------------------------------------------------------------- pure helpers
def _row(impl, fb_ms=None, peak_mb=None, m=8, v=100, oom=False):
    it = {"impl": impl, "m": m, "v": v, "d": 4, "logits_fp32_mb": m * v * 4 / 2**20}
    if oom:
        it["oom"] = True
    else:
        it.update(fb_ms=fb_ms, peak_mb=peak_mb)
    return it


def test_targets_say_by_how_much_they_are_missed():
    items = [_row("matmul", 100.0, 10.0), _row("triton", 300.0, 50.0), _row("naive", 200.0, 2000.0),
             _row("matmul", 10.0, 1.0, m=4), _row("triton", 9.0, 8.0, m=4), _row("naive", None, oom=True, m=4)]
    t = {(x["target"], x["shape"]): x for x in gc.evaluate_targets(items)}
    slow = t[("fwd+bwd <= naive", "M=8 V=100")]
    assert slow["met"] is False and math.isclose(slow["ratio"], 1.5) and math.isclose(slow["missed_by"], 1.5)
    mm = t[("fwd+bwd <= 1.5x matmul (largest shape)", "M=8 V=100")]   # largest M*V
    assert mm["met"] is False and math.isclose(mm["ratio"], 3.0) and math.isclose(mm["missed_by"], 2.0)
    mem = t[("peak < 5% of naive", "M=8 V=100")]
    assert mem["met"] is True and math.isclose(mem["ratio"], 0.025) and mem["missed_by"] is None
    # naive out of memory: never slower than it; memory judged against the fp32 logits (a lower bound of naive's peak)
    assert t[("fwd+bwd <= naive", "M=4 V=100")]["met"] is True
    oom_mem = t[("peak < 5% of naive", "M=4 V=100")]
    assert math.isclose(oom_mem["ratio"], 8.0 / (4 * 100 * 4 / 2**20)) and oom_mem["met"] is False


def test_grad_difference_on_known_vectors():
    import torch
    d = gc.grad_difference({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])},
                           {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])})
    assert math.isclose(d["rel_l2"], 1 / math.sqrt(2)) and math.isclose(d["cosine"], 1 / math.sqrt(2))
    assert d["worst_tensor"] == "a" and d["n_tensors"] == 2
    with pytest.raises(RuntimeError, match="different parameters"):
        gc.grad_difference({"a": torch.ones(1), "c": torch.ones(1)}, {"a": torch.ones(1)})


def test_part_records_failures_and_budget_skips(tmp_path):
    part = gc.Part(str(tmp_path / "p.json"), "x", budget_s=100)
    part.item("fine", lambda: {"ok": True, "err_x": 0.5})
    part.item("broken", lambda: 1 / 0)
    part.item("too long", lambda: {"ok": True}, need_s=1000)
    saved = json.loads((tmp_path / "p.json").read_text())
    fine, broken, skipped = saved["items"]
    assert fine["ok"] is True and fine["err_x"] == 0.5
    assert broken["ok"] is False and broken["error"].startswith("ZeroDivisionError")
    assert skipped["ok"] is None and skipped["skipped"].startswith("time budget")


def test_summary_survives_partial_results():
    res = {"mode": "gpu", "out": "OUT", "limit_s": 465, "elapsed_s": 12.0, "sections": {
        "correctness": {"status": "crashed (exit 139)", "wall_s": 3.0, "errors": ["section crashed (exit 139)"],
                        "notes": [], "info": {}, "items": [{"name": "triton V=7 float32 x", "ok": False,
                                                            "error": "RuntimeError: boom"}]},
        "speed": {"status": "ok", "wall_s": 1.0, "errors": [], "notes": ["Liger skipped: x"], "info": {},
                  "items": [_row("matmul", 2.0, 1.0) | {"tflops_fb": 1.0}, _row("triton", None, oom=True)]}}}
    text = gc.summary_text(res)
    assert "[crashed (exit 139)]" in text and "RuntimeError: boom" in text and "Liger skipped" in text
    assert "triton OOM" in text and "not judged (Triton not measured)" in text
    assert text.splitlines()[-1] == "outputs: OUT/results.json, summary.md, speed.png, log.txt"
