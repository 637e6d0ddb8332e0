"""Short runs of each algorithm file, as a user runs them: outputs, checkpoints, resumption, determinism."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALGORITHMS, run_script, write_d4rl_file

pytestmark = pytest.mark.slow  # whole runs of each algorithm

TINY = ["--offline_iterations", "30", "--online_iterations", "30", "--offline_eval_freq", "20", "--eval_freq", "25",
        "--n_episodes", "2",
        "--log_freq", "10", "--batch_size", "32", "--wandb_mode", "disabled", "--device", "cpu"]


def read_metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_run_writes_summary_metrics_and_checkpoints(algorithm, tmp_path):
    result = run_script(algorithm, "--dataset", "random:Hopper-v5:1000", *TINY, "--log_dir", str(tmp_path / "runs"),
                        "--name", "e2e", "--checkpoints_path", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "e2e"
    assert "dataset: random:Hopper-v5:1000" in (run_dir / "config.yaml").read_text()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["score_metric"] == "eval/normalized_score"
    assert summary["env_steps"] == 30 and summary["online"]["env_steps"] == 30
    assert summary["offline"]["iterations"] == 30
    for phase in ("offline", "online"):
        assert summary[phase]["evaluations"] == 2  # offline: update 20 and 30; online: env step 25 and 30
        scores = [r["eval/normalized_score"] for r in read_metrics(run_dir)
                  if r["phase"] == phase and "eval/normalized_score" in r]
        assert summary[phase]["final_normalized_score"] == scores[-1] and np.isfinite(scores[-1])
        assert summary[phase]["best_normalized_score"] == max(scores)
        assert summary[phase]["wall_clock_s"] > 0
    assert {"torch", "gymnasium", "mujoco"} <= set(summary["versions"])
    # the run ends with its result in one line: each phase's final (best) score and where the summary is
    offline, online = summary["offline"], summary["online"]
    assert result.stdout.strip().splitlines()[-1] == (
        f"done: normalised score offline {offline['final_normalized_score']:.1f} "
        f"(best {offline['best_normalized_score']:.1f}); online {online['final_normalized_score']:.1f} "
        f"(best {online['best_normalized_score']:.1f}); summary: {run_dir / 'summary.json'}")
    # wall-clock numbers are only comparable with the threads and device they ran on
    assert summary["machine"]["torch_threads"] >= 1 and summary["machine"]["device"] == "cpu"
    # and one-thread runs repeat exactly only on the same kind of CPU: the vector instructions torch used are named
    assert summary["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    records = read_metrics(run_dir)
    assert all({"step", "phase"} <= set(record) for record in records)
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    evaluations = [r for r in records if "eval/normalized_score" in r]
    assert [(r["step"], r["phase"]) for r in evaluations] == [(20, "offline"), (30, "offline"), (55, "online"),
                                                              (60, "online")]
    losses = [r for r in records if any(key.startswith("train/") and "loss" in key for key in r)]
    assert {r["phase"] for r in losses} == {"offline", "online"}
    assert all(np.isfinite(value) for r in losses for key, value in r.items() if key.startswith("train/"))
    episodes = [r for r in records if "train/episode_return" in r]
    assert episodes and all("train/normalized_episode_return" in r and "train/regret" in r for r in episodes)

    checkpoints = sorted(p.name for p in (tmp_path / "ckpt" / "e2e").glob("*.pt"))
    assert checkpoints == ["checkpoint_20.pt", "checkpoint_30.pt", "checkpoint_55.pt", "checkpoint_60.pt"]
    saved = torch.load(tmp_path / "ckpt" / "e2e" / "checkpoint_30.pt", weights_only=False)
    assert saved["algorithm"] == algorithm and saved["phase"] == "offline" and saved["step"] == 30


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_offline_checkpoint_skips_pretraining(algorithm, tmp_path, request):
    module = request.getfixturevalue(algorithm)
    common = ["--dataset", "random:Hopper-v5:1000", *TINY, "--log_dir", str(tmp_path)]
    assert module.main([*common, "--name", "first", "--checkpoints_path", str(tmp_path / "ckpt"),
                        "--online_iterations", "0"]) == 0
    checkpoint = tmp_path / "ckpt" / "first" / "checkpoint_30.pt"
    assert module.main([*common, "--name", "second", "--load_model", str(checkpoint)]) == 0
    records = read_metrics(tmp_path / "second")
    assert records and all(r["phase"] == "online" for r in records)
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert summary["offline"]["iterations"] == 0 and summary["online"]["env_steps"] == 30
    # Loading restores every tensor of the agent (networks, targets, optimiser moments).
    saved = torch.load(checkpoint, weights_only=False)
    agent_class = module.ImplicitQLearning if algorithm == "iql" else module.CalQL
    config = module.TrainConfig(offline_iterations=30)
    agent = agent_class(config, saved["state_mean"].shape[0], 3, 1.0, torch.device("cpu"))
    agent.load_state_dict(saved["agent"])
    flat_saved, flat_loaded = flatten(saved["agent"]), flatten(agent.state_dict())
    assert flat_saved.keys() == flat_loaded.keys()
    assert all(torch.equal(flat_saved[key], flat_loaded[key]) for key in flat_saved)


def flatten(state, prefix=""):
    """Tensors of a nested state dict, keyed by their path."""
    items = {}
    for key, value in (state.items() if isinstance(state, dict) else enumerate(state)):
        if isinstance(value, torch.Tensor):
            items[f"{prefix}{key}"] = value
        elif isinstance(value, (dict, list)):
            items.update(flatten(value, f"{prefix}{key}."))
    return items


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_seed_gives_same_metrics(algorithm, tmp_path, request):
    module = request.getfixturevalue(algorithm)
    runs = []
    for name in ("a", "b", "other-seed"):
        seed = "1" if name == "other-seed" else "0"
        assert module.main(["--dataset", "random:Hopper-v5:1000", *TINY, "--log_dir", str(tmp_path), "--name", name,
                            "--seed", seed]) == 0
        runs.append(read_metrics(tmp_path / name))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_antmaze_run_reports_success_rate(iql, isolated_data, tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 400
    timeouts = np.zeros(n, bool)
    timeouts[199::200] = True
    write_d4rl_file(isolated_data / "d4rl" / "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5",
                    observations=rng.normal(size=(n, 29)).astype(np.float32),
                    actions=rng.uniform(-1, 1, (n, 8)).astype(np.float32), rewards=np.zeros(n, np.float32),
                    terminals=np.zeros(n, bool), timeouts=timeouts)
    assert iql.main(["--dataset", "d4rl:antmaze-umaze-v2", "--offline_iterations", "5", "--online_iterations", "5",
                     "--eval_freq", "5", "--n_episodes", "1", "--batch_size", "16", "--wandb_mode", "disabled",
                     "--log_dir", str(tmp_path), "--name", "ant", "--reward_bias", "-1"]) == 0
    summary = json.loads((tmp_path / "ant" / "summary.json").read_text())
    assert summary["env"] == "D4RLAntMaze-umaze"
    assert summary["offline"]["final_success_rate"] == 0.0  # a random ant does not cross the maze
    assert summary["offline"]["final_normalized_score"] == 0.0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "done: normalised score offline 0.0 (best 0.0), success 0.00 (best 0.00); online 0.0")


def test_adroit_run_reports_success_rate(calql, isolated_data, tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    write_d4rl_file(isolated_data / "d4rl" / "pen-cloned-v1.hdf5",
                    observations=rng.normal(size=(n, 45)).astype(np.float32),
                    actions=rng.uniform(-1, 1, (n, 24)).astype(np.float32),
                    rewards=rng.normal(size=n).astype(np.float32),
                    terminals=np.zeros(n, bool), timeouts=np.zeros(n, bool))
    assert calql.main(["--dataset", "d4rl:pen-cloned-v1", "--offline_iterations", "3", "--online_iterations", "3",
                       "--eval_freq", "3", "--n_episodes", "1", "--batch_size", "16", "--wandb_mode", "disabled",
                       "--log_dir", str(tmp_path), "--name", "pen"]) == 0
    summary = json.loads((tmp_path / "pen" / "summary.json").read_text())
    assert summary["env"] == "AdroitHandPen-v1"
    # the success rate (its computation is checked exactly in test_evaluation.py) reaches the records and summary
    evaluations = [r for r in read_metrics(tmp_path / "pen") if "eval/success_rate" in r]
    assert [r["phase"] for r in evaluations] == ["offline", "online"]
    assert summary["online"]["final_success_rate"] == evaluations[-1]["eval/success_rate"]
    assert summary["online"]["final_normalized_score"] == evaluations[-1]["eval/normalized_score"]


def test_run_without_reference_logs_raw_returns(iql, isolated_data, tmp_path, capsys):
    from conftest import rollout_arrays

    path = write_d4rl_file(isolated_data / "plain.hdf5", **rollout_arrays("Hopper-v5", 300),
                           attrs={"env_id": "Hopper-v5"})
    assert iql.main(["--dataset", f"hdf5:{path}", *TINY, "--log_dir", str(tmp_path), "--name", "raw"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("has no reference returns") == 1
    assert captured.out.strip().splitlines()[-1].startswith("done: return offline ")
    summary = json.loads((tmp_path / "raw" / "summary.json").read_text())
    assert summary["score_metric"] == "eval/return" and summary["online"]["final_normalized_score"] is None
    assert np.isfinite(summary["online"]["final_return"])


def test_wandb_offline_writes_locally(iql, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert iql.main(["--dataset", "random:Hopper-v5:1000", *TINY[:-4], "--wandb_mode", "offline",
                     "--log_dir", str(tmp_path), "--name", "wb"]) == 0
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
