"""Every EDIS config holds the public EDIS code's settings for its task and algorithm.

The table below is read from github.com/liuxhym/EDIS (configs/iql_edis/*/*.gin,
configs/cal_ql_edis/*/*.gin and the TrainConfig defaults of algorithms/iql_edis.py and
algorithms/cal_ql_edis.py). Each config is read the way its script reads it, so a value that
drifts in a file, or a section that leaks into the other algorithm, fails here.

Guidance scales are not in the table: the reference adds `scale * grad E` to the ODE derivative
while our sampler shifts the denoised estimate by `-sigma^2 * scale * grad E`, so its numbers do
not carry over (docs/edis.md, "Guidance scales").
"""

import math
from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import ROOT

# IQL-EDIS: (offline_mixing_ratio = our edis.mix_ratio, iql_tau, utd_ratio, denoiser steps per refresh).
IQL_EDIS_TASKS = {
    "hopper-random": (0.8, 0.5, 2, 30_000),
    "hopper-medium": (0.2, 0.7, 20, 30_000),
    "hopper-medium-replay": (0.2, 0.7, 20, 30_000),
    "hopper-medium-expert": (0.1, 0.7, 10, 30_000),
    "halfcheetah-random": (0.2, 0.9, 20, 30_000),
    "halfcheetah-medium": (0.5, 0.9, 20, 50_000),
    "halfcheetah-medium-replay": (0.8, 0.7, 10, 50_000),
    "halfcheetah-medium-expert": (0.7, 0.6, 10, 30_000),
    "walker2d-random": (0.5, 0.7, 5, 30_000),
    "walker2d-medium": (0.2, 0.7, 15, 30_000),
    "walker2d-medium-replay": (0.8, 0.7, 10, 50_000),
    "walker2d-medium-expert": (0.5, 0.7, 20, 30_000),
    "antmaze-umaze": (0.2, 0.9, 20, 50_000),
    "antmaze-umaze-diverse": (0.9, 0.7, 1, 50_000),
    "antmaze-medium-play": (0.2, 0.9, 20, 50_000),
    "antmaze-medium-diverse": (0.2, 0.9, 20, 50_000),
    "antmaze-large-play": (0.1, 0.9, 20, 30_000),
    "antmaze-large-diverse": (0.1, 0.9, 20, 30_000),
    "pen-human": (0.2, 0.8, 20, 30_000),
    "door-human": (0.2, 0.8, 20, 30_000),
    "relocate-human": (0.2, 0.8, 20, 30_000),
}
# Not in the reference: the three Adroit human tasks share one setting, used for hammer and cloned data too.
for _task in ("pen-cloned", "door-cloned", "relocate-cloned", "hammer-human", "hammer-cloned"):
    IQL_EDIS_TASKS[_task] = IQL_EDIS_TASKS["pen-human"]

# Cal-QL-EDIS: (mix, cql_alpha offline, cql_alpha online, normalize, normalize_reward, critic layers) + extras.
ANTMAZE_CALQL = {"reward_scale": 1.0, "reward_bias": -1.0, "is_sparse_reward": True, "cql_clip_diff_min": -200.0,
                 "cql_target_action_gap": 0.8, "cql_max_target_backup": True}
ADROIT_CALQL = {"cql_clip_diff_min": -200.0, "cql_target_action_gap": 0.8, "cql_max_target_backup": True}
CALQL_EDIS_TASKS = {
    "hopper-random": (0.2, 10.0, 1.0, True, False, 2, {"is_sparse_reward": False}),
    "hopper-medium": (0.2, 10.0, 0.1, True, True, 2, {}),
    "hopper-medium-replay": (0.5, 10.0, 10.0, True, True, 2, {}),
    "hopper-medium-expert": (0.5, 10.0, 10.0, True, True, 2, {}),
    "halfcheetah-random": (0.2, 10.0, 10.0, True, True, 2, {}),
    "halfcheetah-medium": (0.2, 10.0, 10.0, True, True, 2, {}),
    "halfcheetah-medium-replay": (0.2, 10.0, 10.0, True, True, 2, {}),
    "halfcheetah-medium-expert": (0.5, 10.0, 10.0, True, True, 2, {}),
    "walker2d-random": (0.1, 10.0, 0.0, True, True, 2, {}),
    "walker2d-medium": (0.2, 10.0, 0.0, True, True, 2, {}),
    "walker2d-medium-replay": (0.2, 10.0, 10.0, True, True, 2, {}),
    "walker2d-medium-expert": (0.2, 10.0, 10.0, True, True, 2, {}),
    "antmaze-umaze": (0.5, 5.0, 5.0, True, True, 5, ANTMAZE_CALQL),
    "antmaze-umaze-diverse": (0.5, 5.0, 5.0, True, True, 5, ANTMAZE_CALQL),
    "antmaze-medium-play": (0.3, 5.0, 5.0, True, True, 5, ANTMAZE_CALQL),
    "antmaze-medium-diverse": (0.3, 5.0, 5.0, True, True, 5, ANTMAZE_CALQL),
    "antmaze-large-play": (0.5, 5.0, 5.0, True, True, 5, ANTMAZE_CALQL),
    "antmaze-large-diverse": (0.5, 5.0, 5.0, True, True, 5, ANTMAZE_CALQL),
    "pen-human": (0.3, 5.0, 5.0, False, False, 3, ADROIT_CALQL),
    "door-human": (0.5, 1.0, 1.0, False, False, 3, ADROIT_CALQL),
    "relocate-human": (0.2, 1.0, 2.5, False, False, 3, {**ADROIT_CALQL, "cql_lagrange": False}),
}
# Not in the reference: cloned data take their task's human setting; hammer takes door's.
for _task, _source in (("pen-cloned", "pen-human"), ("door-cloned", "door-human"),
                       ("relocate-cloned", "relocate-human"), ("hammer-human", "door-human"),
                       ("hammer-cloned", "door-human")):
    CALQL_EDIS_TASKS[_task] = CALQL_EDIS_TASKS[_source]

# The scripts' defaults where a task's file is silent.
IQL_EDIS_COMMON = {"beta": 10.0, "normalize": True, "actor_dropout": 0.0, "n_episodes": 100,
                   "offline_iterations": 1_000_000, "online_iterations": 200_000, "offline_eval_freq": 50_000,
                   "eval_freq": 5_000}
CALQL_EDIS_COMMON = {"cql_lagrange": True, "cql_target_action_gap": 10.0, "backup_entropy": True,
                     "cql_max_target_backup": False, "cql_clip_diff_min": -math.inf, "cql_clip_diff_max": math.inf,
                     "is_sparse_reward": True, "reward_scale": 1.0, "reward_bias": 0.0, "policy_lr": 1e-4,
                     "qf_lr": 3e-4, "orthogonal_init": True, "cql_n_actions": 10, "cql_importance_sample": True,
                     "offline_iterations": 300_000, "online_iterations": 200_000, "offline_eval_freq": 10_000,
                     "eval_freq": 10_000, "n_episodes": 10}
# The CPU profile (configs/cpu/) keeps each task's algorithm settings at its own budget and EDIS sizes.
BUDGET_KEYS = ("offline_iterations", "online_iterations", "offline_eval_freq", "eval_freq", "n_episodes")


def task_of(path: Path) -> str:
    domain, name = path.parent.name, path.stem
    if domain == "antmaze":
        return f"antmaze-{name}"
    return name


def iql_edis_expected(task: str, full_scale: bool) -> Dict[str, Any]:
    mix, iql_tau, utd_ratio, fit_steps = IQL_EDIS_TASKS[task]
    antmaze = task.startswith("antmaze")
    expected = {**IQL_EDIS_COMMON, "iql_tau": iql_tau, "normalize_reward": antmaze,
                "reward_bias": -1.0 if antmaze else 0.0,  # the reference's AntMaze reward: r - 1
                "edis.mix_ratio": mix, "edis.utd_ratio": utd_ratio, "edis.replay": "paper"}
    if full_scale:
        expected.update({"edis.retrain_from_scratch": True, "edis.initial_fit_steps": fit_steps,
                         "edis.refresh_fit_steps": fit_steps})
    return expected


def calql_edis_expected(task: str, full_scale: bool) -> Dict[str, Any]:
    mix, alpha, alpha_online, normalize, normalize_reward, layers, extra = CALQL_EDIS_TASKS[task]
    expected = {**CALQL_EDIS_COMMON, "cql_alpha": alpha, "cql_alpha_online": alpha_online, "normalize": normalize,
                "normalize_reward": normalize_reward, "q_n_hidden_layers": layers, **extra, "edis.mix_ratio": mix}
    if full_scale:
        expected.update({"edis.retrain_from_scratch": True, "edis.initial_fit_steps": 10_000,
                         "edis.refresh_fit_steps": 10_000})
    return expected


def read(module: Any, path: Path) -> Any:
    config = module.parse_config(module.TrainConfig, module.CONFIG_SECTIONS, ["--config", str(path)])
    module.validate_config(config)
    return config


def value_of(config: Any, key: str) -> Any:
    owner, _, name = key.rpartition(".")
    return getattr(config.edis if owner else config, name)


def check(config: Any, expected: Dict[str, Any], full_scale: bool, path: Path) -> None:
    wrong = {key: (value_of(config, key), value) for key, value in expected.items()
             if (full_scale or key not in BUDGET_KEYS) and value_of(config, key) != value}
    assert not wrong, f"{path.relative_to(ROOT)}: (config, reference) {wrong}"


FULL_SCALE = sorted(p for domain in ("mujoco", "antmaze", "adroit") for p in (ROOT / "configs" / domain).glob("*.yaml"))
CPU = sorted((ROOT / "configs" / "cpu").glob("*.yaml"))


def test_the_table_covers_every_full_scale_config():
    assert len(FULL_SCALE) == 26 and {task_of(p) for p in FULL_SCALE} == set(IQL_EDIS_TASKS) == set(CALQL_EDIS_TASKS)


@pytest.mark.parametrize("path", FULL_SCALE + CPU, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_edis_configs_hold_the_reference_settings(path, iql_edis, calql_edis):
    full_scale = path.parent.name != "cpu"
    task = task_of(path)
    check(read(iql_edis, path), iql_edis_expected(task, full_scale), full_scale, path)
    check(read(calql_edis, path), calql_edis_expected(task, full_scale), full_scale, path)


def test_base_calql_antmaze_critics_have_five_layers(calql):
    for path in sorted((ROOT / "configs" / "antmaze").glob("*.yaml")):
        assert read(calql, path).q_n_hidden_layers == 5, path.name
