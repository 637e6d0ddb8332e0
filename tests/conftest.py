"""Shared fixtures: every test gets its own data directories and makes its own data."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("iql", "calql")  # the baselines; EDIS files have tests of their own


def load_algorithm(name: str) -> ModuleType:
    """Imports algorithms/<name>.py as a module (the files are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"algorithm_{name}", ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that inspect and pickle find it
    spec.loader.exec_module(module)
    return module


def algorithm_fixture(name: str):
    """A session fixture named after the algorithm file it imports."""

    @pytest.fixture(scope="session", name=name)
    def fixture() -> ModuleType:
        return load_algorithm(name)

    return fixture


iql = algorithm_fixture("iql")
calql = algorithm_fixture("calql")
iql_edis = algorithm_fixture("iql_edis")
calql_edis = algorithm_fixture("calql_edis")


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """A run in this process sets torch's thread count (its `threads`, 1 by default) for the whole process; the
    next test starts again from torch's default, so tests that train in-process use the cores they have."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fresh dataset roots per test; no network downloads are attempted for long."""
    for variable, folder in (("D4RL_DATASET_DIR", "d4rl"), ("MINARI_DATASETS_PATH", "minari"),
                             ("EDIS_DATA_DIR", "random")):
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


def write_d4rl_file(path: Path, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                    terminals: np.ndarray, timeouts: Optional[np.ndarray] = None,
                    attrs: Optional[Dict[str, object]] = None, skip: tuple = ()) -> Path:
    """A file in D4RL's flat HDF5 layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        columns = {"observations": observations, "actions": actions, "rewards": rewards, "terminals": terminals}
        if timeouts is not None:
            columns["timeouts"] = timeouts
        for key, value in columns.items():
            if key not in skip:
                file.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            file.attrs[key] = value
    return path


def rollout_arrays(env_id: str, steps: int, seed: int = 0, episode_limit: int = 50) -> Dict[str, np.ndarray]:
    """Uniform random steps in a gymnasium env, D4RL-style rows (timeouts every episode_limit steps)."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.action_space.seed(seed)
    state, _ = env.reset(seed=seed)
    rows: Dict[str, List] = {key: [] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    length = 0
    for _ in range(steps):
        action = env.action_space.sample()
        next_state, reward, terminated, truncated, _ = env.step(action)
        length += 1
        timeout = (truncated or length == episode_limit) and not terminated
        for key, value in zip(rows, (state, action, reward, terminated, timeout), strict=True):
            rows[key].append(value)
        if terminated or timeout:
            state, _ = env.reset()
            length = 0
        else:
            state = next_state
    env.close()
    return {key: np.asarray(value, dtype=np.float32 if key in ("observations", "actions", "rewards") else bool)
            for key, value in rows.items()}


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs algorithms/<name>.py in a subprocess, as a user would, with the test's environment."""
    return subprocess.run([sys.executable, str(ROOT / "algorithms" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=dict(os.environ))


def run_scripts(arguments: Dict[str, List[str]], at_once: int = 2, timeout: int = 900
                ) -> Dict[str, subprocess.CompletedProcess]:
    """Runs algorithms/<name>.py with each name's arguments, `at_once` side by side (one per core of a 2-core CPU
    when each run has one thread, the files' default)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {name: pool.submit(run_script, name, *args, timeout=timeout) for name, args in arguments.items()}
        return {name: future.result() for name, future in futures.items()}


def pendulum_controller(observation: np.ndarray) -> float:
    """Energy-pumping swing-up with a PD catch near the top: about -150 return on Pendulum-v1."""
    cos_angle, _, velocity = observation
    angle = np.arctan2(observation[1], cos_angle)
    if cos_angle > 0.8:
        return float(np.clip(-10.0 * angle - 2.0 * velocity, -2.0, 2.0))
    energy = 0.5 * velocity**2 + 15.0 * (cos_angle - 1.0)  # 0 when balanced upright
    return 2.0 * np.sign(velocity) if energy < 0 else -0.5 * velocity


def write_pendulum_dataset(path: Path, episodes: int = 100, expert_share: float = 0.3, seed: int = 0) -> float:
    """Pendulum-v1 data: a share of noisy controller episodes, the rest uniform random.

    Returns the mean episode return of the data (the behaviour policy's score).
    """
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(seed)
    rows: Dict[str, List] = {key: [] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    returns = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        expert, episode_return, done = episode < episodes * expert_share, 0.0, False
        while not done:
            action = pendulum_controller(observation) + rng.normal(0, 0.3) if expert else rng.uniform(-2, 2)
            action = np.clip([action], -2.0, 2.0).astype(np.float32)
            next_observation, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(rows, (observation, action, reward, terminated, truncated), strict=True):
                rows[key].append(value)
            episode_return += float(reward)
            observation, done = next_observation, terminated or truncated
        returns.append(episode_return)
    write_d4rl_file(path, **{key: np.asarray(value) for key, value in rows.items()}, attrs={"env_id": "Pendulum-v1"})
    return float(np.mean(returns))
