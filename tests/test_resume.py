"""Runs that survive: SIGKILL at several points, --resume, and the same metrics as an uninterrupted run.

The kills are real: a small launcher imports the algorithm file, wraps one of its functions so that
the process sends itself SIGKILL on the n-th call (during an update, a refresh or an evaluation), and
runs the file's main() exactly as the command line does. The resumed process is a plain
`python algorithms/<file>.py --resume <run dir>`.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import ROOT, run_script, run_scripts

pytestmark = pytest.mark.slow  # runs killed and resumed

TINY = ["--dataset", "random:Hopper-v5:1000", "--offline_iterations", "60", "--online_iterations", "120",
        "--offline_eval_freq", "30", "--eval_freq", "40", "--n_episodes", "2", "--batch_size", "32", "--log_freq",
        "10", "--snapshot_every", "20", "--wandb_mode", "disabled", "--device", "cpu"]
TINY_EDIS = ["--edis.refresh_every", "50", "--edis.initial_fit_steps", "30", "--edis.refresh_fit_steps", "20",
             "--edis.width", "32", "--edis.blocks", "1", "--edis.time_embedding_dim", "8", "--edis.sample_steps", "4",
             "--edis.num_samples", "200", "--edis.sample_batch_size", "200", "--edis.negative_pool", "64",
             "--edis.transition_pool", "40", "--edis.energy_epochs", "1", "--edis.positive_buffer_size", "64",
             "--edis.metric_samples", "50", "--edis.energy_hidden", "16", "--edis.energy_layers", "1"]
LAUNCHER = """
import importlib.util, os, signal, sys
path, target, kill_on_call = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("algorithm", path)
module = importlib.util.module_from_spec(spec)
sys.modules["algorithm"] = module
spec.loader.exec_module(module)
owner, _, name = target.rpartition(".")
holder = getattr(module, owner) if owner else module
original, calls = getattr(holder, name), [0]
def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_on_call:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(holder, name, wrapped)
sys.exit(module.main(sys.argv[4:]))
"""


def launch(name: str, target: str, kill_on_call: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LAUNCHER, str(ROOT / "algorithms" / f"{name}.py"), target,
                           str(kill_on_call), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ))


def metrics(run_dir: Path) -> List[Dict]:
    """metrics.jsonl without the wall-clock timings."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if "time" not in key} for record in records]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    steps = [record["step"] for record in metrics(resumed)]
    assert steps == sorted(steps)  # nothing logged twice, nothing out of order
    assert metrics(resumed) == metrics(uninterrupted)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (resumed, uninterrupted)]
    for summary in summaries:
        for phase in ("offline", "online"):
            summary[phase].pop("wall_clock_s")
    assert summaries[0] == summaries[1]
    assert not (resumed / "snapshot.pt").exists()  # a finished run keeps no snapshot


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Dict[str, Path]:
    """One uninterrupted run per algorithm file, the reference for every killed one."""
    root = tmp_path_factory.mktemp("uninterrupted")
    names = ("iql", "calql", "iql_edis", "calql_edis")
    results = run_scripts({name: [*TINY, *(TINY_EDIS if name.endswith("edis") else []), "--log_dir", str(root),
                                  "--name", name] for name in names})
    for result in results.values():
        assert result.returncode == 0, result.stderr[-3000:]
    return {name: root / name for name in names}


@pytest.mark.parametrize("name, target, kill_on_call, where", [
    ("iql", "ImplicitQLearning.update", 45, "offline training"),
    ("calql", "evaluate", 3, "an evaluation"),
    ("iql_edis", "TransitionEnergies.fit", 1, "a refresh"),
    ("calql_edis", "TransitionDiffusion.sample", 3, "the sampling of a refresh"),
])
def test_a_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, name, target, kill_on_call,
                                                            where):
    extra = TINY_EDIS if name.endswith("edis") else []
    killed = launch(name, target, kill_on_call, *TINY, *extra, "--log_dir", str(tmp_path), "--name", "run")
    assert killed.returncode == -signal.SIGKILL, f"not killed during {where}: {killed.stderr[-2000:]}"
    run_dir = tmp_path / "run"
    assert (run_dir / "snapshot.pt").is_file() and not (run_dir / "summary.json").exists()
    resumed = run_script(name, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    assert_same_run(run_dir, uninterrupted[name])


def test_a_damaged_snapshot_is_refused_in_one_line(tmp_path):
    """The run's own writes are atomic; a snapshot damaged outside it is named, not unpickled into a traceback."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "snapshot.pt").write_bytes(b"not a snapshot")
    result = run_script("iql", "--resume", str(run_dir))
    assert result.returncode == 2 and "snapshot.pt is unreadable" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_resume_errors_are_one_line(tmp_path):
    for args, message in ((["--resume", str(tmp_path / "none")], "is not a directory"),
                          (["--resume", str(tmp_path)], "no snapshot in"),
                          (["--resume", str(tmp_path), "--beta", "3"], "other options are not taken")):
        result = run_script("iql", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_an_env_that_raises_ends_the_run_with_one_line_and_keeps_its_snapshot(tmp_path):
    # No offline phase, so that no evaluation steps an env before the training env's 200th step.
    launcher = LAUNCHER.replace("os.kill(os.getpid(), signal.SIGKILL)", "raise RuntimeError('simulator exploded')")
    result = subprocess.run([sys.executable, "-c", launcher, str(ROOT / "algorithms" / "iql.py"),
                             "NormalizeState.step", "200", *TINY, "--offline_iterations", "0",
                             "--online_iterations", "250", "--eval_freq", "1000", "--log_dir", str(tmp_path),
                             "--name", "run"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "env Hopper-v5 raised RuntimeError at online step 200: simulator exploded" in last
    assert "--resume" in last and (tmp_path / "run" / "snapshot.pt").is_file()
    assert "Traceback" not in result.stderr
