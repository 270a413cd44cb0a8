"The `entropy-rl` console script end to end (subprocess) on the tiny random model."
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entropy_rl.cli import build_config, main

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", "import sys; from entropy_rl.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


SMALL = ["--model", "tiny", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "progress=false",
         "task_options.instruction=null"]


def test_train_end_to_end(tmp_path):
    run = tmp_path / "run"
    r = cli("train", "--steps", "3", "--output-dir", str(run), *SMALL)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["step"] == 3 and out["run_dir"] == str(run)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 and (run / "metrics.png").exists()

def test_eval_and_plot_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "2", "--output-dir", str(run), *SMALL]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--problems", "3", "--k", "2", "--max-new-tokens", "4"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["problems"] == 3 and 0 <= ev["pass@1"] <= ev["pass@2"] <= 1
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_config_file_and_algo_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("model: tiny\nsteps: 1\nprompts_per_step: 2\ngroup_size: 2\nmax_new_tokens: 3\n"
                                     "progress: false\nplot: false\nloss_options: {clip_low: 0.1}\n")
    assert main(["train", "--config", "c.yaml", "--algo", "dapo", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["algo"] == "dapo" and cfg["output_dir"] == "runs/dapo"
    assert cfg["loss_options"]["clip_low"] == 0.1 and cfg["loss_options"]["clip_high"] == 0.28   # resolved: dapo's default
    assert main(["train", "--config", "c.yaml", "--algo", "dapo"]) == 0
    assert (tmp_path / "runs" / "dapo" / "metrics.jsonl").exists()


@pytest.mark.parametrize("args,words", [
    (["train", "stepz=3"], ["stepz", "valid keys"]),
    (["train", "--algo", "ppo"], ["ppo", "grpo"]),
    (["train", "scheduler=exp"], ["exp", "cosine"]),
    (["train", "--config", "missing.yaml"], ["missing.yaml"]),
    (["eval", "/nonexistent/run"], ["not a run directory"]),
])
def test_bad_input_exits_2_with_choices(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_algos_lists_the_registry(capsys):
    from entropy_rl.losses import list_losses
    assert main(["algos"]) == 0
    assert capsys.readouterr().out.split() == list_losses()


def test_defaults_resolve_to_the_embedded_default():
    cfg = build_config()
    assert cfg.model == "default" and cfg.algo == "grpo"
