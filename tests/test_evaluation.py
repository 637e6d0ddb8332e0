"""Evaluation in a vector env: exactly n_episodes episodes, the same ones a sequential loop would run."""

from typing import Any, Dict, List, Optional, Tuple

import gymnasium as gym
import numpy as np
import pytest


class CountingEnv(gym.Env):
    """Reward 1 per step; each episode's length is drawn at reset from the env's seeded RNG.
    Episodes of even length report success at their second step (not at their last)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> Tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.length, self.t = int(self.np_random.integers(3, 30)), 0
        return np.array([self.length, 0.0]), {}

    def step(self, action: np.ndarray) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        self.t += 1
        info = {"success": self.t == 2 and self.length % 2 == 0}
        return np.array([self.length, self.t]), 1.0, self.t >= self.length, False, info


def episode_lengths(seed: int, episodes: int) -> List[int]:
    """The lengths a sequential loop sees: seeded first reset, unseeded ones after."""
    env = CountingEnv()
    lengths = [env.reset(seed=seed)[0][0]]
    lengths += [env.reset()[0][0] for _ in range(episodes - 1)]
    return [int(length) for length in lengths]


@pytest.mark.parametrize("copies, episodes", [(1, 5), (3, 7), (4, 4), (5, 12)])
def test_vector_evaluation_runs_each_copys_share_of_the_episodes(iql, copies, episodes):
    envs = gym.vector.SyncVectorEnv([CountingEnv] * copies, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    calls = []

    def act(states: np.ndarray) -> np.ndarray:
        calls.append(states.shape)
        return np.zeros((len(states), 1), dtype=np.float32)

    info = iql.DatasetInfo("test", "CountingEnv", "pen")  # a domain that reports a success rate
    metrics = iql.evaluate(envs, act, info, episodes, seed=10)
    shares = [episodes // copies + (i < episodes % copies) for i in range(copies)]
    lengths = [length for i in range(copies) for length in episode_lengths(10 + i, shares[i])]
    assert len(lengths) == episodes
    assert metrics["eval/return"] == pytest.approx(np.mean(lengths))
    assert metrics["eval/return_std"] == pytest.approx(np.std(lengths))
    assert metrics["eval/success_rate"] == pytest.approx(np.mean([length % 2 == 0 for length in lengths]))
    # One batched policy call per step of the longest copy, never one per episode per step.
    assert all(shape == (copies, 2) for shape in calls)
    assert len(calls) == max(sum(episode_lengths(10 + i, shares[i])) for i in range(copies))


def test_agents_act_on_a_batch_and_on_one_state(iql, calql):
    for module, agent_class in ((iql, "ImplicitQLearning"), (calql, "CalQL")):
        config = module.TrainConfig()
        agent = getattr(module, agent_class)(config, 3, 2, 1.0, module.resolve_device("cpu"))
        states = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
        batch = agent.act(states, explore=False)
        assert batch.shape == (5, 2)
        assert np.allclose(agent.act(states[2], explore=False), batch[2], atol=1e-6)
