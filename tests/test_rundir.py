"""Run directories (issue 14, faults 1-6): checkpoints that cannot run code, are found by step and verified, a lock for
one writer, refusals that change nothing on disk, and a cheap default checkpoint schedule. Tiny random model, CPU."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from entropy_rl.trainer import Trainer, latest_checkpoint, read_metrics, save_checkpoint, train
from test_trainer import TINY, odd_length, strip_timing       # the tiny run and stand-in verifier of the trainer tests

ROOT = Path(__file__).resolve().parents[1]


def snapshot(run: Path) -> dict:
    "Every file of a run directory (but the lock file) with its bytes."
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def plant_manifest(ck: Path) -> None:
    "Rewrite a checkpoint's manifest to match its files, as an attacker who can write the run directory would."
    import hashlib
    man = json.loads((ck / "manifest.json").read_text())
    for name in man["files"]:
        data = (ck / name).read_bytes()
        man["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / "manifest.json").write_text(json.dumps(man))


class Payload:
    "A pickle that runs a shell command when unpickled."
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- fault 1: resuming executed code from the checkpoint; the pointer could lead outside the run
def test_planted_pickle_is_refused_and_does_not_run(tmp_path, capsys):
    """Fault 1: a crafted state.pt (with a manifest rewritten to match) is refused on resume with a message, and its
    payload does not run; the same file does run its payload under the old `weights_only=False` load."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    train(steps=1, output_dir=str(run), **TINY, reward_fn=odd_length)
    ck = latest_checkpoint(run)
    torch.save({"step": 1, "optimizer": Payload(marker)}, ck / "state.pt")
    plant_manifest(ck)
    with pytest.raises(ValueError, match="would run code"):
        train(steps=2, output_dir=str(run), **TINY, reward_fn=odd_length)
    assert not marker.exists()
    torch.load(ck / "state.pt", weights_only=False)          # control: the payload is real
    assert marker.exists()


def test_checkpoint_outside_the_run_is_not_read(tmp_path):
    """Fault 1 (pointer out of the run): a `latest` file naming an absolute path elsewhere is not followed (the run is
    refused as the old format), and a `step-N` that is a link to a checkpoint elsewhere is skipped, never read."""
    elsewhere, run = tmp_path / "elsewhere", tmp_path / "run"
    train(steps=2, output_dir=str(elsewhere), **TINY, reward_fn=odd_length)
    train(steps=1, output_dir=str(run), **TINY, reward_fn=odd_length)
    outside = latest_checkpoint(elsewhere)
    (run / "checkpoints" / "latest").write_text(str(outside))
    with pytest.raises(ValueError, match="older entropy_rl"):
        Trainer(dict(TINY, steps=3, output_dir=str(run)), reward_fn=odd_length).resume()
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "step-000002").symlink_to(outside)
    assert latest_checkpoint(run).name == "step-000001"
    assert Trainer(dict(TINY, steps=3, output_dir=str(run)), reward_fn=odd_length).resume() == 1


# ---- fault 2: a lost pointer restarted the run; rotation by name deleted the newest
def test_no_pointer_to_lose_and_rotation_by_step(tmp_path):
    """Fault 2: there is no `latest` file to lose: removing the newest checkpoint directory resumes from the one before
    (not from step 0, and the metrics up to it are kept); rotation keeps the newest by step number, also past six
    digits (step-1000000 is newer than step-999999 though it sorts first as a name)."""
    run = tmp_path / "run"
    t = Trainer(dict(TINY, steps=3, output_dir=str(run), save_every=1), reward_fn=odd_length)
    t.train()
    assert not (run / "checkpoints" / "latest").exists()
    import shutil
    shutil.rmtree(run / "checkpoints" / "step-000003")
    t2 = Trainer(dict(TINY, steps=3, output_dir=str(run), save_every=1), reward_fn=odd_length)
    assert t2.resume() == 2 and [r["step"] for r in read_metrics(run)] == [1, 2]
    for step in (999_999, 1_000_000):
        save_checkpoint(run, step, t.unwrapped, t.optimizer, t.scheduler, t.generators, t.config, keep=1)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-1000000"]


# ---- fault 3: corrupt state spread; the older valid checkpoint was never tried
@pytest.mark.parametrize("how", ["garble", "truncate", "nonfinite"])
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path, capsys, how):
    """Fault 3: garbled bytes in state.pt, a truncated file, or non-finite optimizer moments (with a matching
    manifest) in the newest checkpoint: it is reported by name and set aside, the run resumes from the newest intact
    one and reproduces the uninterrupted run exactly."""
    run = tmp_path / "run"
    full = train(steps=4, output_dir=str(tmp_path / "full"), **TINY, reward_fn=odd_length).metrics
    train(steps=3, output_dir=str(run), **TINY, save_every=1, reward_fn=odd_length)
    ck = run / "checkpoints" / "step-000003"
    f = ck / "state.pt"
    data = bytearray(f.read_bytes())
    if how == "garble":
        data[len(data) // 2] ^= 0x5A
        f.write_bytes(bytes(data))
    elif how == "truncate":
        f.write_bytes(bytes(data[: len(data) // 3]))
    else:
        state = torch.load(f, weights_only=True)
        next(iter(state["optimizer"]["state"].values()))["exp_avg"].fill_(float("nan"))
        torch.save(state, f)
        plant_manifest(ck)
    capsys.readouterr()
    resumed = train(steps=4, output_dir=str(run), **TINY, save_every=1, reward_fn=odd_length).metrics
    err = capsys.readouterr().err
    assert "step-000003" in err and "damaged" in err, err
    assert (run / "checkpoints" / "damaged-step-000003").is_dir()
    assert strip_timing(resumed) == strip_timing(full)


def test_non_finite_weights_are_never_saved(tmp_path):
    """Fault 3: a diverged policy (a NaN in its weights) is not checkpointed: the save is refused with a message and
    the last good checkpoint stays."""
    run = tmp_path / "run"
    t = Trainer(dict(TINY, steps=1, output_dir=str(run)), reward_fn=odd_length)
    t.train()
    before = snapshot(run / "checkpoints")
    with torch.no_grad():
        next(p for p in t.unwrapped.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        t.save(2)
    assert snapshot(run / "checkpoints") == before


# ---- fault 4: two processes wrote one run directory
def _holder(run: Path) -> subprocess.Popen:
    "A separate process that locks `run` and waits."
    code = ("import sys, time; from entropy_rl.rundir import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], env=env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_stops_at_once_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    """Fault 4: while another process holds the run directory, a second trainer stops at once (before any model loads
    or anything is written) with a message naming the holder's pid; after the holder is killed with SIGKILL its lock is
    recognised as stale and taken over, and the run proceeds."""
    run = tmp_path / "run"
    run.mkdir()
    p = _holder(run)
    try:
        with pytest.raises(RuntimeError, match=f"written by another process \\(pid {p.pid} on"):
            train(steps=1, output_dir=str(run), **TINY, reward_fn=odd_length)
        assert sorted(x.name for x in run.iterdir()) == [".lock"]
    finally:
        p.kill(); p.wait()
    capsys.readouterr()
    res = train(steps=1, output_dir=str(run), **TINY, reward_fn=odd_length)
    assert res.step == 1 and f"pid {p.pid}" in capsys.readouterr().err        # took over, and said so
    assert (run / ".lock").read_text() == ""                                    # released at the end


# ---- fault 5: a refused resume had already overwritten config.json
@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"seed": 1}, {"algo": "dapo"}])
def test_refused_resume_changes_nothing_on_disk(tmp_path, change, monkeypatch):
    """Fault 5: a resume refused for a changed config leaves every file of the run directory as it was (config.json
    included), and is refused before a model is built."""
    run = tmp_path / "run"
    train(steps=1, output_dir=str(run), **TINY, reward_fn=odd_length)
    before = snapshot(run)
    import entropy_rl.trainer as tr
    monkeypatch.setattr(tr, "build_model", lambda c: (_ for _ in ()).throw(AssertionError("model built")))
    with pytest.raises(ValueError, match=f"different config.*{next(iter(change))}"):
        train(steps=2, output_dir=str(run), **{**TINY, **change}, reward_fn=odd_length)
    assert snapshot(run) == before


def test_metrics_without_a_checkpoint_are_not_taken_over_by_another_config(tmp_path):
    """Fault 5 (no checkpoint yet, the cheap default schedule): a run killed before its first save leaves config.json
    and metrics; another config is refused there and changes nothing; the same config starts over from step 0."""
    run, calls = tmp_path / "run", {"n": 0}

    def crashing(text, problem):
        calls["n"] += 1
        if calls["n"] > 8:                                      # dies while grading step 2
            raise KeyboardInterrupt
        return odd_length(text, problem)

    with pytest.raises(KeyboardInterrupt):
        train(steps=3, output_dir=str(run), **TINY, reward_fn=crashing)
    assert not (run / "checkpoints").exists() and [r["step"] for r in read_metrics(run)] == [1]
    before = snapshot(run)
    with pytest.raises(ValueError, match="config.json.*different config.*lr"):
        train(steps=3, output_dir=str(run), **{**TINY, "lr": 1e-3}, reward_fn=odd_length)
    assert snapshot(run) == before
    assert train(steps=3, output_dir=str(run), **TINY, reward_fn=odd_length).step == 3
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_metrics_rewrite_on_resume_is_atomic_and_drops_a_half_line(tmp_path, monkeypatch):
    """Fault 5 (metrics on resume): a half-written last line (a kill during a write) is dropped on resume; a failure
    while the file is rewritten leaves the old file whole."""
    run = tmp_path / "run"
    train(steps=2, output_dir=str(run), **TINY, save_every=1, reward_fn=odd_length)
    mj = run / "metrics.jsonl"
    old = mj.read_text()
    mj.write_text(old + '{"step": 3, "reward_mean"')
    import entropy_rl.rundir as rd
    monkeypatch.setattr(rd.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        Trainer(dict(TINY, steps=3, output_dir=str(run), save_every=1), reward_fn=odd_length).resume()
    assert mj.read_text() == old + '{"step": 3, "reward_mean"'
    monkeypatch.undo()
    assert Trainer(dict(TINY, steps=3, output_dir=str(run)), reward_fn=odd_length).resume() == 2
    assert mj.read_text() == old


def test_old_format_run_is_refused(tmp_path):
    """Fault 1 / format change: a run directory of the previous format (`latest` pointer, pickled state.pt) is refused
    with a message before a model loads; `resume=False` starts over."""
    run = tmp_path / "run"
    ck = run / "checkpoints" / "step-000001"
    ck.mkdir(parents=True)
    import numpy as np
    torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, ck / "state.pt")
    (run / "checkpoints" / "latest").write_text("step-000001")
    with pytest.raises(ValueError, match="older entropy_rl.*resume=false"):
        Trainer(dict(TINY, steps=1, output_dir=str(run)))
    assert train(steps=1, output_dir=str(run), **TINY, resume=False, reward_fn=odd_length).step == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]


# ---- fault 6: one 1.6 GB checkpoint per step by default
def test_default_schedule_saves_once_at_the_end(tmp_path, monkeypatch):
    """Fault 6: with the default config a short run writes one checkpoint (at the end), not one per step; `save_every`
    still asks for more."""
    import entropy_rl.trainer as tr
    saved = []
    real = tr.save_checkpoint
    monkeypatch.setattr(tr, "save_checkpoint", lambda run_dir, step, *a, **k: saved.append(step) or real(run_dir, step, *a, **k))
    train(steps=4, output_dir=str(tmp_path / "a"), **TINY, reward_fn=odd_length)
    assert saved == [4]
    saved.clear()
    train(steps=4, output_dir=str(tmp_path / "b"), **TINY, save_every=2, reward_fn=odd_length)
    assert saved == [2, 4]


def test_sigterm_saves_after_the_step_and_resumes_exactly(tmp_path):
    """Fault 6 (nothing lost with the cheap default): SIGTERM during a run finishes the step in flight, saves it, exits
    143 with one line; the same command continues and the whole run equals an uninterrupted one."""
    run = tmp_path / "run"
    args = ["--model", "tiny", "--output-dir", str(run), "prompts_per_step=2", "group_size=4", "max_new_tokens=4",
            "lr=0.01", "progress=false", "plot=false", "task_options.instruction=null"]
    cmd = [sys.executable, "-m", "entropy_rl.cli", "train"]
    p = subprocess.Popen(cmd + args + ["--steps", "500"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "Traceback" not in err, err
    n = len(read_metrics(run))
    assert n >= 1 and latest_checkpoint(run).name == f"step-{n:06d}", (n, err)
    assert "stopped by SIGTERM" in err
    r = subprocess.run(cmd + args + ["--steps", str(n + 2)], env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = subprocess.run(cmd + args + ["--steps", str(n + 2), "--output-dir", str(tmp_path / "straight")], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert s.returncode == 0, s.stderr
    assert strip_timing(read_metrics(run)) == strip_timing(read_metrics(tmp_path / "straight"))
