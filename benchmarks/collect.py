"""D4RL-style datasets for any Gymnasium MuJoCo env, made on this machine.

    python benchmarks/collect.py --env Hopper-v5 --kinds random medium medium-replay
    python benchmarks/collect.py --env Hopper-v5 --kinds expert medium-expert   # later: the same SAC, trained on

Kinds, in D4RL's sense (Fu et al. 2020, arXiv 2004.07219):
- random: a uniform random policy, --steps steps (the `random:` dataset scheme does the same).
- medium: a SAC policy (stable-baselines3) trained until its stochastic evaluation return reaches
  --target-return (default: a third of D4RL's expert return for Hopper, HalfCheetah and Walker2d),
  rolled out stochastically for --steps steps. Evaluations come every --eval-every steps, and every
  --fine-eval-every once one has reached half the target, so that the policy is caught near it.
- medium-replay: every transition that SAC collected (its replay buffer) until it got there.
- expert: the same SAC trained on to --expert-steps environment steps; the best-evaluated policy,
  rolled out stochastically for --steps steps. The file's attributes say what return it reached.
- medium-expert: the medium rollouts followed by the expert rollouts.

Each dataset is written twice, and both copies load in the algorithm files with no extra options
and give the same transitions:
- $EDIS_DATA_DIR/collected/<EnvId>-seed<S>/<kind>.hdf5 (default EDIS_DATA_DIR: ~/.cache/edis-datasets),
  D4RL's layout: observations, actions, rewards, terminals, timeouts, next_observations,
  infos/qpos and infos/qvel (the simulator state before each step), and attributes (env id,
  kind, policy return, seed, package versions, ref_min_score / ref_max_score).
  Load with --dataset collected:<EnvId>:<kind>[:<seed>] or --dataset hdf5:<path>.
- the Minari dataset edis/<EnvId>-seed<S>/<kind>-v0 under $MINARI_DATASETS_PATH (default
  ~/.minari/datasets), with the env spec, the reference returns, terminations and truncations.
  Load with --dataset minari:edis/<EnvId>-seed<S>/<kind>-v0.

The SAC checkpoint, its replay buffer and the transitions recorded so far are saved atomically
every --eval-every steps under <folder>/sac/: a killed collection resumes from there when the same
command runs again, and gives the same files as an uninterrupted one. The medium and expert
policies stay in <folder>/policies/, so `expert` can be added later without retraining `medium`.
Datasets that exist are skipped. A dataset file appears under its final name only when complete.

--copy-to DIR then writes compressed copies of the datasets named by --kinds (and collect.json) to
DIR/collected/<EnvId>-seed<S>/ and prints their sha256: the data to commit beside a result, read
back with EDIS_DATA_DIR=DIR (or finetune.py --data-dir DIR).
"""

import argparse
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import gymnasium as gym
import h5py
import minari
import numpy as np
import torch
from minari.data_collector import EpisodeBuffer
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv
from tqdm.auto import tqdm

KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")
# D4RL's reference returns (random, expert): the normalised score and the default medium target.
D4RL_REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                   "walker2d": (1.629008, 4592.3)}
# Settings that change what is collected: a folder holds one collection, made with one set of them.
RESULT_SETTINGS = ("env", "seed", "steps", "target_return", "hidden", "batch_size", "learning_starts",
                   "buffer_size", "eval_every", "fine_eval_every", "fine_eval_from", "eval_episodes")
COLUMNS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "qpos", "qvel")


class CollectError(Exception):
    """Bad input or an unreachable target: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Recording: every step as a D4RL row, with the simulator state before the step
# ---------------------------------------------------------------------------------------------
class TransitionRecorder(gym.Wrapper):
    """Records each step (s, a, r, s', terminated, truncated, qpos, qvel) while `recording` is on.

    qpos and qvel are read before the step, so that setting the simulator to them and stepping the
    action reproduces s' and r. An episode that is reset before it ended (a rollout or a training
    chunk that stops mid-episode) has its last step marked as a timeout: it was cut, not ended.
    Rows go into preallocated columns that double when full: millions of small arrays kept
    between SAC's large temporary tensors fragment the heap (measured: +0.25 MB per step).
    """

    DTYPES = {"rewards": np.float32, "terminals": bool, "timeouts": bool, "qpos": np.float64, "qvel": np.float64}

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.recording = True
        self.columns: Dict[str, np.ndarray] = {}
        self.size = 0
        self.episode_returns: List[float] = []
        self._observation: Optional[np.ndarray] = None
        self._episode_open = False
        self._episode_return = 0.0

    def reset(self, **kwargs: Any) -> Tuple[np.ndarray, Dict[str, Any]]:
        self.close_episode()
        observation, info = self.env.reset(**kwargs)
        self._observation = np.array(observation, dtype=np.float32)
        return observation, info

    def step(self, action: np.ndarray) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        data = self.env.unwrapped.data
        qpos, qvel = data.qpos.copy(), data.qvel.copy()
        observation, reward, terminated, truncated, info = self.env.step(action)
        if self.recording:
            self.append(observations=self._observation, actions=action, rewards=reward, next_observations=observation,
                        terminals=terminated, timeouts=truncated and not terminated, qpos=qpos, qvel=qvel)
            self._episode_open = not (terminated or truncated)
        self._episode_return += float(reward)
        if terminated or truncated:
            self.episode_returns.append(self._episode_return)
            self._episode_return = 0.0
        self._observation = np.array(observation, dtype=np.float32)
        return observation, reward, terminated, truncated, info

    def append(self, **row: Any) -> None:
        if not self.columns:
            self.columns = {key: np.zeros((4096, *np.shape(row[key])), self.DTYPES.get(key, np.float32))
                            for key in COLUMNS}
        if self.size == len(self.columns["rewards"]):
            self.columns = {key: np.concatenate([column, np.zeros_like(column)])
                            for key, column in self.columns.items()}
        for key in COLUMNS:
            self.columns[key][self.size] = row[key]
        self.size += 1

    def close_episode(self) -> None:
        """Marks an unfinished episode's last recorded step as cut (a timeout)."""
        if self._episode_open and self.size:
            self.columns["timeouts"][self.size - 1] = True
        self._episode_open, self._episode_return = False, 0.0

    def arrays(self) -> Dict[str, np.ndarray]:
        return {key: column[:self.size].copy() for key, column in self.columns.items()}

    def load_arrays(self, arrays: Dict[str, np.ndarray]) -> None:
        self.size = len(arrays["rewards"]) if arrays else 0
        self.columns = {key: arrays[key].copy() for key in COLUMNS} if self.size else {}

    def clear(self) -> None:
        self.columns, self.size = {}, 0


def concatenate(*parts: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {key: np.concatenate([part[key] for part in parts]) for key in COLUMNS}


def episode_returns(arrays: Dict[str, np.ndarray]) -> np.ndarray:
    """Return of every episode in the rows (an episode ends at a terminal, a timeout or the last row)."""
    ends = np.nonzero(arrays["terminals"] | arrays["timeouts"])[0]
    if len(ends) == 0 or ends[-1] != len(arrays["rewards"]) - 1:
        ends = np.append(ends, len(arrays["rewards"]) - 1)
    sums = np.cumsum(arrays["rewards"], dtype=np.float64)[ends]
    return np.diff(np.concatenate([[0.0], sums]))


def rollout(env_id: str, act: Callable[[np.ndarray], np.ndarray], steps: int, seed: int, label: str
            ) -> Dict[str, np.ndarray]:
    """`steps` rows of a policy in a fresh env (the last, unfinished episode is marked as cut)."""
    env = TransitionRecorder(gym.make(env_id))
    env.action_space.seed(seed)
    observation, _ = env.reset(seed=seed)
    with tqdm(total=steps, desc=label, unit="step", mininterval=1.0) as bar:
        for step in range(steps):
            observation, _, terminated, truncated, _ = env.step(act(observation))
            if terminated or truncated:
                observation, _ = env.reset()
                if env.episode_returns:
                    bar.set_postfix(episode_return=f"{np.mean(env.episode_returns[-10:]):.0f}", refresh=False)
            if step % 1000 == 999:
                bar.update(1000)
        bar.update(steps - bar.n)
    env.close_episode()
    env.close()
    return env.arrays()


# ---------------------------------------------------------------------------------------------
# SAC (stable-baselines3), trained in chunks that end in an evaluation and a checkpoint
# ---------------------------------------------------------------------------------------------
class ProgressCallback(BaseCallback):
    """Moves a tqdm bar over SAC's environment steps; shows the recent training return and the last evaluation."""

    def __init__(self, bar: tqdm, recorder: TransitionRecorder):
        super().__init__()
        self.bar, self.recorder, self.postfix = bar, recorder, {}

    def _on_step(self) -> bool:
        self.bar.update(1)
        if self.recorder.episode_returns and self.locals["dones"][0]:
            self.postfix["return"] = f"{np.mean(self.recorder.episode_returns[-10:]):.0f}"
            self.bar.set_postfix(self.postfix, refresh=False)
        return True


class SacTrainer:
    """One SAC run for the medium and expert stages, checkpointed after every chunk."""

    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args, self.folder = args, folder
        self.checkpoint_path = folder / "sac" / "checkpoint.pt"
        self.recorder = TransitionRecorder(gym.make(args.env))
        self.venv = DummyVecEnv([lambda: Monitor(self.recorder)])
        self.progress: Dict[str, Any] = {"stage": "medium", "chunk": 0, "evaluations": [], "seconds": {},
                                         "medium_steps": None, "medium_return": None, "best_expert": None}
        if self.checkpoint_path.is_file():
            try:
                checkpoint = torch.load(self.checkpoint_path, weights_only=False)
            except Exception as error:
                raise CollectError(f"cannot read the SAC checkpoint {self.checkpoint_path} ({error}); delete it "
                                   "to start the SAC again") from None
            self.model = SAC.load(io.BytesIO(checkpoint["model"]), env=self.venv, device="cpu")
            self.model.load_replay_buffer(io.BytesIO(checkpoint["replay_buffer"]))
            self.progress = checkpoint["progress"]
            if checkpoint["recorded"] is not None:
                self.recorder.load_arrays(checkpoint["recorded"])
            self.recorder.episode_returns = list(checkpoint["episode_returns"])
            # SAC.load re-seeds everything: put back the streams as they were when the checkpoint was saved.
            torch.set_rng_state(checkpoint["rng"]["torch"])
            np.random.set_state(checkpoint["rng"]["numpy"])
            random.setstate(checkpoint["rng"]["python"])
            self.model.action_space.np_random.bit_generator.state = checkpoint["rng"]["action_space"]
            print(f"resuming SAC from {self.checkpoint_path} at {self.model.num_timesteps} steps "
                  f"(stage {self.progress['stage']})", flush=True)
        else:
            self.model = SAC("MlpPolicy", self.venv, seed=args.seed, device="cpu", verbose=0,
                             batch_size=args.batch_size, learning_starts=args.learning_starts,
                             buffer_size=args.buffer_size, policy_kwargs={"net_arch": list(args.hidden)})
        self.recorder.recording = self.progress["stage"] == "medium"

    def save_checkpoint(self) -> None:
        """Model, optimisers, replay buffer, RNG states and recorded rows in one file, written atomically."""
        model_bytes, buffer_bytes = io.BytesIO(), io.BytesIO()
        self.model.save(model_bytes)
        self.model.save_replay_buffer(buffer_bytes)
        checkpoint = {
            "model": model_bytes.getvalue(), "replay_buffer": buffer_bytes.getvalue(), "progress": self.progress,
            "recorded": self.recorder.arrays() if self.recorder.recording else None,
            "episode_returns": self.recorder.episode_returns,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "action_space": self.model.action_space.np_random.bit_generator.state},  # warm-up actions
        }
        write_atomically(self.checkpoint_path, lambda path: torch.save(checkpoint, path, pickle_protocol=4))

    def evaluate(self) -> float:
        """Mean return of the stochastic policy over --eval-episodes episodes of a separate env.

        Its own RNG stream, so that evaluating does not change what the training run does.
        """
        env = gym.make(self.args.env)
        returns = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed + 7919 * (self.progress["chunk"] + 1))
            for episode in range(self.args.eval_episodes):
                observation, _ = env.reset(seed=self.args.seed + 100_000 + episode)
                done, total = False, 0.0
                while not done:
                    action = self.model.predict(observation, deterministic=False)[0]
                    observation, reward, terminated, truncated, _ = env.step(action)
                    total, done = total + float(reward), terminated or truncated
                returns.append(total)
        env.close()
        return float(np.mean(returns))

    def train(self, stage: str, stop: Callable[[float], bool], budget: int, fine_from: float = np.inf,
              target: Optional[float] = None) -> None:
        """Trains in chunks that end in an evaluation until stop(evaluation) or the step budget.

        Chunks are --eval-every steps long, or --fine-eval-every once the last evaluation reached
        `fine_from`: a SAC's return can leap past the medium target between two coarse evaluations
        (Hopper-v5: 572 to 2415 in 5k steps). Checkpoints stay on the --eval-every grid. With a `target`
        the budget is only a bound, so the bar shows the target and the best evaluation, not an ETA.
        """
        started = time.time()
        seconds = self.progress["seconds"].get(stage, 0.0)
        since = (self.progress["medium_steps"] or 0) if stage == "expert" else 0
        print(f"SAC {stage}: a checkpoint every {self.args.eval_every:,} steps; a killed collection loses the steps "
              "since the last one and the same command resumes from it", flush=True)
        until = f" until an evaluation reaches {target:.0f}" if target is not None else ""
        with tqdm(total=budget, initial=self.model.num_timesteps, desc=f"SAC {stage} {self.args.env}{until}",
                  unit="step", mininterval=1.0,
                  bar_format="{desc}: {n_fmt} steps [{elapsed}, {rate_fmt}{postfix}]" if target is not None
                  else None) as bar:
            progress = ProgressCallback(bar, self.recorder)
            if self.progress["evaluations"]:
                progress.postfix["eval"] = f"{self.progress['evaluations'][-1][1]:.0f}"
                if self.best_evaluation(since)[0]:
                    progress.postfix["best"] = f"{self.best_evaluation(since)[1]:.0f}"
            while self.model.num_timesteps < budget:
                evaluations = self.progress["evaluations"]
                every = self.args.fine_eval_every if evaluations and evaluations[-1][1] >= fine_from else \
                    self.args.eval_every
                chunk = min(every - self.model.num_timesteps % every, budget - self.model.num_timesteps)
                # Every chunk starts a fresh, seeded episode: a resumed run does exactly what an uninterrupted one does.
                self.venv.seed(self.args.seed * 1_000_003 + self.progress["chunk"])
                self.model._last_obs = None
                self.model.learn(chunk, reset_num_timesteps=False, callback=progress)
                self.recorder.close_episode()
                evaluation = self.evaluate()
                self.progress["chunk"] += 1
                self.progress["evaluations"].append((self.model.num_timesteps, evaluation))
                self.progress["seconds"][stage] = seconds + time.time() - started
                progress.postfix["eval"] = f"{evaluation:.0f}"
                progress.postfix["best"] = f"{self.best_evaluation(since)[1]:.0f}"
                bar.set_postfix(progress.postfix)
                finished = stop(evaluation)
                if finished or self.model.num_timesteps >= budget:
                    return  # the caller saves what the stage made, then the checkpoint
                if self.model.num_timesteps % self.args.eval_every == 0:
                    self.save_checkpoint()

    def best_evaluation(self, since: int = 0) -> Tuple[int, float]:
        evaluations = [(step, value) for step, value in self.progress["evaluations"] if step > since]
        return max(evaluations, key=lambda item: item[1]) if evaluations else (0, -np.inf)


# ---------------------------------------------------------------------------------------------
# Writing: D4RL-layout HDF5 and Minari, each atomically
# ---------------------------------------------------------------------------------------------
def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    write(partial)
    os.replace(partial, path)


def save_policy(model: Any, path: Path) -> None:
    buffer = io.BytesIO()
    model.save(buffer)
    write_atomically(path, lambda partial: partial.write_bytes(buffer.getvalue()))


def write_hdf5(path: Path, arrays: Dict[str, np.ndarray], attrs: Dict[str, Any]) -> None:
    """gzip with the byte shuffle: small enough to commit beside a result, read back unchanged by h5py."""
    def write(partial: Path) -> None:
        with h5py.File(partial, "w") as file:
            for key, name in (*((key, key) for key in COLUMNS[:6]), ("qpos", "infos/qpos"), ("qvel", "infos/qvel")):
                file.create_dataset(name, data=arrays[key], compression="gzip", compression_opts=4, shuffle=True)
            for key, value in attrs.items():
                if value is not None:
                    file.attrs[key] = value

    write_atomically(path, write)


def copy_datasets(folder: Path, kinds: List[str], destination: Path) -> None:
    """Compressed copies of a collection's datasets (and its collect.json) under destination/collected/, the layout
    that `collected:` reads with EDIS_DATA_DIR=destination: the data a committed result was made with."""
    target = destination / "collected" / folder.name
    for kind in kinds:
        with h5py.File(folder / f"{kind}.hdf5", "r") as file:
            attrs = dict(file.attrs)
        write_hdf5(target / f"{kind}.hdf5", read_hdf5(folder / f"{kind}.hdf5"), attrs)
        print(f"copied {kind} to {target / f'{kind}.hdf5'}: sha256 {sha256_of(target / f'{kind}.hdf5')}, "
              f"{(target / f'{kind}.hdf5').stat().st_size / 2**20:.1f} MiB", flush=True)
    shutil.copy(folder / "collect.json", target / "collect.json")


def sha256_of(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def minari_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")).expanduser()


def minari_id(folder_name: str, kind: str) -> str:
    return f"edis/{folder_name}/{kind}-v0"


def write_minari(dataset_id: str, arrays: Dict[str, np.ndarray], env_id: str, refs: Optional[Tuple[float, float]],
                 description: str) -> None:
    """A Minari dataset made in a temporary root and moved into place when complete."""
    ends = np.nonzero(arrays["terminals"] | arrays["timeouts"])[0]
    starts = np.concatenate([[0], ends[:-1] + 1])
    buffers = []
    for index, (start, end) in enumerate(zip(starts, ends, strict=True)):
        rows = slice(start, end + 1)
        observations = np.concatenate([arrays["observations"][rows], arrays["next_observations"][end:end + 1]])
        buffers.append(EpisodeBuffer(
            id=index, observations=observations,
            actions=arrays["actions"][rows], rewards=arrays["rewards"][rows].astype(np.float64),
            terminations=arrays["terminals"][rows], truncations=arrays["timeouts"][rows], infos={}))
    root = minari_root()
    temporary = root / f".collect-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(temporary)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Minari asks for an author, e-mail and code link
            minari.create_dataset_from_buffers(
                dataset_id, buffers, env=env_id, algorithm_name="SAC (stable-baselines3)", description=description,
                ref_min_score=refs[0] if refs else None, ref_max_score=refs[1] if refs else None)
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    # Namespace metadata first (Minari lists namespaces by it), then the dataset folder in one rename.
    parts = dataset_id.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        metadata = Path(*parts[:depth], "namespace_metadata.json")
        (root / metadata).parent.mkdir(parents=True, exist_ok=True)
        if not (root / metadata).exists():
            shutil.copy(temporary / metadata, root / metadata)
    os.replace(temporary / dataset_id, root / dataset_id)
    shutil.rmtree(temporary, ignore_errors=True)


def package_versions() -> Dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("numpy", "torch", "gymnasium", "mujoco", "stable-baselines3", "minari", "h5py"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ---------------------------------------------------------------------------------------------
# The collection
# ---------------------------------------------------------------------------------------------
def domain_of(env_id: str) -> Optional[str]:
    for domain in D4RL_REF_SCORES:
        if env_id.lower().startswith(domain):
            return domain
    return None


def check_env(env_id: str, kinds: List[str]) -> None:
    """One-line errors for an env that does not exist, is not continuous, or has no MuJoCo state."""
    try:
        env = gym.make(env_id)
    except Exception as error:
        raise CollectError(f"unknown env '{env_id}': {str(error).strip().splitlines()[0]}") from None
    try:
        if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
            raise CollectError(f"{env_id} needs Box observation and action spaces (SAC and the D4RL layout); it has "
                               f"{env.observation_space} and {env.action_space}")
        data = getattr(env.unwrapped, "data", None)
        if data is None or not hasattr(data, "qpos") or not hasattr(env.unwrapped, "set_state"):
            raise CollectError(f"{env_id} is not a MuJoCo env: the kinds {', '.join(kinds)} store the simulator state "
                               "before each step (infos/qpos, infos/qvel), which this env cannot give")
    finally:
        env.close()


class Collection:
    """One folder: the datasets of one env and seed, the SAC that makes them, and a record of what it took."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.name = f"{args.env}-seed{args.seed}"
        self.folder = Path(args.out_dir).expanduser() / self.name
        self.record_path = self.folder / "collect.json"
        self.domain = domain_of(args.env)
        self.refs = D4RL_REF_SCORES.get(self.domain)
        settings = {key: getattr(args, key) for key in RESULT_SETTINGS}
        settings["hidden"] = list(settings["hidden"])
        if self.record_path.is_file():
            self.record = json.loads(self.record_path.read_text())
            stored = self.record["settings"]
            changed = [f"{key} {stored.get(key)} -> {value}" for key, value in settings.items()
                       if stored.get(key) is not None and stored.get(key) != value]
            stored.update({key: value for key, value in settings.items() if stored.get(key) is None})
            if changed:
                raise CollectError(f"{self.folder} was collected with other settings ({'; '.join(changed)}): use the "
                                   "same options, another --out-dir, or delete the folder")
        else:
            self.record = {"settings": settings, "datasets": {}, "sac": {}}
        self.trainer: Optional[SacTrainer] = None

    def save_record(self) -> None:
        write_atomically(self.record_path, lambda path: path.write_text(json.dumps(self.record, indent=2) + "\n"))

    def hdf5_path(self, kind: str) -> Path:
        return self.folder / f"{kind}.hdf5"

    def exists(self, kind: str) -> bool:
        return self.hdf5_path(kind).is_file() and (minari_root() / minari_id(self.name, kind)).is_dir()

    def normalized(self, value: float) -> Optional[float]:
        return None if self.refs is None else 100.0 * (value - self.refs[0]) / (self.refs[1] - self.refs[0])

    def write(self, kind: str, arrays: Dict[str, np.ndarray], policy_return: Optional[float], seconds: float,
              extra: Optional[Dict[str, Any]] = None) -> None:
        returns = episode_returns(arrays)
        attrs = {"env_id": self.args.env, "kind": kind, "seed": self.args.seed,
                 "policy_return": np.nan if policy_return is None else policy_return,
                 "dataset_mean_return": float(returns.mean()),
                 "versions": json.dumps(package_versions()), "collect_settings": json.dumps(self.record["settings"]),
                 **(extra or {})}
        if self.refs is not None:
            attrs["ref_min_score"], attrs["ref_max_score"] = self.refs
        write_hdf5(self.hdf5_path(kind), arrays, attrs)
        dataset_id = minari_id(self.name, kind)
        if not (minari_root() / dataset_id).is_dir():
            write_minari(dataset_id, arrays, self.args.env, self.refs,
                         f"{kind} data for {self.args.env} in D4RL's sense, made by benchmarks/collect.py "
                         f"(seed {self.args.seed}; policy return {attrs['policy_return']:.1f})")
        self.record["datasets"][kind] = {
            "transitions": int(len(arrays["rewards"])), "episodes": int(len(returns)),
            "dataset_mean_return": float(returns.mean()), "policy_return": policy_return,
            "normalized_policy_return": None if policy_return is None else self.normalized(policy_return),
            "normalized_dataset_return": self.normalized(float(returns.mean())), "seconds": seconds,
            "hdf5": str(self.hdf5_path(kind)), "minari": dataset_id, **(extra or {})}
        self.save_record()
        print(f"wrote {kind}: {len(arrays['rewards'])} transitions, {len(returns)} episodes, mean return "
              f"{returns.mean():.1f} -> {self.hdf5_path(kind)} and minari:{dataset_id}", flush=True)

    def sac(self) -> SacTrainer:
        if self.trainer is None:
            self.trainer = SacTrainer(self.args, self.folder)
        return self.trainer

    def policy_actor(self, stage: str) -> Callable[[np.ndarray], np.ndarray]:
        model = SAC.load(self.folder / "policies" / f"{stage}.zip", device="cpu")
        return lambda observation: model.predict(observation, deterministic=False)[0]

    def rollout_policy(self, kind: str, stage: str, seed_offset: int) -> Dict[str, np.ndarray]:
        torch.manual_seed(self.args.seed + seed_offset)
        return rollout(self.args.env, self.policy_actor(stage), self.args.steps, self.args.seed + seed_offset,
                       f"{kind} rollouts {self.args.env}")

    # -- the stages -------------------------------------------------------------------------------
    def make_random(self) -> None:
        started = time.time()
        env = gym.make(self.args.env)
        space = env.action_space
        space.seed(self.args.seed + 1)
        arrays = rollout(self.args.env, lambda _: space.sample(), self.args.steps, self.args.seed + 1,
                         f"random {self.args.env}")
        self.write("random", arrays, float(episode_returns(arrays).mean()), time.time() - started)

    def make_medium_policy(self) -> None:
        """Trains SAC until the target return; writes medium-replay and keeps the policy.

        Order for a kill at any point: medium-replay, then the checkpoint that says the stage is
        over, then the policy file, whose presence means all three exist.
        """
        policy_path = self.folder / "policies" / "medium.zip"
        if policy_path.is_file():
            return
        trainer = self.sac()
        if trainer.progress["stage"] == "medium":
            target = self.args.target_return
            trainer.train("medium", lambda evaluation: evaluation >= target, self.args.medium_budget, target=target,
                          fine_from=self.args.fine_eval_from * target)
            steps, reached = trainer.model.num_timesteps, trainer.progress["evaluations"][-1][1]
            if reached < target:
                best_step, best = trainer.best_evaluation()
                trainer.save_checkpoint()
                raise CollectError(f"SAC did not reach the target return {target:.1f} within --medium-budget "
                                   f"{self.args.medium_budget} steps (best evaluation {best:.1f} at {best_step} "
                                   f"steps, last {reached:.1f}); nothing was written: raise --medium-budget and run "
                                   "the same command again (it resumes), or lower --target-return")
            trainer.progress.update(stage="expert", medium_steps=steps, medium_return=reached)
            seconds = trainer.progress["seconds"]["medium"]
            self.record["sac"]["medium"] = {"steps": steps, "evaluation_return": reached, "seconds": seconds,
                                            "normalized": self.normalized(reached)}
            recorded = trainer.recorder.arrays()
            trainer.recorder.recording = False
            trainer.recorder.clear()
            self.write("medium-replay", recorded, reached, seconds, {"sac_steps": steps})
            trainer.save_checkpoint()
        if trainer.model.num_timesteps != trainer.progress["medium_steps"]:
            raise CollectError(f"{policy_path} is missing but SAC has trained past the medium stage: delete "
                               f"{self.folder} to collect again")
        save_policy(trainer.model, policy_path)

    def make_expert_policy(self) -> None:
        if (self.folder / "policies" / "expert.zip").is_file():
            return
        self.make_medium_policy()
        trainer = self.sac()
        medium_steps = trainer.progress["medium_steps"]
        if self.args.expert_steps <= medium_steps:
            raise CollectError(f"--expert-steps {self.args.expert_steps} must exceed the {medium_steps} steps that "
                               "the medium policy took")

        def keep_best(evaluation: float) -> bool:
            best = trainer.progress["best_expert"]
            if best is None or evaluation > best[1]:
                save_policy(trainer.model, self.folder / "policies" / "expert-best.zip")
                trainer.progress["best_expert"] = (trainer.model.num_timesteps, evaluation)
            return False

        trainer.train("expert", keep_best, self.args.expert_steps)
        steps, value = trainer.progress["best_expert"]
        self.record["sac"]["expert"] = {"steps_trained": trainer.model.num_timesteps, "best_steps": steps,
                                        "evaluation_return": value, "normalized": self.normalized(value),
                                        "seconds": trainer.progress["seconds"]["expert"]}
        os.replace(self.folder / "policies" / "expert-best.zip", self.folder / "policies" / "expert.zip")
        trainer.save_checkpoint()
        self.save_record()

    def make_kind(self, kind: str) -> None:
        if self.exists(kind):
            print(f"{kind}: {self.hdf5_path(kind)} exists, skipped", flush=True)
            return
        if kind == "random":
            self.make_random()
        elif kind == "medium-replay":
            self.make_medium_policy()
            if not self.exists("medium-replay"):
                raise CollectError(f"the medium policy exists but medium-replay was deleted: delete {self.folder} "
                                   "to collect again")
        elif kind in ("medium", "expert"):
            (self.make_medium_policy if kind == "medium" else self.make_expert_policy)()
            started = time.time()
            arrays = self.rollout_policy(kind, kind, 2 if kind == "medium" else 3)
            sac = self.record["sac"][kind]
            self.write(kind, arrays, sac["evaluation_return"], time.time() - started,
                       {"sac_steps": sac.get("steps", sac.get("best_steps"))})
        elif kind == "medium-expert":
            for part in ("medium", "expert"):
                self.make_kind(part)
            started = time.time()
            parts = [read_hdf5(self.hdf5_path(part)) for part in ("medium", "expert")]
            self.write("medium-expert", concatenate(*parts), None, time.time() - started)

    def make(self, kinds: List[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.save_record()
        for kind in kinds:
            self.make_kind(kind)
        self.print_summary(kinds)

    def print_summary(self, kinds: List[str]) -> None:
        print("\n| dataset | transitions | episodes | data mean return | SAC policy return | normalised (policy) "
              "| minutes |\n|---|---|---|---|---|---|---|")
        for kind in kinds:
            entry = self.record["datasets"].get(kind)
            if entry is None:
                continue
            policy = entry["policy_return"]
            norm = entry["normalized_policy_return"]
            minutes = entry["seconds"] / 60
            print(f"| {self.args.env} {kind} | {entry['transitions']} | {entry['episodes']} | "
                  f"{entry['dataset_mean_return']:.1f} | {'-' if policy is None else f'{policy:.1f}'} | "
                  f"{'-' if norm is None else f'{norm:.1f}'} | {minutes:.1f} |")
        for stage, entry in self.record["sac"].items():
            print(f"SAC {stage}: evaluation return {entry['evaluation_return']:.1f} after "
                  f"{entry.get('steps', entry.get('best_steps'))} steps, {entry['seconds'] / 60:.1f} min of training")
        print(f"record: {self.record_path}")


def read_hdf5(path: Path) -> Dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        arrays = {key: file[key][()] for key in ("observations", "actions", "rewards", "next_observations",
                                                 "terminals", "timeouts")}
        arrays["qpos"], arrays["qvel"] = file["infos/qpos"][()], file["infos/qvel"][()]
    return arrays


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--env", required=True, help="Gymnasium MuJoCo env id, e.g. Hopper-v5")
    parser.add_argument("--kinds", nargs="+", default=["random", "medium", "medium-replay"],
                        help=f"datasets to make: {' '.join(KINDS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of SAC, the rollouts and the envs")
    parser.add_argument("--steps", type=int, default=200_000, help="rows of each rollout dataset (D4RL: 1M)")
    parser.add_argument("--target-return", type=float, default=None,
                        help="evaluation return that ends the medium stage (None: D4RL's expert return / 3)")
    parser.add_argument("--medium-budget", type=int, default=1_000_000,
                        help="most SAC environment steps allowed to reach the target")
    parser.add_argument("--expert-steps", type=int, default=1_000_000,
                        help="SAC environment steps in all for the expert (counted from the start)")
    parser.add_argument("--eval-every", type=int, default=5_000,
                        help="SAC steps between evaluations and checkpoints")
    parser.add_argument("--fine-eval-every", type=int, default=1_000,
                        help="SAC steps between evaluations once one has reached --fine-eval-from x the target")
    parser.add_argument("--fine-eval-from", type=float, default=0.5,
                        help="share of the target return from which the medium stage evaluates every --fine-eval-every")
    parser.add_argument("--eval-episodes", type=int, default=10, help="stochastic episodes per evaluation")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256], help="SAC hidden layer widths")
    parser.add_argument("--batch-size", type=int, default=256, help="SAC batch size")
    parser.add_argument("--learning-starts", type=int, default=10_000,
                        help="random steps before SAC updates (RL Zoo's MuJoCo setting)")
    parser.add_argument("--buffer-size", type=int, default=1_000_000, help="SAC replay capacity")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one per collection keeps it "
                        "deterministic and lets several run side by side)")
    parser.add_argument("--out-dir", default=None,
                        help="where collections go (default: $EDIS_DATA_DIR/collected, EDIS_DATA_DIR defaulting "
                             "to ~/.cache/edis-datasets; `collected:` reads only there, use hdf5:<path> otherwise)")
    parser.add_argument("--copy-to", default=None,
                        help="then write compressed copies of these datasets to COPY_TO/collected/<EnvId>-seed<S>/ "
                             "and print their sha256 (to commit the data behind a result)")
    args = parser.parse_args(argv)
    unknown = [kind for kind in args.kinds if kind not in KINDS]
    if unknown:
        raise CollectError(f"unknown kind(s) {', '.join(unknown)}: choose from {', '.join(KINDS)}")
    for name in ("steps", "medium_budget", "expert_steps", "eval_every", "fine_eval_every", "eval_episodes",
                 "batch_size", "threads", "buffer_size"):
        if getattr(args, name) < 1:
            raise CollectError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_every % args.fine_eval_every:
        raise CollectError(f"--eval-every {args.eval_every} must be a multiple of --fine-eval-every "
                           f"{args.fine_eval_every} (checkpoints stay on the --eval-every grid)")
    if args.learning_starts < 0 or any(width < 1 for width in args.hidden):
        raise CollectError("--learning-starts must be >= 0 and --hidden widths >= 1")
    if args.out_dir is None:
        root = Path(os.environ.get("EDIS_DATA_DIR", Path.home() / ".cache" / "edis-datasets")).expanduser()
        args.out_dir = str(root / "collected")
    check_env(args.env, args.kinds)
    needs_sac = set(args.kinds) - {"random"}
    if args.target_return is None:
        domain = domain_of(args.env)
        if domain is None and needs_sac:
            raise CollectError(f"{args.env} has no D4RL reference returns: give --target-return (the evaluation "
                               "return that makes a policy 'medium')")
        args.target_return = D4RL_REF_SCORES[domain][1] / 3 if domain else None
    return args


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse_args(argv)
        torch.set_num_threads(args.threads)
        started = time.time()
        collection = Collection(args)
        collection.make(args.kinds)
        if args.copy_to:
            copy_datasets(collection.folder, args.kinds, Path(args.copy_to))
        print(f"done in {(time.time() - started) / 60:.1f} min", flush=True)
        return 0
    except CollectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the same command resumes from the last SAC checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
