"""benchmarks/collect.py on tiny budgets: both formats, simulator states, determinism, resume, bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.slow  # SAC collections

COLLECT = ROOT / "benchmarks" / "collect.py"
# A SAC small enough to train 1,500 steps in seconds; target -1000 ends the medium stage at the first evaluation.
TINY = ["--steps", "600", "--target-return", "-1000", "--eval-every", "300", "--fine-eval-every", "100",
        "--eval-episodes", "1", "--learning-starts", "100", "--hidden", "16", "16", "--batch-size", "32",
        "--buffer-size", "5000"]


def collect(data_root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = dict(os.environ, EDIS_DATA_DIR=str(data_root / "data"),
                       MINARI_DATASETS_PATH=str(data_root / "minari"))
    return subprocess.run([sys.executable, str(COLLECT), *args], capture_output=True, text=True, timeout=timeout,
                          env=environment)


def hdf5_arrays(path: Path) -> Dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        arrays = {key: file[key][()] for key in ("observations", "actions", "rewards", "next_observations",
                                                 "terminals", "timeouts", "infos/qpos", "infos/qvel")}
        arrays.update({f"attr:{key}": value for key, value in file.attrs.items() if key != "versions"})
    return arrays


def assert_same_file(first: Path, second: Path) -> None:
    a, b = hdf5_arrays(first), hdf5_arrays(second)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{first.name}: {key} differs"


@pytest.fixture(scope="module")
def tiny_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collection")
    result = collect(root, "--env", "Hopper-v5", "--kinds", "random", "medium", "medium-replay", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def test_both_formats_load_through_the_loaders_and_agree(iql, tiny_collection, monkeypatch):
    monkeypatch.setenv("EDIS_DATA_DIR", str(tiny_collection / "data"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tiny_collection / "minari"))
    folder = tiny_collection / "data" / "collected" / "Hopper-v5-seed0"
    for kind in ("random", "medium", "medium-replay"):
        from_hdf5, hdf5_info = iql.load_dataset(f"hdf5:{folder / f'{kind}.hdf5'}")
        from_minari, minari_info = iql.load_dataset(f"minari:edis/Hopper-v5-seed0/{kind}-v0")
        from_collected, _ = iql.load_dataset(f"collected:Hopper-v5:{kind}")
        assert from_hdf5.keys() == from_minari.keys() == from_collected.keys()
        for key in from_hdf5:
            assert np.array_equal(from_hdf5[key], from_minari[key]), (kind, key)
            assert np.array_equal(from_hdf5[key], from_collected[key]), (kind, key)
        assert hdf5_info.env_id == minari_info.env_id == "Hopper-v5"
        assert (hdf5_info.ref_min_score, hdf5_info.ref_max_score) == (-20.272305, 3234.3)
        assert (minari_info.ref_min_score, minari_info.ref_max_score) == (-20.272305, 3234.3)
    medium = hdf5_arrays(folder / "medium.hdf5")
    assert len(medium["rewards"]) == 600 and medium["attr:kind"] == "medium" and medium["attr:seed"] == 0
    assert medium["attr:env_id"] == "Hopper-v5" and np.isfinite(medium["attr:policy_return"])
    record = json.loads((folder / "collect.json").read_text())
    assert len(hdf5_arrays(folder / "medium-replay.hdf5")["rewards"]) == record["sac"]["medium"]["steps"] == 300


def test_simulator_states_reproduce_next_observations_and_rewards(tiny_collection):
    env = gym.make("Hopper-v5")
    env.reset(seed=0)
    for kind in ("random", "medium-replay"):
        data = hdf5_arrays(tiny_collection / "data" / "collected" / "Hopper-v5-seed0" / f"{kind}.hdf5")
        for row in range(0, len(data["rewards"]), 3):
            env.unwrapped.set_state(data["infos/qpos"][row], data["infos/qvel"][row])
            observation, reward, terminated, _, _ = env.step(data["actions"][row])
            np.testing.assert_allclose(observation, data["next_observations"][row], atol=1e-5)
            assert abs(reward - data["rewards"][row]) < 1e-5 and terminated == data["terminals"][row]
    env.close()


def test_same_seed_gives_the_same_files(tiny_collection, tmp_path):
    result = collect(tmp_path, "--env", "Hopper-v5", "--kinds", "random", "medium", "medium-replay", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    for kind in ("random", "medium", "medium-replay"):
        assert_same_file(tiny_collection / "data" / "collected" / "Hopper-v5-seed0" / f"{kind}.hdf5",
                         tmp_path / "data" / "collected" / "Hopper-v5-seed0" / f"{kind}.hdf5")


def test_copy_to_writes_compressed_copies_that_load_the_same(iql, tiny_collection, tmp_path, monkeypatch):
    """--copy-to on a finished collection: nothing is collected again, and the copies (the data committed beside a
    result) are gzip-compressed, hash to the printed sha256, and load through `collected:` to the same arrays."""
    result = collect(tiny_collection, "--env", "Hopper-v5", "--kinds", "medium-replay", "random", *TINY,
                     "--copy-to", str(tmp_path / "committed"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "medium-replay: " in result.stdout and "exists, skipped" in result.stdout
    source = tiny_collection / "data" / "collected" / "Hopper-v5-seed0"
    copies = tmp_path / "committed" / "collected" / "Hopper-v5-seed0"
    assert (copies / "collect.json").read_text() == (source / "collect.json").read_text()
    for kind in ("medium-replay", "random"):
        printed = [line for line in result.stdout.splitlines() if line.startswith(f"copied {kind} ")]
        assert len(printed) == 1 and hashlib.sha256((copies / f"{kind}.hdf5").read_bytes()).hexdigest() in printed[0]
        with h5py.File(copies / f"{kind}.hdf5", "r") as file:
            assert file["observations"].compression == "gzip" and file["infos/qpos"].compression == "gzip"
        assert_same_file(source / f"{kind}.hdf5", copies / f"{kind}.hdf5")
        original, _ = iql.load_dataset(f"hdf5:{source / f'{kind}.hdf5'}")
        monkeypatch.setenv("EDIS_DATA_DIR", str(tmp_path / "committed"))
        copied, _ = iql.load_dataset(f"collected:Hopper-v5:{kind}")
        assert original.keys() == copied.keys() and all(np.array_equal(original[k], copied[k]) for k in original)


def test_killed_collection_resumes_and_gives_the_same_files(tmp_path):
    """SIGKILL during SAC training (after its second checkpoint), rerun: the files equal an uninterrupted run's."""
    args = ["--env", "Hopper-v5", "--kinds", "medium-replay", "expert", "--expert-steps", "1500", *TINY]
    uninterrupted = collect(tmp_path / "uninterrupted", *args)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    root = tmp_path / "killed"
    environment = dict(os.environ, EDIS_DATA_DIR=str(root / "data"), MINARI_DATASETS_PATH=str(root / "minari"))
    process = subprocess.Popen([sys.executable, str(COLLECT), *args], env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = root / "data" / "collected" / "Hopper-v5-seed0" / "sac" / "checkpoint.pt"
    seen, deadline = set(), time.time() + 240
    while len(seen) < 2 and process.poll() is None and time.time() < deadline:
        if checkpoint.is_file():
            seen.add(checkpoint.stat().st_mtime_ns)
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the collection ended before it could be killed"
    assert not (root / "data" / "collected" / "Hopper-v5-seed0" / "expert.hdf5").exists()

    resumed = collect(root, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming SAC" in resumed.stdout
    for kind in ("medium-replay", "expert"):
        assert_same_file(tmp_path / "uninterrupted" / "data" / "collected" / "Hopper-v5-seed0" / f"{kind}.hdf5",
                         root / "data" / "collected" / "Hopper-v5-seed0" / f"{kind}.hdf5")
    records = [json.loads((base / "data" / "collected" / "Hopper-v5-seed0" / "collect.json").read_text())
               for base in (tmp_path / "uninterrupted", root)]
    assert records[0]["sac"]["expert"]["evaluation_return"] == records[1]["sac"]["expert"]["evaluation_return"]


@pytest.mark.parametrize("args, message", [
    (["--env", "NoSuchEnv-v0"], "error: unknown env 'NoSuchEnv-v0'"),
    (["--env", "Pendulum-v1", "--kinds", "random"], "error: Pendulum-v1 is not a MuJoCo env"),
    (["--env", "Hopper-v5", "--kinds", "full-replay"], "error: unknown kind(s) full-replay"),
    (["--env", "Hopper-v5", "--steps", "0"], "error: --steps must be at least 1"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    result = collect(tmp_path, *args, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1


def test_unreachable_target_says_what_it_reached_and_writes_nothing(tmp_path):
    # --fine-eval-from -1: every evaluation is past "half the target", so all but the first are fine-grained.
    result = collect(tmp_path, "--env", "Hopper-v5", "--kinds", "medium", *TINY[:2], "--target-return", "100000",
                     "--medium-budget", "600", "--fine-eval-from", "-1", *TINY[4:])
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: SAC did not reach the target return 100000.0 within --medium-budget 600")
    # the bar shows the target and the best evaluation, not an ETA to a budget the stage never runs to
    bar = result.stderr.replace("\r", "\n").strip().splitlines()[-2]
    assert bar.startswith("SAC medium Hopper-v5 until an evaluation reaches 100000: 600 steps [") and ", best=" in bar
    assert "a killed collection loses the steps since the last one" in result.stdout
    assert "best evaluation" in line
    folder = tmp_path / "data" / "collected" / "Hopper-v5-seed0"
    assert not list(folder.glob("*.hdf5")) and not (folder / "policies").exists()
    assert not (tmp_path / "minari" / "edis" / "Hopper-v5-seed0" / "medium-v0").exists()
    checkpoint = torch.load(folder / "sac" / "checkpoint.pt", weights_only=False)  # a larger budget continues here
    assert [step for step, _ in checkpoint["progress"]["evaluations"]] == [300, 400, 500, 600]


def test_cpu_configs_name_collected_data_and_give_the_command_that_makes_it(iql, tmp_path):
    configs = sorted((ROOT / "configs" / "cpu").glob("*.yaml"))
    assert len(configs) >= 6
    for config in configs:
        dataset = iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--config", str(config)]).dataset
        _, env_id, kind = dataset.split(":")
        with pytest.raises(iql.UserError, match=f"make it with: python benchmarks/collect.py --env {env_id} "
                                                f"--kinds {kind}$"):
            iql.load_dataset(dataset)
