"""Bad input ends with exit code 2 and one line on stderr, no traceback, and no summary.json."""

from pathlib import Path

import numpy as np
import pytest
from conftest import rollout_arrays, run_script, write_d4rl_file

TINY = ["--offline_iterations", "2", "--online_iterations", "2", "--eval_freq", "2", "--n_episodes", "1",
        "--wandb_mode", "disabled"]


def run_main(module, capsys, *args: str) -> str:
    """main() in-process: returns its one error line after checking the exit code.

    Progress bars and notes of work done before the error (collecting data, training) may precede it.
    """
    code = module.main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line and not line.startswith("note: ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def hopper_file(isolated_data: Path) -> Path:
    return write_d4rl_file(isolated_data / "hopper.hdf5", **rollout_arrays("Hopper-v5", 120),
                           attrs={"env_id": "Hopper-v5"})


def run_dir_has_no_summary(log_dir: Path) -> bool:
    return not list(log_dir.rglob("summary.json"))


@pytest.mark.parametrize("algorithm", ["iql", "calql"])
def test_data_found_bad_during_training_leave_the_run_folder_without_a_summary(algorithm, request, capsys,
                                                                               isolated_data):
    """Rewards near the float32 limit pass the loader's checks; the first losses overflow."""
    rng = np.random.default_rng(0)
    rows = 400
    path = write_d4rl_file(isolated_data / "huge.hdf5", rng.normal(size=(rows, 11)).astype(np.float32),
                           rng.uniform(-1, 1, (rows, 3)).astype(np.float32), np.full(rows, 3e38, np.float32),
                           np.zeros(rows, bool), np.arange(rows) % 50 == 49)
    line = run_main(request.getfixturevalue(algorithm), capsys, "--dataset", f"hdf5:{path}", "--env", "Hopper-v5",
                    "--offline_iterations", "40", "--online_iterations", "0", "--log_freq", "10",
                    "--normalize_reward", "false", "--batch_size", "32", "--n_episodes", "1", "--wandb_mode",
                    "disabled", "--log_dir", str(isolated_data / "runs"), "--name", "inf")
    assert line.startswith("error: train/") and "became NaN or inf at update" in line
    run_dir = isolated_data / "runs" / "inf"
    assert (run_dir / "config.yaml").is_file()  # the run had started: its folder exists
    assert run_dir_has_no_summary(isolated_data / "runs")


@pytest.mark.parametrize("algorithm", ["iql", "calql"])
def test_missing_file_is_one_line_without_traceback(algorithm, isolated_data):
    result = run_script(algorithm, "--dataset", f"hdf5:{isolated_data}/nope.hdf5", "--log_dir",
                        str(isolated_data / "runs"), *TINY)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: dataset file not found: {isolated_data}/nope.hdf5"]
    assert "Traceback" not in result.stdout + result.stderr
    assert run_dir_has_no_summary(isolated_data / "runs")


def test_corrupted_hdf5(iql, capsys, isolated_data):
    path = isolated_data / "broken.hdf5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    line = run_main(iql, capsys, "--dataset", f"hdf5:{path}", "--env", "Hopper-v5", *TINY)
    assert "cannot read HDF5 file" in line and str(path) in line


def test_truncated_real_hdf5(iql, capsys, hopper_file):
    data = hopper_file.read_bytes()
    hopper_file.write_bytes(data[: len(data) // 2])
    line = run_main(iql, capsys, "--dataset", f"hdf5:{hopper_file}", *TINY)
    assert "cannot read HDF5 file" in line


def test_missing_keys(iql, capsys, isolated_data):
    arrays = rollout_arrays("Hopper-v5", 50)
    path = write_d4rl_file(isolated_data / "nokeys.hdf5", **arrays, skip=("rewards", "terminals"))
    line = run_main(iql, capsys, "--dataset", f"hdf5:{path}", "--env", "Hopper-v5", *TINY)
    assert "lacks the key(s) rewards, terminals" in line


@pytest.mark.parametrize("key", ["observations", "actions", "rewards"])
def test_nan_and_inf_are_counted_with_first_index(iql, capsys, isolated_data, key):
    arrays = rollout_arrays("Hopper-v5", 80)
    arrays[key][17] = np.nan
    arrays[key][40] = np.inf
    arrays[key][41] = -np.inf
    path = write_d4rl_file(isolated_data / "nan.hdf5", **arrays, attrs={"env_id": "Hopper-v5"})
    line = run_main(iql, capsys, "--dataset", f"hdf5:{path}", *TINY)
    assert f"3 row(s) of '{key}' hold NaN or inf (first at index 17)" in line


def test_observation_size_must_match_env(iql, capsys, hopper_file):
    line = run_main(iql, capsys, "--dataset", f"hdf5:{hopper_file}", "--env", "Walker2d-v5", *TINY)
    assert "observations have 11 numbers but env 'Walker2d-v5' gives 17" in line


def test_action_size_must_match_env(iql, capsys, isolated_data):
    arrays = rollout_arrays("Hopper-v5", 60)
    arrays["actions"] = np.zeros((60, 5), np.float32)
    path = write_d4rl_file(isolated_data / "acts.hdf5", **arrays, attrs={"env_id": "Hopper-v5"})
    line = run_main(iql, capsys, "--dataset", f"hdf5:{path}", *TINY)
    assert "actions have 5 numbers but env 'Hopper-v5' takes 3" in line


@pytest.mark.parametrize("dataset, message", [
    ("s3:bucket/file", "unknown dataset scheme"),
    ("d4rl:hopper-great-v2", "unknown D4RL dataset 'hopper-great-v2'"),
    ("random:Hopper-v5", "use random:<EnvId>:<transitions>"),
    ("random:NoSuchEnv-v0:100", "cannot make env 'NoSuchEnv-v0'"),
    ("minari:nobody/nothing-v0", "cannot load Minari dataset 'nobody/nothing-v0'"),
])
def test_unknown_dataset(iql, capsys, dataset, message):
    assert message in run_main(iql, capsys, "--dataset", dataset, *TINY)


def test_missing_d4rl_file_says_where_to_put_it(iql, capsys, isolated_data, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    line = run_main(iql, capsys, "--dataset", "d4rl:hopper-medium-v2", *TINY)
    expected = isolated_data / "d4rl" / "hopper_medium-v2.hdf5"
    assert f"put it at {expected}" in line and "gym_mujoco_v2/hopper_medium-v2.hdf5" in line
    assert not expected.exists()
    # without internet: the CPU-sized config on data made here
    assert line.endswith("python benchmarks/collect.py --env Hopper-v5 --kinds medium && "
                         "python algorithms/iql.py --config configs/cpu/hopper-medium.yaml")


def test_a_full_scale_budget_on_a_cpu_says_so_in_one_line(iql, capsys, monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("offline")))
    assert iql.main(["--config", "configs/mujoco/hopper-medium-replay.yaml", "--device", "cpu"]) == 2
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: a full-scale")]
    assert notes == ["note: a full-scale budget on a CPU (1,000,000 offline updates + 200,000 online steps): "
                     "expect days; configs/cpu/*.yaml are sized for a 2-core CPU"]
    assert iql.main(["--dataset", "random:Hopper-v5:300", *TINY]) == 0  # a small budget: no note
    assert "note: a full-scale" not in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--offline_iterations", "-1"], "offline_iterations = -1 is outside [0, inf]"),
    (["--online_iterations", "-10"], "online_iterations = -10 is outside [0, inf]"),
    (["--batch_size", "0"], "batch_size = 0 is outside [1, inf]"),
    (["--wandb_mode", "sometimes"], "wandb_mode = 'sometimes'"),
    (["--seed", "three"], "seed = 'three' is not an integer"),
    (["--seed", "1.7"], "seed = '1.7' is not an integer"),
    (["--normalize", "perhaps"], "normalize = 'perhaps' is not true or false"),
    (["--discount", "nan"], "discount = 'nan' is not a number"),
    (["--seed"], "--seed needs a value"),
    (["seed", "3"], "unexpected argument 'seed'"),
    (["--no_such_option", "1"], "unknown option --no_such_option"),
])
def test_invalid_values(iql, capsys, args, message):
    assert message in run_main(iql, capsys, "--dataset", "random:Hopper-v5:100", *args)


@pytest.mark.parametrize("ratio", ["-0.1", "1.5"])
def test_ratio_outside_unit_interval(calql, capsys, ratio):
    assert f"mixing_ratio = {float(ratio)} is outside [0.0, 1.0]" in run_main(
        calql, capsys, "--dataset", "random:Hopper-v5:100", "--mixing_ratio", ratio)


@pytest.mark.parametrize("args, message", [
    (["--edis.replay", "sometimes"], "edis.replay = 'sometimes' must be paper or reference"),
    (["--edis.utd_ratio", "0"], "edis.utd_ratio = 0 is outside [1, inf]"),
    (["--edis.transition_pool", "5"], "edis.transition_pool = 5 must be at least edis.energy_negatives = 10"),
])
def test_invalid_edis_values(iql_edis, capsys, args, message):
    assert message in run_main(iql_edis, capsys, "--dataset", "random:Hopper-v5:100", *args)


def test_calql_edis_has_no_reference_replay(calql_edis, capsys):
    line = run_main(calql_edis, capsys, "--dataset", "random:Hopper-v5:100", "--edis.replay", "reference")
    assert "edis.replay = reference is the public IQL-EDIS loop" in line


def test_checkpoint_of_other_algorithm_is_refused(iql, calql, capsys, isolated_data):
    import torch

    path = isolated_data / "calql.pt"
    torch.save({"algorithm": "calql", "agent": {}}, path)
    line = run_main(iql, capsys, "--dataset", "random:Hopper-v5:100", "--load_model", str(path), *TINY,
                    "--log_dir", str(isolated_data / "runs"))
    assert "written by 'calql', not 'iql'" in line
    assert run_dir_has_no_summary(isolated_data / "runs")
