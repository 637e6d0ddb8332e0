"""Learning checks: offline training must turn mixed-quality data into a policy better than the data.

Pendulum-v1 data: 30% noisy episodes of a swing-up controller (about -150 return), 70% uniform
random (about -1200). The data's own mean return is about -890 and an untrained actor scores
about -1300; a learner that does not learn (no actor update, wrong targets, broken sampling)
stays there. The two runs go side by side, one thread each, one per core of a 2-core CPU.
Measured there on one thread: IQL -387 at seed 0 with 2500 updates; Cal-QL with 2500 updates, batch 64
and 2 CQL actions -414, -378, -401, -322 at seeds 0-3 (70 s; batch 128 and 4 actions: -310 at seed 0
in 134 s; 4 actions and batch 64: -661, -568, -335; one critic layer instead of two: -1131). Earlier,
on both cores: IQL with 4000 updates -350, -461, -432, -328 at seeds 0-3; Cal-QL with 10 actions
-909 at 2000 updates.
"""

import json
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import pytest
from conftest import run_scripts, write_pendulum_dataset

pytestmark = pytest.mark.slow  # learning checks: minutes

MARGIN = 150.0  # the learned policy must beat the data's mean return by this much
SETTINGS = {
    "iql": ["--offline_iterations", "2500", "--beta", "10"],
    "calql": ["--offline_iterations", "2500", "--batch_size", "64", "--cql_alpha", "1", "--cql_n_actions", "2"],
}


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Tuple[float, Dict[str, subprocess.CompletedProcess], Path]:
    """Both algorithms trained on the same data at once, each as a user runs it, one thread each."""
    root = tmp_path_factory.mktemp("learning")
    data_return = write_pendulum_dataset(root / "pendulum.hdf5")
    common = ["--dataset", f"hdf5:{root / 'pendulum.hdf5'}", "--online_iterations", "0", "--eval_freq", "100000",
              "--n_episodes", "10", "--wandb_mode", "disabled", "--device", "cpu", "--seed", "0", "--log_dir",
              str(root), "--threads", "1"]
    results = run_scripts({name: [*common, "--name", name, *settings] for name, settings in SETTINGS.items()})
    return data_return, results, root


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_offline_training_beats_the_data(algorithm, learned):
    data_return, results, root = learned
    assert data_return < -700, "the data must leave room to improve"
    assert results[algorithm].returncode == 0, results[algorithm].stderr[-3000:]
    final_return = json.loads((root / algorithm / "summary.json").read_text())["offline"]["final_return"]
    assert final_return > data_return + MARGIN, f"{algorithm}: {final_return:.0f} vs data mean {data_return:.0f}"
