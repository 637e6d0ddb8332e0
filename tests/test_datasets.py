"""Dataset loaders: D4RL files, local HDF5, Minari, random collection; d4rl.qlearning_dataset semantics."""

import h5py
import numpy as np
import pytest
import torch
from conftest import rollout_arrays, write_d4rl_file


def synthetic_raw(n: int = 10, obs_dim: int = 2) -> dict:
    observations = np.arange(n * obs_dim, dtype=np.float32).reshape(n, obs_dim)
    return {"observations": observations, "actions": np.ones((n, 1), np.float32),
            "rewards": np.arange(n, dtype=np.float32), "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}


def test_qlearning_pairs_rows_and_drops_timeouts(iql):
    raw = synthetic_raw()
    raw["terminals"][3] = True
    raw["timeouts"][6] = True
    data = iql.qlearning_transitions(raw, max_episode_steps=1000)
    kept = [0, 1, 2, 3, 4, 5, 7, 8]  # row 6 timed out, row 9 is the last row
    np.testing.assert_array_equal(data["observations"], raw["observations"][kept])
    np.testing.assert_array_equal(data["next_observations"], raw["observations"][np.array(kept) + 1])
    np.testing.assert_array_equal(data["rewards"], kept)
    np.testing.assert_array_equal(data["terminals"], [0, 0, 0, 1, 0, 0, 0, 0])
    # episodes end at the terminal (3), before the timeout row (5) and at the last transition (8)
    np.testing.assert_array_equal(np.nonzero(data["episode_ends"])[0], [3, 5, 7])


def test_qlearning_without_timeouts_uses_episode_length(iql):
    raw = synthetic_raw(n=10)
    del raw["timeouts"]
    data = iql.qlearning_transitions(raw, max_episode_steps=4)
    # d4rl: without timeouts every 4th step of an episode is a (skipped) final step: rows 3 and 7
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 4, 5, 6, 8])


def test_d4rl_scheme_reads_cached_file(iql, isolated_data):
    arrays = rollout_arrays("Hopper-v5", 300)
    write_d4rl_file(isolated_data / "d4rl" / "hopper_medium-v2.hdf5", **arrays)
    data, info = iql.load_dataset("d4rl:hopper-medium-v2")
    assert info.env_id == "Hopper-v5" and info.domain == "hopper"
    assert (info.ref_min_score, info.ref_max_score) == (-20.272305, 3234.3)
    expected = 299 - int(arrays["timeouts"][:299].sum())
    assert len(data["observations"]) == expected
    assert info.normalized_score(3234.3) == pytest.approx(100.0)
    assert info.normalized_score(-20.272305) == pytest.approx(0.0)


def test_stored_next_observations_keep_timed_out_rows_except_for_d4rl_names(iql, isolated_data):
    """hdf5: uses a file's next_observations (every row kept); d4rl: on the same file stays d4rl.qlearning_dataset."""
    raw = synthetic_raw(obs_dim=11)  # Hopper-v5 sized rows
    raw["terminals"][3] = True
    raw["timeouts"][6] = True
    next_observations = raw["observations"] + 0.5  # differs from the next row: shows which one is used
    for path in (isolated_data / "mine.hdf5", isolated_data / "d4rl" / "hopper_medium-v2.hdf5"):
        write_d4rl_file(path, **raw, attrs={"env_id": "Hopper-v5"})
        with h5py.File(path, "a") as file:
            file.create_dataset("next_observations", data=next_observations)
    stored, _ = iql.load_dataset(f"hdf5:{isolated_data / 'mine.hdf5'}")
    np.testing.assert_array_equal(stored["observations"], raw["observations"])
    np.testing.assert_array_equal(stored["next_observations"], next_observations)
    np.testing.assert_array_equal(np.nonzero(stored["episode_ends"])[0], [3, 6, 9])
    d4rl, _ = iql.load_dataset("d4rl:hopper-medium-v2")
    np.testing.assert_array_equal(d4rl["rewards"], [0, 1, 2, 3, 4, 5, 7, 8])
    np.testing.assert_array_equal(d4rl["next_observations"], raw["observations"][[1, 2, 3, 4, 5, 6, 8, 9]])


def test_d4rl_names_map_to_files_and_envs(iql):
    url, info = iql.d4rl_file("walker2d-medium-replay-v2")
    assert url.endswith("gym_mujoco_v2/walker2d_medium_replay-v2.hdf5") and info.env_id == "Walker2d-v5"
    url, info = iql.d4rl_file("pen-cloned-v1")
    assert url.endswith("hand_dapg_v1/pen-cloned-v1.hdf5") and info.env_id == "AdroitHandPen-v1"
    url, info = iql.d4rl_file("antmaze-large-diverse-v2")
    assert url.endswith("Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5")
    assert info.antmaze_maze == "large" and info.max_episode_steps == 1000


def test_hdf5_scheme_reads_reference_attributes(iql, isolated_data):
    arrays = rollout_arrays("Hopper-v5", 200)
    path = write_d4rl_file(isolated_data / "mine.hdf5", **arrays,
                           attrs={"env_id": "Hopper-v5", "ref_min_score": 10.0, "ref_max_score": 110.0})
    data, info = iql.load_dataset(f"hdf5:{path}")
    assert info.env_id == "Hopper-v5" and info.has_reference
    assert info.normalized_score(60.0) == pytest.approx(50.0)
    assert data["observations"].dtype == np.float32 and data["observations"].shape[1] == 11


def test_hdf5_without_reference_has_no_normalized_score(iql, isolated_data):
    arrays = rollout_arrays("Hopper-v5", 100)
    path = write_d4rl_file(isolated_data / "plain.hdf5", **arrays, attrs={"env_id": "Hopper-v5"})
    _, info = iql.load_dataset(f"hdf5:{path}")
    assert not info.has_reference


def test_random_scheme_collects_once_in_d4rl_layout(iql, isolated_data):
    data, info = iql.load_dataset("random:Hopper-v5:500")
    path = isolated_data / "random" / "random-Hopper-v5-500.hdf5"
    assert path.is_file()
    with h5py.File(path) as file:
        assert {"observations", "actions", "rewards", "terminals", "timeouts"} <= set(file)
        assert len(file["observations"]) == 500
        terminals = file["terminals"][()]
    assert terminals.any(), "a random Hopper falls within 500 steps"
    assert info.has_reference  # D4RL's hopper constants apply to Hopper-v5
    modified = path.stat().st_mtime_ns
    again, _ = iql.load_dataset("random:Hopper-v5:500")
    assert path.stat().st_mtime_ns == modified
    np.testing.assert_array_equal(again["observations"], data["observations"])


def make_minari_dataset(dataset_id: str, env_id: str, episodes: int, length: int, seed: int = 0):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make(env_id)
    buffers = []
    rng = np.random.default_rng(seed)
    for episode in range(episodes):
        observations = rng.normal(size=(length + 1, env.observation_space.shape[0]))
        terminations = np.zeros(length, bool)
        terminations[-1] = episode % 2 == 0
        buffers.append(EpisodeBuffer(id=episode, observations=observations,
                                     actions=rng.uniform(-1, 1, (length, env.action_space.shape[0])),
                                     rewards=rng.normal(size=length), terminations=terminations,
                                     truncations=~terminations, infos={}))
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, ref_min_score=0.0, ref_max_score=100.0,
                                       algorithm_name="random", description="test data")
    return buffers


def test_minari_scheme_loads_local_dataset(iql):
    buffers = make_minari_dataset("test/hopper/noise-v0", "Hopper-v5", episodes=3, length=7)
    data, info = iql.load_dataset("minari:test/hopper/noise-v0")
    assert len(data["observations"]) == 21
    np.testing.assert_allclose(data["next_observations"][:7], buffers[0].observations[1:], rtol=1e-6)
    np.testing.assert_array_equal(data["terminals"][[6, 13, 20]], [1, 0, 1])
    np.testing.assert_array_equal(np.nonzero(data["episode_ends"])[0], [6, 13, 20])
    assert info.env_id.startswith("Hopper") and (info.ref_min_score, info.ref_max_score) == (0.0, 100.0)
    assert info.domain == "hopper"


def test_reward_transform_normalizes_locomotion_returns(iql):
    rewards = np.array([1, 1, 1, 5, 5, 5], np.float32)
    ends = np.array([0, 0, 1, 0, 0, 1], bool)
    data = {"rewards": rewards, "episode_ends": ends}
    info = iql.DatasetInfo("x", "Hopper-v5", "hopper")
    scale, bias = iql.reward_transform(data, info, True, 1.0, 0.0, max_episode_steps=1000)
    assert scale == pytest.approx(1000 / 12) and bias == 0.0  # returns 3 and 15
    info.domain = "antmaze"
    assert iql.reward_transform(data, info, True, 10.0, -5.0, 1000) == (10.0, -5.0)


def test_state_statistics(iql):
    observations = np.array([[0.0, 1.0], [2.0, 1.0]], np.float32)
    mean, std = iql.state_statistics(observations, normalize=True)
    np.testing.assert_allclose(mean, [1.0, 1.0])
    np.testing.assert_allclose(std, [1.001, 0.001], rtol=1e-5)
    mean, std = iql.state_statistics(observations, normalize=False)
    np.testing.assert_array_equal(std, [1.0, 1.0])


def test_d4rl_antmaze_env_has_d4rl_layout(iql):
    _, info = iql.d4rl_file("antmaze-umaze-v2")
    env = iql.make_env(info, seed=0)
    observation, _ = env.reset(seed=0)
    assert observation.shape == (29,)
    np.testing.assert_allclose(observation[:2], 0.0, atol=1e-6)  # D4RL starts the ant at the origin
    assert 0.0 <= env.goal[0] <= 2.0 and 8.0 <= env.goal[1] <= 10.0  # D4RL's umaze goal cell, one-sided noise
    base = env.unwrapped
    for xy, wall in (((0.0, 4.0), True), ((8.0, 4.0), False), ((0.0, 8.0), False)):
        row, col = base.maze.cell_xy_to_rowcol(np.array(xy) + env.origin)
        assert (base.maze.maze_map[row][col] == 1) == wall
    qpos, qvel = base.ant_env.data.qpos.copy(), base.ant_env.data.qvel.copy()
    qpos[:2] = env.goal + env.origin
    base.ant_env.set_state(qpos, qvel)
    observation, reward, terminated, _, step_info = env.step(np.zeros(8))
    assert reward == 1.0 and step_info["success"] and not terminated


def test_returns_to_go(calql):
    rewards = np.array([1.0, 1.0, 1.0, 2.0, 2.0], np.float32)
    terminals = np.array([0, 0, 1, 0, 0], np.float32)
    ends = np.array([0, 0, 1, 0, 1], bool)
    returns = calql.returns_to_go(rewards, terminals, ends, discount=0.5)
    np.testing.assert_allclose(returns, [1.75, 1.5, 1.0, 3.0, 2.0])
    sparse = calql.returns_to_go(np.array([-5.0, -5.0, -5.0, 5.0], np.float32), np.zeros(4, np.float32),
                                 np.array([0, 1, 0, 1], bool), discount=0.5, sparse_failure_reward=-5.0)
    np.testing.assert_allclose(sparse[:2], [-10.0, -10.0])  # ended in failure: r / (1 - discount)
    np.testing.assert_allclose(sparse[2:], [-2.5, 5.0])  # ended at the goal: discounted sum
    # Reached the goal, then left it: not a failure (CORL: every reward must be the failure reward).
    left_goal = calql.returns_to_go(np.array([-5.0, 5.0, -5.0], np.float32), np.zeros(3, np.float32),
                                    np.array([0, 0, 1], bool), discount=0.5, sparse_failure_reward=-5.0)
    np.testing.assert_allclose(left_goal, [-5.0 + 0.5 * 2.5, 2.5, -5.0])


def test_replay_buffer_wraps_in_order_and_samples_only_filled_rows(iql):
    buffer = iql.ReplayBuffer(4, {"x": 2}, torch.device("cpu"))
    buffer.add_batch(x=np.arange(6, dtype=np.float32).reshape(3, 2))  # rows 0, 1, 2
    assert len(buffer) == 3 and buffer.sample(200)["x"][:, 0].unique().tolist() == [0.0, 2.0, 4.0]
    buffer.add_batch(x=np.array([[6, 7], [8, 9]], np.float32))  # rows 3 and 4: 4 overwrites the oldest, 0
    assert len(buffer) == 4 and buffer.pointer == 1
    assert buffer.data["x"][:, 0].tolist() == [8.0, 2.0, 4.0, 6.0]
    assert set(buffer.sample(400)["x"][:, 0].tolist()) == {2.0, 4.0, 6.0, 8.0}


def test_recent_rows_are_the_last_added_oldest_first_across_the_wrap(iql_edis):
    buffer = iql_edis.ReplayBuffer(5, {"x": 1}, torch.device("cpu"))
    buffer.add_batch(x=np.arange(3, dtype=np.float32)[:, None])
    assert iql_edis.recent_rows(buffer, 10)["x"][:, 0].tolist() == [0.0, 1.0, 2.0]  # fewer rows than asked
    buffer.add_batch(x=np.arange(3, 7, dtype=np.float32)[:, None])  # 3..6: 5 and 6 wrap over 0 and 1
    assert iql_edis.recent_rows(buffer, 4)["x"][:, 0].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert iql_edis.recent_rows(buffer, 5)["x"][:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]


DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_replay_buffer_keeps_rows_and_batches_on_its_device(iql_edis, device):
    """Rows in, batches out, recent rows: all on the buffer's device. "meta" runs on any machine: a tensor made on
    the CPU anywhere on the way (an index, a copy) would fail to mix with the meta rows, as it would cost a
    host-device copy per batch on a GPU."""
    buffer = iql_edis.ReplayBuffer(8, {"x": 3}, torch.device(device))
    buffer.add_batch(x=np.ones((5, 3), np.float32))  # numpy in, device tensors stored
    buffer.add(x=np.ones(3, np.float32))
    assert len(buffer) == 6
    for tensor in (buffer.data["x"], buffer.sample(4)["x"], iql_edis.recent_rows(buffer, 2)["x"]):
        assert tensor.device.type == device and tensor.dtype == torch.float32
