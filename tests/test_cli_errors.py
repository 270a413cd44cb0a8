"""Issue 14, fault 7: every user error of the command line ends in one line naming the file or the value (exit 2), before
a model loads where it can; no Python traceback unless --debug. Tiny random model, CPU."""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from entropy_rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "tiny", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "progress=false", "plot=false",
         "task_options.instruction=null"]


def cli(*args, cwd=None, extra_env=None, preexec_fn=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "entropy_rl.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout, preexec_fn=preexec_fn)


def one_line_error(r, *words):
    "Exit 2, stderr's last line is `entropy-rl: error: ...` with every word, and no traceback."
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("entropy-rl: error: ") and all(w in last for w in words), last
    return last


@pytest.fixture
def no_model(monkeypatch):
    "Fail the test if a model is built: the error must come first."
    import entropy_rl.cli as cli_mod
    import entropy_rl.trainer as tr
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was built before the error"))
    monkeypatch.setattr(tr, "build_model", boom)
    monkeypatch.setattr(cli_mod, "build_model", boom)


def run_main(capsys, *args):
    "main() in this process: (exit code, stderr)."
    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_malformed_yaml_and_json_name_the_file_and_line(tmp_path, capsys, no_model):
    "Fault 7: a malformed YAML or JSON config file: one line with the file and the line number."
    (tmp_path / "bad.yaml").write_text("steps: 3\nloss_options: {clip_high: 0.2\n")
    rc, err = run_main(capsys, "train", "--config", str(tmp_path / "bad.yaml"))
    assert rc == 2 and "bad.yaml is not valid YAML" in err and "line" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "bad.json").write_text('{"steps": 3,}')
    rc, err = run_main(capsys, "train", "--config", str(tmp_path / "bad.json"))
    assert rc == 2 and "bad.json is not valid JSON" in err and "line 1" in err, err


def test_directory_as_config(tmp_path, capsys, no_model):
    "Fault 7: a directory given as --config."
    (tmp_path / "conf.yaml").mkdir()
    rc, err = run_main(capsys, "train", "--config", str(tmp_path / "conf.yaml"))
    assert rc == 2 and "conf.yaml is a directory" in err, err


def test_output_dir_that_is_a_file(tmp_path, capsys, no_model):
    "Fault 7: --output-dir names a file (or a path under one): refused before the model loads."
    (tmp_path / "f").write_text("x")
    rc, err = run_main(capsys, "train", "--output-dir", str(tmp_path / "f"), *SMALL)
    assert rc == 2 and f"output_dir {tmp_path / 'f'} exists and is not a directory" in err, err
    rc, err = run_main(capsys, "train", "--output-dir", str(tmp_path / "f" / "run"), *SMALL)
    assert rc == 2 and "is a file" in err, err


def test_output_dir_that_is_read_only(tmp_path, capsys, no_model):
    "Fault 7: a read-only --output-dir: refused before the model loads (a read-only filesystem; a chmod-ed dir if not root)."
    if os.getuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(); ro.chmod(0o500)
        target = ro / "run"
    elif Path("/sys").is_dir():
        target = Path("/sys/entropy-rl-run")
    else:
        pytest.skip("no read-only directory to try as root")
    rc, err = run_main(capsys, "train", "--output-dir", str(target), *SMALL)
    assert rc == 2 and f"output_dir {target} is not writable" in err, err


def test_model_dir_without_weights(tmp_path, capsys):
    "Fault 7: a model directory with a config but no weights: one line naming the directory."
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    rc, err = run_main(capsys, "train", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "run"))
    assert rc == 2 and f"Could not load a model from {tmp_path / 'm'}: it holds no weights" in err, err


@pytest.mark.parametrize("offline", [True, False])
def test_unknown_hub_id_fails_fast_in_one_line(tmp_path, offline):
    """Fault 7: an unknown hub id on a machine without the hub fails within seconds (no minute of retries) with one
    line naming the id, with HF_HUB_OFFLINE set and without it."""
    extra = {"HF_HUB_OFFLINE": "1"} if offline else {"HF_HUB_OFFLINE": "0"}
    extra["ENTROPY_RL_CACHE"] = str(tmp_path / "cache")
    t0 = time.time()
    r = cli("eval", "--model", "no-such-org/no-such-model", "--problems", "2", extra_env=extra, timeout=120)
    assert time.time() - t0 < 30
    one_line_error(r, "'no-such-org/no-such-model'", "not a local directory")


@pytest.mark.parametrize("text,says", [
    ('{"step": 1, "reward_mean": 0.5, "entropy": 1.0}\n{"step": 2, "rew', "{metrics} line 2 is not valid JSON"),
    ("", "run {run} has no metrics yet"),
])
def test_plot_of_a_bad_run_names_it(tmp_path, capsys, text, says):
    """Fault 7: a half-written line in metrics.jsonl (the error named no file), and `plot` of a run with no metrics yet
    (it drew a blank figure): one line naming the file or the run; no figure."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(text)
    rc, err = run_main(capsys, "plot", str(run), "--out", str(tmp_path / "p.png"))
    assert rc == 2 and says.format(run=run, metrics=run / "metrics.jsonl") in err, err
    assert not (tmp_path / "p.png").exists()


def test_disk_full_during_a_save_names_the_directory(tmp_path):
    """Fault 7: a write that fails during a checkpoint save (here a file-size limit, which fails writes as a full disk
    does): one line naming the checkpoint directory; no temporary directory is left behind."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))   # the weights fit, the optimizer state does not
    run = tmp_path / "run"
    r = cli("train", "--steps", "1", "--output-dir", str(run), *SMALL, preexec_fn=limit)
    one_line_error(r, "could not write checkpoint step-000001", str(run / "checkpoints"), "MiB free")
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list((run / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("args,words", [
    (["--problems", "0"], ["--problems must be >= 1, got 0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens must be >= 1, got 0"]),
    (["--k", "3", "--samples", "2"], ["--samples (2) must be >= --k (3)"]),
    (["--temperature", "0"], ["--temperature"]),
])
def test_eval_numbers_are_checked_before_the_model(args, words, capsys, no_model):
    "Fault 7: `eval --problems 0` printed NaN with exit 0; `--max-new-tokens 0` was silently replaced. Now refused."
    rc, err = run_main(capsys, "eval", "--model", "tiny", *args)
    assert rc == 2 and all(w in err for w in words), err


def test_eval_of_a_run_without_checkpoint_stops_before_the_model(tmp_path, capsys, no_model):
    "Fault 7: eval of a run directory that has no checkpoint stops before a model loads."
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "tiny"}))
    rc, err = run_main(capsys, "eval", str(tmp_path / "run"))
    assert rc == 2 and "has no checkpoint yet" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a GPU")
def test_fp16_on_cpu_is_refused(tmp_path, capsys, no_model):
    "Fault 7: mixed_precision=fp16 on the CPU was silently ignored; now refused before the model loads."
    rc, err = run_main(capsys, "train", "--output-dir", str(tmp_path / "run"), *SMALL, "mixed_precision=fp16")
    assert rc == 2 and "mixed_precision='fp16' needs a CUDA device" in err, err


def test_no_traceback_without_debug_and_one_with_it(tmp_path):
    "Fault 7: a user error never ends in a traceback; --debug (before or after the command) shows it."
    r = cli("train", "--config", str(tmp_path / "missing.yaml"))
    one_line_error(r, "missing.yaml")
    for args in (["--debug", "train"], ["train", "--debug"]):
        r = cli(*args, "--config", str(tmp_path / "missing.yaml"))
        assert r.returncode != 0 and "Traceback" in r.stderr and "missing.yaml" in r.stderr, r.stderr


def test_unexpected_failure_is_one_line_with_a_hint(capsys, monkeypatch):
    "Fault 7: a failure that is not a user error: one line, exit 1, and the hint to rerun with --debug."
    import entropy_rl.cli as cli_mod
    monkeypatch.setattr(cli_mod, "train", lambda cfg: (_ for _ in ()).throw(ZeroDivisionError("boom")))
    rc, err = run_main(capsys, "train", *SMALL)
    assert rc == 1 and err.strip() == "entropy-rl: internal error: ZeroDivisionError: boom (rerun with --debug for the traceback)"
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "train", *SMALL])
