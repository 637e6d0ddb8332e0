"""benchmarks/public_code.py: its shims, readings of a checkout, metrics and report, without the public code;
the end-to-end run needs a checkout of github.com/liuxhym/EDIS and its environment (EDIS_PUBLIC_CODE,
EDIS_PUBLIC_PYTHON), and skips without them."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "public_code.py"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"test_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return load("public_code")


@pytest.fixture(scope="module")
def worker():
    return load("public_code_worker")


def test_shims_meet_the_public_codes_imports(worker, tmp_path):
    worker.write_shims(tmp_path)
    code = ("import gym, gym.spaces, d4rl, mujoco_py, wandb; wandb.init(); wandb.log({'loss': 1.0}); "
            "print(gym.spaces.Box((3,)).shape, issubclass(gym.Wrapper, gym.Env))\n"
            "try:\n    d4rl.qlearning_dataset(None)\nexcept NotImplementedError:\n    print('d4rl not used')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["(3,) True", "d4rl not used"]


def test_the_workers_actor_is_the_behaviour_cloned_actor(harness, worker, iql_edis):
    """The actor the public code's policy energy samples is the one our side uses: same mean and std."""
    torch.manual_seed(0)
    config = iql_edis.parse_config(iql_edis.TrainConfig, iql_edis.CONFIG_SECTIONS, [])
    agent = iql_edis.ImplicitQLearning(config, 11, 3, 1.0, torch.device("cpu"))
    with torch.no_grad():
        agent.actor.log_std.fill_(-0.7)
    copy = worker.BehaviourPolicy({name: value for name, value in harness.actor_weights(agent).items()})
    states = torch.randn(64, 11)
    ours, theirs = agent.actor(states), copy(states)
    assert torch.allclose(ours.mean, theirs.mean, atol=1e-6) and torch.allclose(ours.stddev, theirs.stddev)


def fake_checkout(folder: Path, mask_line: str = "        mask[..., 0:condition.shape[0]] = 1") -> Path:
    files = {
        "diffusion/elucidated_diffusion.py": f"x = 1\n{mask_line}\n            energy_inputs = inputs.clamp(-1., 1.) "
                                             "if clamp else inputs\n                denoised_over_sigma += "
                                             "self.energy_guidance(env)\n",
        "diffusion/trainer.py": "\n\n    def train_state_energy(self, fast_batch, num_negative_sample, env, "
                                "contrastive_step = 128):\n",
        "algorithms/iql_edis.py": "        self.utd_ratio: int = 20\n        self.ope_clip: float = 2.0\n"
                                  "        self.te_clip: float = 0.1\n        self.pe_clip: float = 0.1\n"
                                  "    args.ope_clip = config.ope_clip\n",
        "algorithms/cal_ql_edis.py": "        self.ope_clip: float = ope_clip\n",
        "configs/cal_ql_edis/walker2d/medium-replay.gin": "TrainConfig.ope_clip = 0.1\nTrainConfig.te_clip = 0.2\n"
                                                          "TrainConfig.pe_clip = 0.2\n",
    }
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return folder


def test_scales_and_source_lines_are_read_from_the_checkout(harness, tmp_path):
    checkout = fake_checkout(tmp_path)
    # IQL-EDIS: TrainConfig's defaults (no gin binding); Cal-QL-EDIS: the gin file's bindings.
    assert harness.configured_scales(checkout, "iql_edis", "walker2d", "medium-replay") == (2.0, 0.1, 0.1)
    assert harness.configured_scales(checkout, "cal_ql_edis", "walker2d", "medium-replay") == (0.1, 0.2, 0.2)
    with pytest.raises(harness.HarnessError, match="sets no ope_clip"):
        harness.configured_scales(checkout, "cal_ql_edis", "hopper", "medium-replay")
    lines = harness.source_lines(checkout)
    assert lines["inpainting mask sized by the batch"] == "diffusion/elucidated_diffusion.py:2"
    assert lines["state energy trains at step 0 only"] == "diffusion/trainer.py:3"
    assert lines["command-line scales overwritten by TrainConfig"] == "algorithms/iql_edis.py:5"
    assert lines["state energy's negatives are raw noise"] is None  # not in this checkout
    fixed = harness.source_lines(fake_checkout(tmp_path / "fixed", "        mask[..., 0:condition.shape[1]] = 1"))
    assert fixed["inpainting mask sized by the batch"] is None
    assert harness.task_of("Walker2d-v5", "collected:Walker2d-v5:medium-replay") == ("walker2d", "medium-replay")


def test_paired_differences_and_levels(harness):
    unguided = {"state_mmd": np.array([0.10, 0.20]), "policy_loglik": np.array([-3.0, -2.0, -1.0]),
                "dynamics_state_mse": np.array([1.0, 1.0, 1.0]), "dynamics_reward_mae": np.array([0.5, 0.5, 0.5])}
    guided = {"state_mmd": np.array([0.08, 0.16]), "policy_loglik": np.array([-2.0, -2.0, 0.0]),
              "dynamics_state_mse": np.array([1.1, 1.2, 1.3]), "dynamics_reward_mae": np.array([0.5, 0.5, 0.5])}
    summary = harness.summarise({"u": unguided, "g": guided}, "u")
    assert summary["g"]["state_mmd_minus_unguided"][0] == pytest.approx(-0.03)
    # per-row differences 1, 0, 1: mean 2/3, standard error std(ddof 1) / sqrt(3) = 0.57735 / 1.732
    assert summary["g"]["policy_loglik_minus_unguided"] == pytest.approx([2 / 3, 1 / 3], rel=1e-6)
    assert summary["g"]["dynamics_state_mse_minus_unguided"][0] == pytest.approx(0.2)
    assert summary["u"]["policy_loglik_minus_unguided"] == [0.0, 0.0]
    bands = harness.shares_by_level([0.1, 0.2, 0.3, 0.4, 0.5], [80.0, 12.0, 5.0, 0.5, 0.01])
    assert bands == {"sigma > 10": pytest.approx(0.15), "1 < sigma <= 10": pytest.approx(0.3),
                     "0.1 < sigma <= 1": pytest.approx(0.4), "sigma <= 0.1": pytest.approx(0.5)}


def public_record(**changes) -> dict:
    record = {"energy_losses": {"state": [7.9] * 5, "transition": [0.8] * 5, "policy": [0.7] * 5},
              "chance": {"state": 7.94, "transition": math.log(11), "policy": math.log(11)},
              "held_out_ranking": {"state": 0.5, "transition": 0.55, "policy": 0.6},
              "transition_negatives_free_block_zero": 1.0, "transition_negatives_hold_condition": 1.0,
              "policy_negatives_free_block_zero": 1.0, "mask_width": 26, "row_width": 26, "mask_rows": 256,
              "energy_training_steps": {"state": [0], "transition": [0, 16], "policy": [0, 16]},
              "energy_schedule_steps": 32, "sampling_steps": 128,
              "energy_training_sigmas": {"state": [80.0], "transition": [80.0, 2.17], "policy": [80.0, 2.17]},
              "sampling_sigmas_at_those_steps": {"state": [80.0], "transition": [80.0, 38.8], "policy": [80.0, 38.8]},
              "normalizer_std": [0.5, 2.0]}
    record.update(changes)
    return record


def test_findings_say_what_holds_and_what_does_not(harness, tmp_path):
    lines = harness.source_lines(fake_checkout(tmp_path))
    summary = {"public unguided": {"state_mmd": [0.0167, 0.001]},
               "public, IQL-EDIS scales": {"state_mmd_minus_unguided": [-0.0003, 0.0001]}}
    verdicts = {f["finding"]: f["holds"] for f in harness.check_findings(public_record(), lines, summary)}
    assert all(verdicts.values()), [name for name, holds in verdicts.items() if not holds]
    # A fixed mask draws real (r, s'), the energies then stay near chance, and a 30% move is not "a few percent".
    fixed = public_record(mask_width=19, transition_negatives_free_block_zero=0.0,
                          energy_losses={"state": [7.9] * 5, "transition": [2.3] * 5, "policy": [2.3] * 5})
    summary["public, IQL-EDIS scales"]["state_mmd_minus_unguided"] = [-0.005, 0.0001]
    verdicts = {f["finding"]: f["holds"] for f in harness.check_findings(fixed, lines, summary)}
    assert not verdicts["the inpainting mask covers every column (sized by the batch, not the condition's width)"]
    assert not verdicts["the transition energy's negatives are exactly (s, a, 0, 0)"]
    assert not verdicts["the transition and policy energies' losses fall well below chance (they learn to spot zeros)"]
    assert not verdicts["at its configured scales guidance moves the state MMD by a few percent at most"]
    assert verdicts["the policy energy's negatives are exactly (s, 0, 0, 0)"]


def test_bad_input_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "run", "--public-code", str(tmp_path), "--python",
                             sys.executable, "--config", "configs/cpu/hopper-medium-replay.yaml", "--online",
                             "random:Hopper-v5:100", "--name", "x"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --public-code") and "not a checkout" in result.stderr
    result = subprocess.run([sys.executable, str(SCRIPT), "run", "--public-code", str(fake_checkout(tmp_path)),
                             "--python", str(tmp_path / "nothing"), "--config", "configs/cpu/hopper-medium-replay.yaml",
                             "--online", "random:Hopper-v5:100", "--name", "x"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2 and "public_code.py setup --venv" in result.stderr


PUBLIC_CODE, PUBLIC_PYTHON = os.environ.get("EDIS_PUBLIC_CODE"), os.environ.get("EDIS_PUBLIC_PYTHON")


@pytest.mark.skipif(not (PUBLIC_CODE and PUBLIC_PYTHON),
                    reason="needs a checkout of github.com/liuxhym/EDIS (EDIS_PUBLIC_CODE) and the environment that "
                           "`benchmarks/public_code.py setup` makes (EDIS_PUBLIC_PYTHON)")
@pytest.mark.slow
def test_end_to_end_on_tiny_data(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--public-code", PUBLIC_CODE, "--python", PUBLIC_PYTHON, "--config",
         "configs/cpu/hopper-medium-replay.yaml", "--online", "random:Hopper-v5:4000", "--name", "tiny", "--out",
         str(tmp_path), "--online-rows", "1000", "--rows", "200", "--batches", "2", "--fit-steps", "50",
         "--energy-epochs", "2", "--bc-steps", "50", "--", "--dataset", "random:Hopper-v5:3000",
         "--edis.energy_epochs", "2", "--edis.negative_pool", "256", "--edis.transition_pool", "256"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "public-code-tiny.json").read_text())
    assert set(report["metrics"]) == {"public unguided", "public, IQL-EDIS scales", "public, IQL-EDIS scales x10",
                                      "public, Cal-QL-EDIS scales", "public, Cal-QL-EDIS scales x10", "ours unguided",
                                      "ours, its scales", "ours, its scales x10"}
    verdicts = {f["finding"]: f["holds"] for f in report["findings"]}
    assert verdicts["the transition energy's negatives are exactly (s, a, 0, 0)"]
    assert verdicts["the energies train at steps {0, 16} of a 32-step schedule while sampling runs 128 steps"]
    # ten times the scales moves the public samples more than the scales do
    shares = report["guidance_share"]
    assert shares["public, IQL-EDIS scales x10"]["sigma > 10"] > 5 * shares["public, IQL-EDIS scales"]["sigma > 10"]
    assert (tmp_path / "public-code-tiny.md").read_text().startswith("# The public EDIS code beside ours")
