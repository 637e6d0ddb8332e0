"""benchmarks/guidance_sweep.py: one refresh rebuilt from a checkpoint, every setting measured with its error."""

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # a refresh rebuilt end to end

TINY_EDIS = ["--edis.initial_fit_steps", "50", "--edis.refresh_fit_steps", "50", "--edis.width", "32",
             "--edis.blocks", "1", "--edis.sample_steps", "4", "--edis.negative_pool", "64",
             "--edis.transition_pool", "40", "--edis.energy_epochs", "1", "--edis.positive_buffer_size", "100",
             "--edis.energy_hidden", "32", "--edis.sample_batch_size", "200"]


def test_sweep_measures_unguided_each_energy_and_the_redrawn_dynamics(tmp_path):
    pretrain = run_script("iql_edis", "--dataset", "random:Hopper-v5:600", "--offline_iterations", "30",
                          "--offline_eval_freq", "30", "--online_iterations", "0", "--n_episodes", "1",
                          "--batch_size", "16", "--wandb_mode", "disabled", "--device", "cpu",
                          "--log_dir", str(tmp_path / "runs"), "--name", "pre",
                          "--checkpoints_path", str(tmp_path / "checkpoints"))
    assert pretrain.returncode == 0, pretrain.stderr[-2000:]
    checkpoint = tmp_path / "checkpoints" / "pre" / "checkpoint_30.pt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "guidance_sweep.py"), "--config",
         "configs/cpu/hopper-medium-replay.yaml", "--checkpoint", str(checkpoint), "--online-steps", "100",
         "--rows", "50", "--repeats", "2", "--scales", "1", "--together", "0.5", "0.5", "0.5", "--redraw",
         "--name", "tiny", "--out", str(tmp_path / "out"), "--", "--dataset", "random:Hopper-v5:600", *TINY_EDIS],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads((tmp_path / "out" / "guidance_sweep-tiny.json").read_text())
    settings = [measured["unguided"], measured["together"]["metrics"]]
    settings += [entry["metrics"] for energy in ("state", "policy", "transition")
                 for entry in measured["sweep"][energy]]
    assert len(settings) == 5
    for metrics in settings:
        assert set(metrics) == {"state_mmd", "policy_loglik", "dynamics_state_mse", "dynamics_reward_mae",
                                "dynamics_state_mse_redrawn", "dynamics_reward_mae_redrawn"}
        for mean, error in metrics.values():  # every number comes with its standard error
            assert math.isfinite(mean) and math.isfinite(error) and error >= 0
    table = (tmp_path / "out" / "guidance_sweep-tiny.md").read_text()
    assert "| redrawn s' error / std^2 |" in table
    assert "| all three (state / policy / transition) | 0.5 / 0.5 / 0.5 |" in table
    assert (tmp_path / "out" / "guidance_sweep-tiny.png").stat().st_size > 0
