"""Cal-QL, offline pretraining then online fine-tuning, in one file.

Calibrated Q-Learning (Nakamoto et al. 2023, arXiv 2303.05479) as CORL's
`algorithms/finetune/cal_ql.py` runs it: SAC with the CQL regulariser, where the Q-values of
policy actions inside the regulariser are bounded below by the Monte-Carlo return-to-go of the
data (the calibration). Online, a batch mixes the offline buffer and a separate online buffer by
`mixing_ratio`, and, as in CORL, calibration is switched off.

    python algorithms/calql.py --config configs/local/hopper-random.yaml
    python algorithms/calql.py --config configs/antmaze/umaze.yaml --seed 3 --device cpu

The file is self-contained: copy it into your project and it runs. It reads top to bottom: the
configuration, the returns-to-go and networks, the agent (its `update` is Cal-QL), `train()`; the
machinery (command line, data, environment, buffers, evaluation, logging) follows the "Machinery"
banner. A section marked `BEGIN SHARED: <name>` is a copy: every algorithm file that holds that name
holds it identically.

Docs (in this file's repository): docs/configuration.md (options, config files), docs/datasets.md,
docs/runs.md (outputs, checkpoints, resume), docs/results.md.
"""

import contextlib
import copy
import functools
import inspect
import json
import math
import os
import platform
import random
import re
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import gymnasium as gym
import h5py
import numpy as np
import pyrallis
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.distributions import Normal, TanhTransform, TransformedDistribution
from tqdm.auto import tqdm

ALGORITHM = "calql"
# YAML sections this script reads besides the common keys; sections of other algorithms are skipped.
CONFIG_SECTIONS = ("calql",)


@dataclass
class TrainConfig:
    """Every field can be set in the YAML file or on the command line (--field value)."""

    dataset: str = "random:Hopper-v5:20000"  # d4rl:NAME | minari:ID | hdf5:PATH | collected:ENV:KIND | random:ENV:N
    env: str = ""  # gymnasium env id; empty: the env that belongs to the dataset
    seed: int = 0  # seed of torch, numpy and the training env
    eval_seed: int = 0  # seed of the evaluation env
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    threads: int = 1  # torch threads; 1 does not wait on cores other processes hold (docs/runs.md); 0: one per core
    offline_iterations: int = 1_000_000  # gradient updates on the offline dataset
    online_iterations: int = 1_000_000  # environment steps during fine-tuning, one update each
    offline_eval_freq: int = 50_000  # evaluate every this many offline updates (and at the end of pretraining)
    eval_freq: int = 5_000  # evaluate every this many online steps (and at the end of the run)
    n_episodes: int = 10  # episodes per evaluation
    eval_envs: int = 10  # evaluation episodes run side by side (one batched policy call per step)
    log_freq: int = 1_000  # log training losses every this many updates
    batch_size: int = 256  # transitions per gradient update
    buffer_size: int = 2_000_000  # capacity of the offline buffer and of the online buffer
    normalize: bool = True  # standardise states with the dataset's mean and std
    normalize_reward: bool = False  # locomotion only: scale rewards by max_episode_steps / (max - min episode return)
    reward_scale: float = 1.0  # after normalize_reward: reward * reward_scale + reward_bias (AntMaze: 10)
    reward_bias: float = 0.0  # after normalize_reward: reward * reward_scale + reward_bias (AntMaze: -5)
    discount: float = 0.99  # discount factor
    alpha_multiplier: float = 1.0  # multiplier of the SAC entropy temperature
    use_automatic_entropy_tuning: bool = True  # tune the SAC temperature towards entropy -action_dim
    backup_entropy: bool = False  # subtract the entropy term in the TD target
    policy_lr: float = 1e-4  # actor (and temperature) learning rate
    qf_lr: float = 3e-4  # critic learning rate
    soft_target_update_rate: float = 5e-3  # target critic soft-update rate
    target_update_period: int = 1  # update the target critics every this many steps
    bc_steps: int = 0  # first updates that train the actor by behaviour cloning
    cql_alpha: float = 10.0  # weight of the CQL regulariser offline
    cql_alpha_online: float = 10.0  # weight of the CQL regulariser online
    cql_n_actions: int = 10  # sampled actions per state in the regulariser
    cql_importance_sample: bool = True  # importance-weight the sampled actions
    cql_lagrange: bool = False  # tune the regulariser weight towards cql_target_action_gap
    cql_target_action_gap: float = -1.0  # target gap of the Lagrange version
    cql_temp: float = 1.0  # temperature of the log-sum-exp
    cql_max_target_backup: bool = False  # TD target: max over cql_n_actions sampled next actions
    cql_clip_diff_min: float = -math.inf  # lower clip of the regulariser per state
    cql_clip_diff_max: float = math.inf  # upper clip of the regulariser per state
    orthogonal_init: bool = True  # orthogonal initialisation of all linear layers
    q_n_hidden_layers: int = 2  # hidden layers (256 wide) of each critic
    mixing_ratio: float = 0.5  # share of offline data in each online batch
    is_sparse_reward: bool = False  # episodes whose rewards all equal reward_bias (failures) get r / (1 - discount)
    project: str = "CORL"  # W&B project
    group: str = "Cal-QL-D4RL"  # W&B group
    name: str = ""  # run name; empty: <algorithm>-<dataset>-seed<seed>-<8 hex>
    wandb_mode: str = "offline"  # online | offline | disabled
    log_dir: str = "runs"  # each run writes log_dir/<name>/: config.yaml, metrics.jsonl, summary.json
    checkpoints_path: str = ""  # save a checkpoint at each evaluation to checkpoints_path/<name>/ (empty: none)
    snapshot_every: int = 10_000  # steps between snapshots that --resume continues from (0: none)
    resume: str = ""  # a run directory (log_dir/<name>) to continue from its last snapshot
    load_model: str = ""  # checkpoint to start from; it skips offline pretraining


# ==== BEGIN SHARED: Cal-QL returns-to-go and networks ====
# ---------------------------------------------------------------------------------------------
# Cal-QL: Monte-Carlo returns-to-go of the offline data (the calibration bound)
# ---------------------------------------------------------------------------------------------
def returns_to_go(rewards: np.ndarray, terminals: np.ndarray, episode_ends: np.ndarray, discount: float,
                  sparse_failure_reward: Optional[float] = None) -> np.ndarray:
    """Discounted return from each transition to the end of its episode (CORL's get_return_to_go).

    With sparse_failure_reward set, an episode whose rewards all equal it (it never reached the
    goal) gets r / (1 - discount) everywhere, the return of failing forever.
    """
    returns = np.zeros(len(rewards), dtype=np.float64)
    future = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        if episode_ends[i]:
            future = 0.0
        future = rewards[i] + discount * future * (1.0 - terminals[i])
        returns[i] = future
    ends = np.nonzero(episode_ends)[0]
    if sparse_failure_reward is not None and len(ends):
        starts = np.concatenate([[0], ends[:-1] + 1])
        complete = rewards[:ends[-1] + 1]
        failed = ((np.minimum.reduceat(complete, starts) == sparse_failure_reward)
                  & (np.maximum.reduceat(complete, starts) == sparse_failure_reward))
        for start, end in zip(starts[failed], ends[failed], strict=True):
            returns[start:end + 1] = sparse_failure_reward / (1.0 - discount)
    return returns.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------
def init_linear(module: nn.Module, orthogonal: bool) -> None:
    if isinstance(module, nn.Linear):
        if orthogonal:
            nn.init.orthogonal_(module.weight, gain=math.sqrt(2))
            nn.init.constant_(module.bias, 0.0)
        else:
            nn.init.xavier_uniform_(module.weight, gain=1e-2)


class Scalar(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.constant = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self) -> torch.Tensor:
        return self.constant


class TanhGaussianPolicy(nn.Module):
    """SAC actor: a Gaussian squashed by tanh, 3 hidden layers of 256 (CORL's Cal-QL actor)."""

    LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0

    def __init__(self, state_dim: int, action_dim: int, max_action: float, orthogonal_init: bool):
        super().__init__()
        self.action_dim, self.max_action = action_dim, max_action
        self.base_network = nn.Sequential(
            nn.Linear(state_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2 * action_dim))
        if orthogonal_init:
            self.base_network.apply(lambda m: init_linear(m, True))
        else:
            init_linear(self.base_network[-1], False)
        self.log_std_multiplier, self.log_std_offset = Scalar(1.0), Scalar(-1.0)

    def distribution(self, states: torch.Tensor) -> Tuple[TransformedDistribution, torch.Tensor]:
        mean, log_std = torch.split(self.base_network(states), self.action_dim, dim=-1)
        log_std = (self.log_std_multiplier() * log_std + self.log_std_offset()).clamp(self.LOG_STD_MIN,
                                                                                    self.LOG_STD_MAX)
        # No argument checks: each costs a device sync, and NaN is reported by the run's FiniteGuard in one line.
        normal = Normal(mean, log_std.exp(), validate_args=False)
        return TransformedDistribution(normal, TanhTransform(cache_size=1), validate_args=False), mean

    def forward(self, states: torch.Tensor, deterministic: bool = False,
                repeat: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Actions in [-max_action, max_action] and their log-probabilities; repeat: (B, repeat, A)."""
        if repeat is not None:
            states = states.unsqueeze(1).expand(-1, repeat, -1)
        distribution, mean = self.distribution(states)
        actions = torch.tanh(mean) if deterministic else distribution.rsample()
        return self.max_action * actions, distribution.log_prob(actions).sum(-1)

    def log_prob(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        distribution, _ = self.distribution(states)
        bound = 1.0 - 1e-6  # atanh of the data's +-1 actions would be infinite
        return distribution.log_prob((actions / self.max_action).clamp(-bound, bound)).sum(-1)


class FullyConnectedQFunction(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, orthogonal_init: bool, n_hidden_layers: int):
        super().__init__()
        layers: List[nn.Module] = [nn.Linear(state_dim + action_dim, 256), nn.ReLU()]
        for _ in range(n_hidden_layers - 1):
            layers += [nn.Linear(256, 256), nn.ReLU()]
        layers.append(nn.Linear(256, 1))
        self.network = nn.Sequential(*layers)
        if orthogonal_init:
            self.network.apply(lambda m: init_linear(m, True))
        else:
            init_linear(self.network[-1], False)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q(s, a): (B,) for actions (B, A); (B, n) for actions (B, n, A)."""
        if actions.ndim == 3 and states.ndim == 2:
            states = states.unsqueeze(1).expand(-1, actions.shape[1], -1)
        return self.network(torch.cat([states, actions], dim=-1)).squeeze(-1)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source, one fused call over every parameter."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)
# ==== END SHARED: Cal-QL returns-to-go and networks ====


# ==== BEGIN SHARED: Cal-QL agent ====
# ---------------------------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------------------------
class CalQL:
    def __init__(self, config: TrainConfig, state_dim: int, action_dim: int, max_action: float,
                 device: torch.device):
        self.config, self.device = config, device
        self.actor = TanhGaussianPolicy(state_dim, action_dim, max_action, config.orthogonal_init).to(device)
        self.critic_1 = FullyConnectedQFunction(state_dim, action_dim, config.orthogonal_init,
                                                config.q_n_hidden_layers).to(device)
        self.critic_2 = FullyConnectedQFunction(state_dim, action_dim, config.orthogonal_init,
                                                config.q_n_hidden_layers).to(device)
        self.target_critic_1 = copy.deepcopy(self.critic_1).requires_grad_(False)
        self.target_critic_2 = copy.deepcopy(self.critic_2).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), config.policy_lr)
        self.critic_optimizer = torch.optim.Adam([*self.critic_1.parameters(), *self.critic_2.parameters()],
                                                 config.qf_lr)
        self.log_alpha = Scalar(0.0).to(device)
        self.alpha_optimizer = torch.optim.Adam(self.log_alpha.parameters(), config.policy_lr)
        self.log_alpha_prime = Scalar(1.0).to(device)
        self.alpha_prime_optimizer = torch.optim.Adam(self.log_alpha_prime.parameters(), config.qf_lr)
        self.target_entropy = -float(action_dim)
        self.cql_alpha = config.cql_alpha
        self.calibration_enabled = True
        self.total_it = 0

    def start_online(self) -> None:
        """As CORL: online, calibration is off and the regulariser takes cql_alpha_online."""
        self.calibration_enabled = False
        self.cql_alpha = self.config.cql_alpha_online

    def _q_loss(self, batch: Dict[str, torch.Tensor], alpha: torch.Tensor,
                log: Dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        states, actions, next_states = batch["states"], batch["actions"], batch["next_states"]
        rewards, dones = batch["rewards"].squeeze(-1), batch["dones"].squeeze(-1)
        q1_predicted, q2_predicted = self.critic_1(states, actions), self.critic_2(states, actions)

        with torch.no_grad():
            if config.cql_max_target_backup:
                next_actions, next_log_pi = self.actor(next_states, repeat=config.cql_n_actions)
                target_q = torch.min(self.target_critic_1(next_states, next_actions),
                                     self.target_critic_2(next_states, next_actions))
                target_q, best = target_q.max(-1)
                next_log_pi = next_log_pi.gather(-1, best.unsqueeze(-1)).squeeze(-1)
            else:
                next_actions, next_log_pi = self.actor(next_states)
                target_q = torch.min(self.target_critic_1(next_states, next_actions),
                                     self.target_critic_2(next_states, next_actions))
            if config.backup_entropy:
                target_q = target_q - alpha * next_log_pi
            td_target = rewards + (1.0 - dones) * config.discount * target_q
        qf1_loss, qf2_loss = F.mse_loss(q1_predicted, td_target), F.mse_loss(q2_predicted, td_target)

        # CQL regulariser: log-sum-exp of Q over random, current-policy and next-state-policy actions.
        batch_size, action_dim, n = actions.shape[0], actions.shape[-1], config.cql_n_actions
        random_actions = actions.new_empty((batch_size, n, action_dim)).uniform_(-1, 1)
        with torch.no_grad():
            current_actions, current_log_pis = self.actor(states, repeat=n)
            next_actions, next_log_pis = self.actor(next_states, repeat=n)
        q1_rand, q2_rand = self.critic_1(states, random_actions), self.critic_2(states, random_actions)
        q1_current, q2_current = self.critic_1(states, current_actions), self.critic_2(states, current_actions)
        q1_next, q2_next = self.critic_1(states, next_actions), self.critic_2(states, next_actions)

        # Cal-QL: Q-values of policy actions are bounded below by the Monte-Carlo return-to-go.
        lower_bounds = batch["mc_returns"].expand(-1, n)
        log["bound_rate_cql_q1_current_actions"] = (q1_current < lower_bounds).float().mean().detach()
        if self.calibration_enabled:
            q1_current, q2_current = torch.maximum(q1_current, lower_bounds), torch.maximum(q2_current, lower_bounds)
            q1_next, q2_next = torch.maximum(q1_next, lower_bounds), torch.maximum(q2_next, lower_bounds)

        if config.cql_importance_sample:
            random_density = math.log(0.5**action_dim)
            cat_q1 = torch.cat([q1_rand - random_density, q1_next - next_log_pis, q1_current - current_log_pis], 1)
            cat_q2 = torch.cat([q2_rand - random_density, q2_next - next_log_pis, q2_current - current_log_pis], 1)
        else:
            cat_q1 = torch.cat([q1_rand, q1_predicted.unsqueeze(1), q1_next, q1_current], 1)
            cat_q2 = torch.cat([q2_rand, q2_predicted.unsqueeze(1), q2_next, q2_current], 1)
        qf1_ood = torch.logsumexp(cat_q1 / config.cql_temp, dim=1) * config.cql_temp
        qf2_ood = torch.logsumexp(cat_q2 / config.cql_temp, dim=1) * config.cql_temp
        qf1_diff = (qf1_ood - q1_predicted).clamp(config.cql_clip_diff_min, config.cql_clip_diff_max).mean()
        qf2_diff = (qf2_ood - q2_predicted).clamp(config.cql_clip_diff_min, config.cql_clip_diff_max).mean()

        if config.cql_lagrange:
            alpha_prime = self.log_alpha_prime().exp().clamp(0.0, 1e6)
            gaps = (qf1_diff.detach() - config.cql_target_action_gap, qf2_diff.detach() - config.cql_target_action_gap)
            alpha_prime_loss = -0.5 * alpha_prime * self.cql_alpha * (gaps[0] + gaps[1])
            self.alpha_prime_optimizer.zero_grad(set_to_none=True)
            alpha_prime_loss.backward()
            self.alpha_prime_optimizer.step()
            alpha_prime = alpha_prime.detach()
            cql_loss_1 = alpha_prime * self.cql_alpha * (qf1_diff - config.cql_target_action_gap)
            cql_loss_2 = alpha_prime * self.cql_alpha * (qf2_diff - config.cql_target_action_gap)
            log["alpha_prime"] = alpha_prime
        else:
            cql_loss_1, cql_loss_2 = qf1_diff * self.cql_alpha, qf2_diff * self.cql_alpha
        log.update(qf1_loss=qf1_loss.detach(), qf2_loss=qf2_loss.detach(), cql_min_qf1_loss=cql_loss_1.detach(),
                   cql_min_qf2_loss=cql_loss_2.detach(), average_qf1=q1_predicted.detach().mean(),
                   average_target_q=target_q.mean(), cql_q1_rand=q1_rand.detach().mean(),
                   cql_q1_current_actions=q1_current.detach().mean(), cql_q1_next_actions=q1_next.detach().mean())
        return qf1_loss + qf2_loss + cql_loss_1 + cql_loss_2

    def update(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One Cal-QL step: temperature, actor (SAC), then critics (TD + calibrated CQL)."""
        self.total_it += 1
        config = self.config
        states = batch["states"]
        new_actions, log_pi = self.actor(states)
        if config.use_automatic_entropy_tuning:
            alpha_loss = -(self.log_alpha() * (log_pi + self.target_entropy).detach()).mean()
            alpha = self.log_alpha().exp() * config.alpha_multiplier
        else:
            alpha_loss = states.new_tensor(0.0)
            alpha = states.new_tensor(config.alpha_multiplier)

        if self.total_it <= config.bc_steps:
            policy_loss = (alpha.detach() * log_pi - self.actor.log_prob(states, batch["actions"])).mean()
        else:
            q_new_actions = torch.min(self.critic_1(states, new_actions), self.critic_2(states, new_actions))
            policy_loss = (alpha.detach() * log_pi - q_new_actions).mean()

        log: Dict[str, torch.Tensor] = {"policy_loss": policy_loss.detach(), "alpha_loss": alpha_loss.detach(),
                                        "alpha": alpha.detach(), "log_pi": log_pi.detach().mean()}
        qf_loss = self._q_loss(batch, alpha.detach(), log)

        if config.use_automatic_entropy_tuning:
            self.alpha_optimizer.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_optimizer.step()
        self.actor_optimizer.zero_grad(set_to_none=True)
        policy_loss.backward()
        self.actor_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)  # also drops what policy_loss left in the critics
        qf_loss.backward()
        self.critic_optimizer.step()
        if self.total_it % config.target_update_period == 0:
            soft_update(self.target_critic_1, self.critic_1, config.soft_target_update_rate)
            soft_update(self.target_critic_2, self.critic_2, config.soft_target_update_rate)
        return log

    @torch.no_grad()
    def act(self, state: np.ndarray, explore: bool) -> np.ndarray:
        """Evaluation: tanh of the mean. Exploration: a sample of the policy."""
        states = torch.atleast_2d(torch.as_tensor(state, dtype=torch.float32, device=self.device))
        action, _ = self.actor(states, deterministic=not explore)
        action = action.cpu().numpy()
        return action[0] if np.ndim(state) == 1 else action

    def state_dict(self) -> Dict[str, Any]:
        names = ("actor", "critic_1", "critic_2", "target_critic_1", "target_critic_2", "log_alpha",
                 "log_alpha_prime", "actor_optimizer", "critic_optimizer", "alpha_optimizer", "alpha_prime_optimizer")
        return {**{name: getattr(self, name).state_dict() for name in names}, "total_it": self.total_it,
                "cql_alpha": self.cql_alpha, "calibration_enabled": self.calibration_enabled}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, value in state.items():
            if name in ("total_it", "cql_alpha", "calibration_enabled"):
                setattr(self, name, value)
            else:
                getattr(self, name).load_state_dict(value)
# ==== END SHARED: Cal-QL agent ====


# ---------------------------------------------------------------------------------------------
# Training: offline pretraining, then online fine-tuning
# ---------------------------------------------------------------------------------------------
def train(config: TrainConfig) -> Dict[str, Any]:
    device = setup_device(config)
    set_seed(config.seed)
    data, info = load_dataset(config.dataset, config.env)
    env = make_env(info, seed=config.seed)
    check_dataset_matches_env(data, env, info)
    max_steps = max_episode_steps_of(env)
    reward_scale, reward_bias = reward_transform(data, info, config.normalize_reward, config.reward_scale,
                                                 config.reward_bias, max_steps)
    state_mean, state_std = state_statistics(data["observations"], config.normalize)
    env = NormalizeState(env, state_mean, state_std)
    eval_envs = make_eval_envs(info, state_mean, state_std, min(config.eval_envs, config.n_episodes),
                               config.eval_seed)
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    max_action = float(env.action_space.high[0])

    offline = transition_columns(data)
    offline["states"] = (offline["states"] - state_mean) / state_std
    offline["next_states"] = (offline["next_states"] - state_mean) / state_std
    offline["rewards"] = offline["rewards"] * reward_scale + reward_bias
    offline["mc_returns"] = returns_to_go(offline["rewards"][:, 0], data["terminals"], data["episode_ends"],
                                          config.discount, reward_bias if config.is_sparse_reward else None)[:, None]
    columns = {"states": state_dim, "actions": action_dim, "rewards": 1, "next_states": state_dim, "dones": 1,
               "mc_returns": 1}
    offline_capacity = min(config.buffer_size, len(data["observations"]))
    offline_buffer = ReplayBuffer(offline_capacity, columns, device)
    offline_buffer.add_batch(**{name: values[-offline_capacity:] for name, values in offline.items()})
    online_buffer = ReplayBuffer(max(min(config.buffer_size, config.online_iterations), 1), columns, device)
    offline_batch_size = int(config.batch_size * config.mixing_ratio)
    online_batch_size = config.batch_size - offline_batch_size

    agent = CalQL(config, state_dim, action_dim, max_action, device)
    collector = OnlineCollector(env, info, config.seed, reward_scale, reward_bias)

    with Run(config, info, device, "Cal-QL", len(data["observations"]), max_steps, closing=(env, eval_envs)) as run:
        for t in run.steps({"agent": agent, "online_buffer": online_buffer, "collector": collector}):
            phase, step = ("offline" if t < config.offline_iterations else "online"), t + 1
            if t == config.offline_iterations:
                agent.start_online()
            episode_log = None
            if phase == "online":
                action = agent.act(collector.state, explore=True)
                transition, episode_log = collector.step(action)
                # Online returns-to-go are never used: calibration is off online (CORL).
                online_buffer.add(**transition, mc_returns=np.zeros(1, np.float32))
                offline_part = offline_buffer.sample(offline_batch_size)
                online_part = online_buffer.sample(online_batch_size)
                batch = {name: torch.cat([offline_part[name], online_part[name]]) for name in columns}
            else:
                batch = offline_buffer.sample(config.batch_size)
            losses = agent.update(batch)
            run.log_step(step, phase, losses, episode_log)
            if evaluation_due(step, config):
                metrics = evaluate(eval_envs, lambda s: agent.act(s, explore=False), info, config.n_episodes,
                                   config.eval_seed)
                run.evaluated(metrics, step, phase, checkpoint=lambda: {
                    "agent": agent.state_dict(), "state_mean": state_mean, "state_std": state_std})
            run.end_step(step, phase, episode_running=collector.episode_length > 0)
    return run.finish(collector.env_steps)


# =============================================================================================
# Machinery, found here when needed: command line and config files, datasets, environment,
# replay buffer, evaluation, logging and checkpoints. The algorithm is above.
# =============================================================================================


# ==== BEGIN SHARED: command line and config files ====
class UserError(Exception):
    """Bad input (file, dataset, config value): reported as one line, without a traceback."""


class NonFiniteError(UserError):
    """A loss, value, energy or guidance term became NaN or inf: the run stops rather than log garbage."""


# Sections a dataset YAML may hold: each script reads its own and skips the others.
ALL_CONFIG_SECTIONS = ("iql", "calql", "edis", "iql_edis", "calql_edis")


# One decoding rule for every value, from a file or the command line. Files are read with YAML's BaseLoader,
# so a value arrives as the text that was written, just as on the command line: `name: off` stays "off",
# `normalize: perhaps` and `seed: 1.7` are errors. pyrallis applies these to every field it decodes.
BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def decode_bool(value: Any) -> bool:
    if str(value).lower() not in BOOLEANS:
        raise ValueError("is not true or false")
    return BOOLEANS[str(value).lower()]


def decode_int(value: Any) -> int:
    text = str(value)
    with contextlib.suppress(ValueError, OverflowError):  # 1_000_000 and 1e6 are integers too
        if not isinstance(value, (bool, float)) and float(text).is_integer():
            return int(float(text)) if "e" in text.lower() else int(text)
    raise ValueError("is not an integer")


def decode_float(value: Any) -> float:
    with contextlib.suppress(ValueError):  # inf and YAML's .inf are numbers (Cal-QL's clip bounds); NaN is not
        number = float(str(value).lower().replace(".inf", "inf"))
        if not isinstance(value, bool) and not math.isnan(number):
            return number
    raise ValueError("is not a number")


def decode_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("is not a single value")


for _kind, _decoder in ((bool, decode_bool), (int, decode_int), (float, decode_float), (str, decode_str)):
    pyrallis.decode.register(_kind, _decoder)


def field_types(config_class: Any) -> Dict[str, Any]:
    return {field.name: field.type for field in fields(config_class)} if is_dataclass(config_class) else {}


def flatten(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"edis": {"width": "64"}} -> {"edis.width": "64"}: the dotted names of the command line."""
    flat: Dict[str, Any] = {}
    for key, value in mapping.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def read_config_file(path: str, config_class: type, own_sections: Tuple[str, ...]) -> Dict[str, Tuple[Any, str]]:
    """Dotted key -> (text, "'key' in path"): the common keys, then this script's sections in order.

    A section named after a nested field (`edis:`) fills that field; any other (`iql:`, `iql_edis:`) sets
    top-level keys, and a mapping inside it (`edis:` inside `iql_edis:`) sets the nested field key by key.
    """
    try:
        with open(path) as file:
            raw = yaml.load(file, Loader=yaml.BaseLoader) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read config file {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    for section in ALL_CONFIG_SECTIONS:
        if not isinstance(raw.get(section) or {}, dict):
            raise UserError(f"section '{section}' in {path} must be a mapping")
    common = {key: value for key, value in raw.items() if key not in ALL_CONFIG_SECTIONS}
    values = {key: (text, f"'{key}' in {path}") for key, text in flatten(common).items()}
    for section in own_sections:
        body = raw.get(section) or {}
        prefix = f"{section}." if is_dataclass(field_types(config_class).get(section)) else ""
        values.update({prefix + key: (text, f"'{section}.{key}' in {path}") for key, text in flatten(body).items()})
    return values


def parse_config(config_class: type, own_sections: Tuple[str, ...], argv: Optional[List[str]] = None) -> Any:
    """Dataclass from defaults < config file (--config) < command line (`--key value`, `--section.key=value`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print_help(config_class)
        raise SystemExit(0)
    from_file: Dict[str, Tuple[Any, str]] = {}
    from_command_line: Dict[str, Tuple[Any, str]] = {}  # (text, "") for each --key
    words = iter(argv)
    for word in words:
        option, has_value, text = word.partition("=")
        if not option.startswith("--"):
            raise UserError(f"unexpected argument {word!r}: options are --key value")
        text = text if has_value else next(words, None)
        if text is None:
            raise UserError(f"{option} needs a value")
        if option in ("--config", "--config_path"):
            from_file = read_config_file(text, config_class, own_sections)
        else:
            from_command_line[option[2:]] = (text, "")
    nested: Dict[str, Any] = {}
    for key, (text, where) in {**from_file, **from_command_line}.items():
        *heads, name = key.split(".")
        owner, target = config_class, nested
        for head in heads:  # `edis.width`: into the nested dataclass
            owner, target = field_types(owner).get(head), target.setdefault(head, {})
        kind = field_types(owner).get(name)
        if kind is None or is_dataclass(kind):
            raise UserError(f"unknown key {where}" if where else f"unknown option --{key} (see --help)")
        try:
            target[name] = pyrallis.decode(kind, text)
        except ValueError as error:
            raise UserError(f"{key} = {text!r} {error}" + (f" ({where})" if where else "")) from None
    return pyrallis.decode(config_class, nested)


def print_help(config_class: type) -> None:
    """pyrallis' --help: every option with its field's comment."""
    # pyrallis finds each comment with inspect.getsource(class), which re-reads this long file per field: cache it.
    getsource = inspect.getsource
    inspect.getsource = functools.lru_cache(maxsize=None)(getsource)
    try:
        parser = pyrallis.argparsing.ArgumentParser(config_class=config_class)
        for action in parser._actions:  # the file option is --config here (--config_path also works)
            if action.dest == "config_path":
                action.option_strings, action.metavar = ["--config", "--config_path"], "FILE"
                action.help = "YAML config file (configs/<domain>/<dataset>.yaml); the command line overrides it"
        parser.print_help()
    finally:
        inspect.getsource = getsource


def check_range(
    config: Any, name: str, low: float, high: float, low_inclusive: bool = True, label: str = ""
) -> None:
    value = getattr(config, name)
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        bound = "[" if low_inclusive else "("
        raise UserError(f"{label or name} = {value} is outside {bound}{low}, {high}]")


def validate_common_config(config: Any) -> None:
    for name in ("offline_iterations", "online_iterations"):
        check_range(config, name, 0, math.inf)
    for name in ("n_episodes", "eval_envs", "offline_eval_freq", "eval_freq", "log_freq", "batch_size", "buffer_size"):
        check_range(config, name, 1, math.inf)
    check_range(config, "threads", 0, math.inf)
    if config.offline_iterations + config.online_iterations == 0 and not config.load_model:
        raise UserError("offline_iterations and online_iterations are both 0: nothing to do")
    if config.wandb_mode not in ("online", "offline", "disabled"):
        raise UserError(f"wandb_mode = {config.wandb_mode!r}: use online, offline or disabled")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", config.device):
        raise UserError(f"device = {config.device!r}: use auto, cpu, cuda or cuda:N")
# ==== END SHARED: command line and config files ====


# ==== BEGIN SHARED: device and seeds ====
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device = {name!r} but CUDA is not available here; use --device cpu")
    if name.startswith("cuda"):  # TF32 matmuls: several times the float32 rate, ample precision for these MLPs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def set_threads(threads: int) -> None:
    """torch's threads for this run's tensor operations; 0 keeps torch's default, one per core."""
    if threads > 0:
        torch.set_num_threads(threads)


def note_cpu_scale(config: Any, device: torch.device) -> None:
    """One line when a full-scale budget is about to run on a CPU: days there, not a refusal."""
    steps = config.offline_iterations + config.online_iterations
    edis = getattr(config, "edis", None)
    big_model = edis is not None and edis.width * edis.blocks >= 1024 * 6
    if device.type == "cpu" and (steps >= 1_000_000 or big_model):
        model = f", a {edis.width} x {edis.blocks} denoiser" if edis is not None else ""
        print(f"note: a full-scale budget on a CPU ({config.offline_iterations:,} offline updates + "
              f"{config.online_iterations:,} online steps{model}): expect days; configs/cpu/*.yaml are "
              f"sized for a 2-core CPU", file=sys.stderr, flush=True)


def setup_device(config: Any) -> torch.device:
    """The training device, with torch's thread count set and a note when a CPU gets a full-scale budget."""
    device = resolve_device(config.device)
    note_cpu_scale(config, device)
    set_threads(config.threads)
    return device


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
# ==== END SHARED: device and seeds ====


def validate_config(config: TrainConfig) -> None:
    validate_common_config(config)
    check_range(config, "discount", 0.0, 1.0)
    check_range(config, "soft_target_update_rate", 0.0, 1.0)
    check_range(config, "mixing_ratio", 0.0, 1.0)
    for name in ("policy_lr", "qf_lr", "cql_temp"):
        check_range(config, name, 0.0, math.inf, low_inclusive=False)
    for name in ("cql_alpha", "cql_alpha_online", "alpha_multiplier", "bc_steps"):
        check_range(config, name, 0.0, math.inf)
    for name in ("cql_n_actions", "q_n_hidden_layers", "target_update_period"):
        check_range(config, name, 1, math.inf)


# ==== BEGIN SHARED: datasets ====
# D4RL reference returns: normalised score = 100 * (return - min) / (max - min).
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "antmaze": (0.0, 1.0),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867),
    "relocate": (-6.425911, 4233.877797728884),
}
LOCOMOTION_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
ADROIT_ENVS = {"pen": "AdroitHandPen-v1", "door": "AdroitHandDoor-v1", "hammer": "AdroitHandHammer-v1",
               "relocate": "AdroitHandRelocate-v1"}
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
# AntMaze v2: dataset file, maze, episode length.
ANTMAZE_FILE = "Ant_maze_{}_noisy_multistart_{}_multigoal_{}_sparse_fixed.hdf5"
D4RL_ANTMAZE = {
    "antmaze-umaze-v2": (ANTMAZE_FILE.format("u-maze", False, False), "umaze", 700),
    "antmaze-umaze-diverse-v2": (ANTMAZE_FILE.format("u-maze", True, True), "umaze", 700),
    "antmaze-medium-play-v2": (ANTMAZE_FILE.format("big-maze", True, False), "medium", 1000),
    "antmaze-medium-diverse-v2": (ANTMAZE_FILE.format("big-maze", True, True), "medium", 1000),
    "antmaze-large-play-v2": (ANTMAZE_FILE.format("hardest-maze", True, False), "large", 1000),
    "antmaze-large-diverse-v2": (ANTMAZE_FILE.format("hardest-maze", True, True), "large", 1000),
}
SUCCESS_DOMAINS = ("antmaze", "pen", "door", "hammer", "relocate")  # domains that report a success rate
D4RL_REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")


@dataclass
class DatasetInfo:
    """Where the data came from and what belongs to it."""

    source: str  # the dataset string as given
    env_id: str  # gymnasium env id
    domain: Optional[str]  # hopper, antmaze, pen, ... (None: unknown)
    ref_min_score: Optional[float] = None  # return of a random policy, for normalised scores
    ref_max_score: Optional[float] = None  # return of an expert policy
    env_spec: Any = None  # Minari: the dataset's gymnasium EnvSpec
    antmaze_maze: Optional[str] = None  # D4RL AntMaze: umaze | medium | large
    max_episode_steps: Optional[int] = None  # episode length to use instead of the env's default

    @property
    def has_reference(self) -> bool:
        return self.ref_min_score is not None and self.ref_max_score is not None

    def normalized_score(self, episode_return: float) -> float:
        return 100.0 * (episode_return - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


def domain_of(name: str) -> Optional[str]:
    name = name.lower()
    for domain in ("halfcheetah", "hopper", "walker2d", "antmaze", "pen", "door", "hammer", "relocate"):
        if domain in name:
            return domain
    return None


def d4rl_file(name: str) -> Tuple[str, DatasetInfo]:
    """URL and DatasetInfo for a D4RL dataset name (locomotion v2, Adroit v1, AntMaze v2)."""
    locomotion = re.fullmatch(r"(hopper|halfcheetah|walker2d)-(random|medium|medium-replay|medium-expert|expert|"
                              r"full-replay)-v2", name)
    adroit = re.fullmatch(r"(pen|door|hammer|relocate)-(human|cloned|expert)-v1", name)
    if locomotion:
        domain, kind = locomotion.groups()
        url = f"{D4RL_URL}/gym_mujoco_v2/{domain}_{kind.replace('-', '_')}-v2.hdf5"
        info = DatasetInfo(f"d4rl:{name}", LOCOMOTION_ENVS[domain], domain, *D4RL_REF_SCORES[domain])
    elif adroit:
        domain = adroit.group(1)
        url = f"{D4RL_URL}/hand_dapg_v1/{name}.hdf5"
        info = DatasetInfo(f"d4rl:{name}", ADROIT_ENVS[domain], domain, *D4RL_REF_SCORES[domain])
    elif name in D4RL_ANTMAZE:
        file_name, maze, steps = D4RL_ANTMAZE[name]
        url = f"{D4RL_URL}/ant_maze_v2/{file_name}"
        info = DatasetInfo(f"d4rl:{name}", f"D4RLAntMaze-{maze}", "antmaze", *D4RL_REF_SCORES["antmaze"],
                           antmaze_maze=maze, max_episode_steps=steps)
    else:
        raise UserError(f"unknown D4RL dataset '{name}': use <hopper|halfcheetah|walker2d>-<random|medium|"
                        "medium-replay|medium-expert|expert>-v2, <pen|door|hammer|relocate>-<human|cloned|expert>-v1 "
                        f"or one of {', '.join(D4RL_ANTMAZE)}")
    return url, info


def download(url: str, path: Path) -> None:
    """Downloads url to path with a progress bar; the file appears only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")  # parallel runs may make the same file
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(partial, "wb") as file, tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
            while chunk := response.read(1 << 20):
                file.write(chunk)
                bar.update(len(chunk))
    os.replace(partial, path)


def read_d4rl_hdf5(path: Path) -> Dict[str, Any]:
    """The flat arrays of a D4RL-layout HDF5 file, plus its ref_min_score/ref_max_score attributes."""
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    try:
        with h5py.File(path, "r") as file:
            missing = [key for key in D4RL_REQUIRED_KEYS if key not in file]
            if missing:
                raise UserError(f"{path} lacks the key(s) {', '.join(missing)} (D4RL layout needs "
                                f"{', '.join(D4RL_REQUIRED_KEYS)})")
            raw = {key: file[key][()] for key in (*D4RL_REQUIRED_KEYS, "timeouts", "next_observations") if key in file}
            for attr in ("ref_min_score", "ref_max_score", "env_id"):
                if attr in file.attrs:
                    value = file.attrs[attr]
                    raw[attr] = value.decode() if isinstance(value, bytes) else value
    except UserError:
        raise
    except Exception as error:  # h5py raises OSError (and others) on truncated or corrupted files
        raise UserError(f"cannot read HDF5 file {path}: {str(error).splitlines()[0]}") from None
    n = len(raw["observations"])
    for key in ("actions", "rewards", "terminals", "timeouts", "next_observations"):
        if key in raw and len(raw[key]) != n:
            raise UserError(f"{path}: '{key}' has {len(raw[key])} rows but 'observations' has {n}")
    if n < 2:
        raise UserError(f"{path}: needs at least 2 rows, has {n}")
    return raw


def check_finite(arrays: Dict[str, np.ndarray], where: str) -> None:
    for key in ("observations", "actions", "rewards", "next_observations"):
        if key not in arrays:
            continue
        bad_rows = ~np.isfinite(arrays[key].reshape(len(arrays[key]), -1)).all(axis=1)
        if bad_rows.any():
            raise UserError(f"{where}: {int(bad_rows.sum())} row(s) of '{key}' hold NaN or inf "
                            f"(first at index {int(np.argmax(bad_rows))})")


def qlearning_transitions(raw: Dict[str, np.ndarray], max_episode_steps: int) -> Dict[str, np.ndarray]:
    """Transitions as d4rl.qlearning_dataset builds them, plus where each episode ends.

    Row i pairs observations[i] with observations[i + 1]; the last row is dropped, and so is every
    row flagged in `timeouts` (the last step of a truncated episode: its next observation is not
    in the file). Without `timeouts`, an episode is taken to time out every `max_episode_steps`
    steps after the last terminal, as d4rl does.
    """
    n = len(raw["observations"])
    terminals = raw["terminals"].astype(bool).reshape(n)
    if "timeouts" in raw:
        timeouts = raw["timeouts"].astype(bool).reshape(n)
    else:
        timeouts, episode_step = np.zeros(n, dtype=bool), 0
        for i in range(n):
            timeouts[i] = episode_step == max_episode_steps - 1
            episode_step = 0 if terminals[i] or timeouts[i] else episode_step + 1
    keep = ~timeouts[: n - 1]
    index = np.nonzero(keep)[0]
    # An episode's last kept transition: a terminal, a row followed by a timeout row, or the last row.
    followed_by_timeout = np.append(timeouts[1:n - 1], True)
    episode_ends = terminals[: n - 1] | followed_by_timeout
    return {
        "observations": raw["observations"][index].astype(np.float32),
        "actions": raw["actions"][index].astype(np.float32),
        "rewards": raw["rewards"].reshape(n)[index].astype(np.float32),
        "next_observations": raw["observations"][index + 1].astype(np.float32),
        "terminals": terminals[index].astype(np.float32),
        "episode_ends": episode_ends[index],
    }


def stored_next_transitions(raw: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Transitions of a file that stores next_observations: every row is kept.

    A timed-out row keeps its transition (its next observation is in the file), so these are the
    same transitions as a Minari dataset of the same episodes. An episode ends at a terminal, a
    timeout or the last row.
    """
    n = len(raw["observations"])
    terminals = raw["terminals"].astype(bool).reshape(n)
    episode_ends = terminals | (raw["timeouts"].astype(bool).reshape(n) if "timeouts" in raw else False)
    episode_ends[-1] = True
    return {
        "observations": raw["observations"].astype(np.float32),
        "actions": raw["actions"].astype(np.float32),
        "rewards": raw["rewards"].reshape(n).astype(np.float32),
        "next_observations": raw["next_observations"].astype(np.float32),
        "terminals": terminals.astype(np.float32),
        "episode_ends": episode_ends,
    }


def d4rl_transitions(raw: Dict[str, Any], info: DatasetInfo, max_episode_steps: int,
                     use_next_observations: bool = False) -> Dict[str, np.ndarray]:
    """Checked transitions of a D4RL-layout file; its reference returns fill in those info lacks.

    `d4rl:` names follow d4rl.qlearning_dataset (as CORL and the published numbers do); other
    files use their own next_observations when they have them.
    """
    check_finite(raw, info.source)
    if info.ref_min_score is None and "ref_min_score" in raw and "ref_max_score" in raw:
        info.ref_min_score, info.ref_max_score = float(raw["ref_min_score"]), float(raw["ref_max_score"])
    if use_next_observations and "next_observations" in raw:
        return stored_next_transitions(raw)
    return qlearning_transitions(raw, max_episode_steps)


def minari_transitions(dataset: Any) -> Dict[str, np.ndarray]:
    """Every step of every episode of a Minari dataset; goal-dict observations are flattened."""
    columns: Dict[str, List[np.ndarray]] = {key: [] for key in
                                            ("observations", "actions", "rewards", "next_observations",
                                             "terminals", "episode_ends")}
    for episode in dataset.iterate_episodes():
        observations = flatten_observation(episode.observations)
        steps = len(episode.actions)
        ends = np.zeros(steps, dtype=bool)
        ends[-1] = True
        columns["observations"].append(observations[:-1])
        columns["next_observations"].append(observations[1:])
        columns["actions"].append(np.asarray(episode.actions).reshape(steps, -1))
        columns["rewards"].append(np.asarray(episode.rewards).reshape(steps))
        columns["terminals"].append(np.asarray(episode.terminations).reshape(steps))
        columns["episode_ends"].append(ends)
    if not columns["observations"]:
        raise UserError(f"Minari dataset {dataset.spec.dataset_id} has no episodes")
    data = {key: np.concatenate(value) for key, value in columns.items()}
    for key in ("observations", "actions", "rewards", "next_observations", "terminals"):
        data[key] = data[key].astype(np.float32)
    return data


def load_minari(dataset_id: str) -> Tuple[Dict[str, np.ndarray], DatasetInfo]:
    try:
        import minari
    except ImportError:
        raise UserError("minari: datasets need the minari package (pip install minari)") from None
    try:
        dataset = minari.load_dataset(dataset_id, download=True)
    except Exception as error:
        root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        raise UserError(f"cannot load Minari dataset '{dataset_id}' (local root {root}): "
                        f"{str(error).strip().splitlines()[0]}") from None
    metadata = dataset.storage.metadata
    spec = dataset.env_spec
    parts = dataset_id.split("/")
    info = DatasetInfo(f"minari:{dataset_id}", spec.id if spec is not None else "",
                       domain_of(parts[1] if len(parts) > 2 else dataset_id),
                       metadata.get("ref_min_score"), metadata.get("ref_max_score"), env_spec=spec)
    data = minari_transitions(dataset)
    check_finite(data, f"Minari dataset {dataset_id}")
    return data, info


def local_data_root() -> Path:
    """Where data made on this machine live: $EDIS_DATA_DIR, default ~/.cache/edis-datasets."""
    return Path(os.environ.get("EDIS_DATA_DIR", Path.home() / ".cache" / "edis-datasets")).expanduser()


def random_dataset_path(env_id: str, transitions: int) -> Path:
    return local_data_root() / f"random-{env_id}-{transitions}.hdf5"


COLLECTED_KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")


def collected_dataset_path(source: str) -> Path:
    """collected:<EnvId>:<kind>[:<seed>] -> the D4RL-layout file that benchmarks/collect.py writes."""
    match = re.fullmatch(r"collected:([^:]+):([a-z-]+)(?::(\d+))?", source)
    if not match or match.group(2) not in COLLECTED_KINDS:
        raise UserError(f"bad dataset '{source}': use collected:<EnvId>:<kind>[:<seed>] with kind one of "
                        f"{', '.join(COLLECTED_KINDS)}, e.g. collected:Hopper-v5:medium-replay")
    env_id, kind, seed = match.group(1), match.group(2), int(match.group(3) or 0)
    path = local_data_root() / "collected" / f"{env_id}-seed{seed}" / f"{kind}.hdf5"
    if not path.is_file():
        seed_option = f" --seed {seed}" if seed else ""
        raise UserError(f"{source} has not been collected yet ({path} is missing); make it with: "
                        f"python benchmarks/collect.py --env {env_id} --kinds {kind}{seed_option}")
    return path


def collect_random_dataset(env_id: str, transitions: int, path: Path, seed: int = 0) -> None:
    """Rolls out a uniform random policy and writes the steps as a D4RL-layout HDF5 file."""
    env = make_env(DatasetInfo(f"random:{env_id}", env_id, domain_of(env_id)), seed=seed)
    env.action_space.seed(seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    columns = {
        "observations": np.zeros((transitions, obs_dim), np.float32),
        "actions": np.zeros((transitions, act_dim), np.float32),
        "rewards": np.zeros(transitions, np.float32),
        "next_observations": np.zeros((transitions, obs_dim), np.float32),
        "terminals": np.zeros(transitions, bool),
        "timeouts": np.zeros(transitions, bool),
    }
    state, _ = env.reset(seed=seed)
    for i in tqdm(range(transitions), desc=f"random {env_id}", unit="step", mininterval=1.0):
        action = env.action_space.sample()
        next_state, reward, terminated, truncated, _ = env.step(action)
        columns["observations"][i], columns["actions"][i], columns["rewards"][i] = state, action, reward
        columns["next_observations"][i], columns["terminals"][i], columns["timeouts"][i] = (
            next_state, terminated, truncated)
        state = env.reset()[0] if terminated or truncated else next_state
    env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")  # parallel runs may make the same file
    with h5py.File(partial, "w") as file:
        for key, value in columns.items():
            file.create_dataset(key, data=value)
        file.attrs["env_id"] = env_id
        domain = domain_of(env_id)
        if domain in LOCOMOTION_ENVS:  # the D4RL constants fit the v5 locomotion envs closely enough
            file.attrs["ref_min_score"], file.attrs["ref_max_score"] = D4RL_REF_SCORES[domain]
    os.replace(partial, path)


def offline_alternative(name: str) -> str:
    """For a D4RL locomotion name: the CPU-sized config that runs on data made here instead."""
    match = re.fullmatch(r"(hopper|walker2d|halfcheetah)-(random|medium|medium-replay|medium-expert|expert)-v2", name)
    if not match:
        return ""
    env = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}[match.group(1)]
    config = Path("configs") / "cpu" / f"{match.group(1)}-{match.group(2)}.yaml"
    run = f" && python algorithms/{ALGORITHM}.py --config {config}" if config.is_file() else ""
    return (f"; or, without internet, make D4RL-style data here: python benchmarks/collect.py --env {env} --kinds "
            f"{match.group(2)}{run}")


def load_dataset(source: str, env_override: str = "") -> Tuple[Dict[str, np.ndarray], DatasetInfo]:
    """Offline transitions (float32 arrays) and their DatasetInfo from a dataset string."""
    scheme, _, rest = source.partition(":")
    if scheme == "d4rl":
        url, info = d4rl_file(rest)
        path = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser() / url.rsplit("/", 1)[1]
        if not path.is_file():
            try:
                download(url, path)
            except Exception as error:
                raise UserError(f"{rest}: {path} is missing and the download failed ({error}); download {url} "
                                f"and put it at {path} (or set D4RL_DATASET_DIR){offline_alternative(rest)}") from None
        data = d4rl_transitions(read_d4rl_hdf5(path), info, info.max_episode_steps or 1000)
    elif scheme == "minari":
        data, info = load_minari(rest)
    elif scheme in ("hdf5", "collected"):
        raw = read_d4rl_hdf5(collected_dataset_path(source) if scheme == "collected" else Path(rest).expanduser())
        env_id = env_override or raw.get("env_id", "")
        if not env_id:
            raise UserError(f"{rest} names no env (no 'env_id' attribute): set env in the config or --env")
        info = DatasetInfo(source, env_id, domain_of(env_id))
        data = d4rl_transitions(raw, info, max_episode_steps_of(make_env(info)) if "timeouts" not in raw else 1000,
                                use_next_observations=True)
    elif scheme == "random":
        match = re.fullmatch(r"([^:]+):(\d+)", rest)
        if not match or int(match.group(2)) < 2:
            raise UserError(f"bad dataset '{source}': use random:<EnvId>:<transitions>, e.g. random:Hopper-v5:20000")
        env_id, transitions = match.group(1), int(match.group(2))
        path = random_dataset_path(env_id, transitions)
        if not path.is_file():
            collect_random_dataset(env_id, transitions, path)
        info = DatasetInfo(source, env_id, domain_of(env_id))
        data = d4rl_transitions(read_d4rl_hdf5(path), info, 1000, use_next_observations=True)
    else:
        raise UserError(f"unknown dataset scheme in '{source}': use d4rl:<name>, minari:<id>, hdf5:<path>, "
                        "collected:<EnvId>:<kind> or random:<EnvId>:<transitions>")
    if env_override:
        info.env_id, info.env_spec, info.antmaze_maze = env_override, None, None
    if len(data["observations"]) == 0:
        raise UserError(f"{source}: no transitions left after removing timeouts")
    return data, info


def episode_returns(rewards: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
    """Undiscounted return of every complete episode in the transition arrays."""
    ends = np.nonzero(episode_ends)[0]
    sums = np.cumsum(rewards, dtype=np.float64)[ends]
    return np.diff(np.concatenate([[0.0], sums]))


def reward_transform(data: Dict[str, np.ndarray], info: DatasetInfo, normalize_reward: bool,
                     reward_scale: float, reward_bias: float, max_episode_steps: int) -> Tuple[float, float]:
    """(scale, bias) with trained reward = scale * env reward + bias, CORL's modify_reward.

    normalize_reward rescales locomotion rewards so that the dataset's return range spans
    max_episode_steps; reward_scale and reward_bias then apply to every domain.
    """
    scale = 1.0
    if normalize_reward and info.domain in LOCOMOTION_ENVS:
        returns = episode_returns(data["rewards"], data["episode_ends"])
        if len(returns) > 1 and returns.max() > returns.min():
            scale = max_episode_steps / float(returns.max() - returns.min())
    return scale * reward_scale, reward_bias


def state_statistics(observations: np.ndarray, normalize: bool, eps: float = 1e-3) -> Tuple[np.ndarray, np.ndarray]:
    if not normalize:
        return np.zeros(observations.shape[1], np.float32), np.ones(observations.shape[1], np.float32)
    return observations.mean(0).astype(np.float32), (observations.std(0) + eps).astype(np.float32)
# ==== END SHARED: datasets ====


# ==== BEGIN SHARED: environment ====
# D4RL AntMaze v2 evaluation mazes (row 0 at the top, r: start, g: goal), 4 units per cell.
D4RL_ANTMAZE_MAPS = {
    "umaze": ["11111", "1r001", "11101", "1g001", "11111"],
    "medium": ["11111111", "1r011001", "10010001", "11000111", "10010001", "10100101", "100010g1", "11111111"],
    "large": ["111111111111", "1r0001000001", "101101010101", "100000010001", "101111011101", "100101000001",
              "110101010111", "100100010g01", "111111111111"],
}
ANTMAZE_ENV_IDS = {"umaze": "AntMaze_UMaze-v4", "medium": "AntMaze_Medium-v4", "large": "AntMaze_Large-v4"}


class D4RLAntMaze(gym.Wrapper):
    """gymnasium-robotics AntMaze laid out, observed and rewarded as D4RL's antmaze-*-v2.

    D4RL puts the start cell at the origin and y grows with the map row; gymnasium-robotics
    centres the map and y falls with the row. Building the gymnasium maze from the D4RL map
    upside down makes the two worlds differ by a translation only, so joint angles and
    velocities are untouched and the observation is D4RL's 29 numbers: the torso xy in D4RL
    coordinates, then the 27 of the gymnasium observation. The goal is D4RL's: the goal cell plus
    D4RL's one-sided noise, drawn once per env; reward is 1 within 0.5 of it, and episodes only
    end by time limit.
    """

    def __init__(self, maze: str, max_episode_steps: int, seed: Optional[int] = None):
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
        rows = D4RL_ANTMAZE_MAPS[maze]
        cells = [[int(c) if c in "01" else c for c in row] for row in reversed(rows)]
        env = gym.make(ANTMAZE_ENV_IDS[maze], maze_map=cells, continuing_task=True, reset_target=False,
                       max_episode_steps=max_episode_steps)
        super().__init__(env)
        base = env.unwrapped
        base.position_noise_range = 0.0  # D4RL starts the ant at the start cell's centre
        start_row = next(i for i, row in enumerate(cells) if "r" in row)
        self.origin = base.maze.cell_rowcol_to_xy(np.array([start_row, cells[start_row].index("r")]))
        goal_row, goal_col = next((i, row.index("g")) for i, row in enumerate(rows) if "g" in row)
        start_row_d4rl, start_col_d4rl = next((i, row.index("r")) for i, row in enumerate(rows) if "r" in row)
        rng, size = np.random.default_rng(seed), 4.0
        goal = np.array([goal_col - start_col_d4rl, goal_row - start_row_d4rl], dtype=np.float64) * size
        goal += rng.uniform(0, 0.25 * size, 2) + rng.uniform(0, 0.5, 2) * 0.25 * size
        self.goal = np.maximum(goal, 0.0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (29,), np.float64)

    def _observe(self, obs: Dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([obs["achieved_goal"] - self.origin, obs["observation"]])

    def _place_goal(self) -> None:
        base = self.env.unwrapped
        base.goal = self.goal + self.origin
        base.update_target_site_pos()

    def reset(self, **kwargs: Any) -> Tuple[np.ndarray, Dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._place_goal()
        info["success"] = bool(np.linalg.norm(obs["achieved_goal"] - self.origin - self.goal) <= 0.5)
        return self._observe(obs), info

    def step(self, action: np.ndarray) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        obs, _, _, truncated, info = self.env.step(action)
        success = bool(np.linalg.norm(obs["achieved_goal"] - self.origin - self.goal) <= 0.5)
        info["success"] = success
        return self._observe(obs), float(success), False, truncated, info


def flatten_observation(observation: Any) -> np.ndarray:
    """Goal-dict observations become [achieved_goal, observation], D4RL's AntMaze layout."""
    if isinstance(observation, dict):
        return np.concatenate([np.asarray(observation["achieved_goal"]), np.asarray(observation["observation"])],
                              axis=-1)
    return np.asarray(observation)


class FlattenGoalObservation(gym.ObservationWrapper):
    def __init__(self, env: gym.Env):
        super().__init__(env)
        size = sum(env.observation_space[key].shape[0] for key in ("achieved_goal", "observation"))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float64)

    def observation(self, observation: Dict[str, np.ndarray]) -> np.ndarray:
        return flatten_observation(observation)


class NormalizeState(gym.ObservationWrapper):
    """Standardises observations with the offline dataset's statistics (CORL's wrap_env)."""

    def __init__(self, env: gym.Env, mean: np.ndarray, std: np.ndarray):
        super().__init__(env)
        self.mean, self.std = mean, std

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return ((observation - self.mean) / self.std).astype(np.float32)


def make_env(info: DatasetInfo, seed: Optional[int] = None) -> gym.Env:
    """The gymnasium env of a dataset: raw observations, float64."""
    if info.env_id.startswith(("AdroitHand", "AntMaze", "PointMaze", "D4RLAntMaze")) or info.env_spec is not None:
        try:
            import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)
        except ImportError:
            pass
    try:
        if info.antmaze_maze is not None:
            env = D4RLAntMaze(info.antmaze_maze, info.max_episode_steps or 1000, seed=seed)
        elif info.env_spec is not None:
            env = gym.make(info.env_spec)
        else:
            env = gym.make(info.env_id, **({"max_episode_steps": info.max_episode_steps}
                                           if info.max_episode_steps else {}))
    except gym.error.Error as error:
        raise UserError(f"cannot make env '{info.env_id}': {str(error).splitlines()[0]}") from None
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = FlattenGoalObservation(env)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise UserError(f"env '{info.env_id}' has a {type(env.action_space).__name__} action space; "
                        "these algorithms need continuous (Box) actions")
    return env


def check_dataset_matches_env(data: Dict[str, np.ndarray], env: gym.Env, info: DatasetInfo) -> None:
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if data["observations"].shape[1] != obs_dim:
        raise UserError(f"{info.source}: observations have {data['observations'].shape[1]} numbers but env "
                        f"'{info.env_id}' gives {obs_dim}")
    if data["actions"].shape[1] != act_dim:
        raise UserError(f"{info.source}: actions have {data['actions'].shape[1]} numbers but env "
                        f"'{info.env_id}' takes {act_dim}")


def max_episode_steps_of(env: gym.Env) -> int:
    return int(env.spec.max_episode_steps) if env.spec is not None and env.spec.max_episode_steps else 1000


class OnlineCollector:
    """Steps the training env one transition at a time and keeps the episode statistics.

    Only `terminated` ends a return (done = 1); `truncated` is a time limit, after which the
    env is reset and the stored transition keeps done = 0.
    """

    def __init__(self, env: gym.Env, info: DatasetInfo, seed: int, reward_scale: float, reward_bias: float):
        self.env, self.info, self.seed = env, info, seed
        self.reward_scale, self.reward_bias = reward_scale, reward_bias
        self.episodes = 0
        self.normalized_returns: List[float] = []
        self.successes: List[float] = []
        self.env_steps = 0
        env.action_space.seed(seed)
        self._start_episode()

    def _start_episode(self) -> None:
        """Each episode's reset seed follows from (seed, episode index), so that a resumed run can start any
        episode exactly as the uninterrupted run did, with no env RNG state to carry."""
        episode_seed = int(np.random.SeedSequence([self.seed, self.episodes]).generate_state(1)[0])
        self.state, _ = self.env.reset(seed=episode_seed)
        self.episode_return, self.episode_length, self.episode_success = 0.0, 0, False

    def state_dict(self) -> Dict[str, Any]:
        return {"episodes": self.episodes, "env_steps": self.env_steps, "episode_length": self.episode_length,
                "normalized_returns": list(self.normalized_returns), "successes": list(self.successes)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores the counters and starts the current episode again from its reset (its steps so far are
        in the replay buffer already; the snapshot is normally taken between episodes)."""
        self.episodes, self.env_steps = state["episodes"], state["env_steps"]
        self.normalized_returns, self.successes = list(state["normalized_returns"]), list(state["successes"])
        if state["episode_length"]:
            print(f"note: the snapshot was taken {state['episode_length']} steps into an episode; that episode "
                  "starts again from its reset", file=sys.stderr)
        self._start_episode()

    def step(self, action: np.ndarray) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, float]]]:
        try:
            next_state, reward, terminated, truncated, env_info = self.env.step(action)
        except Exception as error:  # the env itself failed: no more online data can come
            raise UserError(f"env {self.info.env_id} raised {type(error).__name__} at online step "
                            f"{self.env_steps + 1}: {str(error).splitlines()[0] if str(error) else '(no message)'}"
                            ) from None
        transition = {
            "states": self.state,
            "actions": action,
            "rewards": np.array([reward * self.reward_scale + self.reward_bias], np.float32),
            "next_states": next_state,
            "dones": np.array([float(terminated)], np.float32),
        }
        self.env_steps += 1
        self.episode_return += float(reward)
        self.episode_length += 1
        self.episode_success |= bool(env_info.get("success", env_info.get("goal_achieved", False)))
        self.state = next_state
        episode_log = None
        if terminated or truncated:
            episode_log = {"train/episode_return": self.episode_return,
                           "train/episode_length": float(self.episode_length)}
            if self.info.has_reference:
                normalized = self.info.normalized_score(self.episode_return)
                self.normalized_returns.append(normalized)
                episode_log["train/normalized_episode_return"] = normalized
            if self.info.domain in SUCCESS_DOMAINS:
                self.successes.append(float(self.episode_success))
                episode_log["train/success"] = float(self.episode_success)
                episode_log["train/regret"] = float(np.mean(1.0 - np.array(self.successes)))
            elif self.normalized_returns:
                episode_log["train/regret"] = float(np.mean(1.0 - np.array(self.normalized_returns) / 100.0))
            episode_log["env_steps"] = self.env_steps
            self.episodes += 1
            self._start_episode()
        return transition, episode_log
# ==== END SHARED: environment ====


# ==== BEGIN SHARED: replay buffer ====
class ReplayBuffer:
    """Fixed-capacity ring buffer of named float32 columns, stored on the training device."""

    def __init__(self, capacity: int, columns: Dict[str, int], device: torch.device):
        self.capacity, self.device = capacity, device
        self.data = {name: torch.zeros((capacity, width), dtype=torch.float32, device=device)
                     for name, width in columns.items()}
        self.size, self.pointer = 0, 0
        self.rebuilt_rows = 0  # leading rows a resumed run loads again from the dataset: snapshots leave them out

    def __len__(self) -> int:
        return self.size

    def add_batch(self, **columns: Any) -> None:
        """Appends rows (arrays or tensors with a leading batch dimension); old rows are overwritten when full."""
        count = len(next(iter(columns.values())))
        if set(columns) != set(self.data):
            raise ValueError(f"columns {sorted(columns)} do not match the buffer's {sorted(self.data)}")
        if count > self.capacity:
            raise ValueError(f"{count} rows do not fit a buffer of capacity {self.capacity}")
        index = (self.pointer + torch.arange(count, device=self.device)) % self.capacity
        for name, values in columns.items():
            values = torch.as_tensor(values, dtype=torch.float32, device=self.device)
            self.data[name][index] = values.reshape(count, -1)
        self.pointer = (self.pointer + count) % self.capacity
        self.size = min(self.size + count, self.capacity)

    def add(self, **row: Any) -> None:
        self.add_batch(**{name: np.asarray(value, dtype=np.float32)[None] for name, value in row.items()})

    def sample(self, batch_size: int) -> Dict[str, torch.Tensor]:
        index = torch.randint(0, self.size, (batch_size,), device=self.device)
        return {name: column[index] for name, column in self.data.items()}

    def state_dict(self) -> Dict[str, Any]:
        """The rows for a snapshot; the first `rebuilt_rows` are left out unless the ring has wrapped over them."""
        first = self.rebuilt_rows if self.size < self.capacity else 0
        return {"first": first, "size": self.size, "pointer": self.pointer,
                "rows": {name: column[first:self.size].clone() for name, column in self.data.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, rows in state["rows"].items():
            self.data[name][state["first"]:state["first"] + len(rows)] = rows.to(self.device)
        self.size, self.pointer = state["size"], state["pointer"]


def transition_columns(data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Offline arrays under the replay buffer's column names."""
    return {"states": data["observations"], "actions": data["actions"], "rewards": data["rewards"][:, None],
            "next_states": data["next_observations"], "dones": data["terminals"][:, None]}
# ==== END SHARED: replay buffer ====


# ==== BEGIN SHARED: evaluation ====
def make_eval_envs(info: DatasetInfo, state_mean: np.ndarray, state_std: np.ndarray, count: int,
                   seed: int) -> gym.vector.VectorEnv:
    """`count` evaluation envs side by side: one batched policy call per step serves all of them.

    Every copy is built with the same seed (an AntMaze goal is drawn once per env, as in D4RL);
    episodes differ by their reset seeds. Resets are ours (autoreset off), so that each step's
    info belongs to the episode that took it.
    """
    def make() -> gym.Env:
        return NormalizeState(make_env(info, seed=seed), state_mean, state_std)

    return gym.vector.SyncVectorEnv([make] * count, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


def evaluate(envs: gym.vector.VectorEnv, act: Callable[[np.ndarray], np.ndarray], info: DatasetInfo,
             n_episodes: int, seed: int) -> Dict[str, float]:
    """Mean return over n_episodes, run side by side in `envs` (each copy takes its share in turn).

    Seeded once, so the same seed gives the same episodes. A copy that has run its share keeps
    stepping (a vector env steps all copies) but its episodes are not counted.
    """
    count = envs.num_envs
    share = np.array([n_episodes // count + (i < n_episodes % count) for i in range(count)])
    states, _ = envs.reset(seed=seed)
    running, succeeded = np.zeros(count), np.zeros(count, dtype=bool)
    returns: List[float] = []
    successes: List[float] = []
    while share.any():
        states, rewards, terminated, truncated, step_info = envs.step(act(states))
        running += rewards
        for key in ("success", "goal_achieved"):
            if key in step_info:
                succeeded |= np.asarray(step_info[key], dtype=bool) & step_info[f"_{key}"]
        done = terminated | truncated
        counted = done & (share > 0)
        returns.extend(running[counted].tolist())
        successes.extend(succeeded[counted].astype(float).tolist())
        share -= counted
        if done.any():
            reset_states, _ = envs.reset(options={"reset_mask": done})
            states = np.where(done[:, None], reset_states, states)
            running[done], succeeded[done] = 0.0, False
    metrics = {"eval/return": float(np.mean(returns)), "eval/return_std": float(np.std(returns))}
    if info.has_reference:
        metrics["eval/normalized_score"] = info.normalized_score(metrics["eval/return"])
    if info.domain in SUCCESS_DOMAINS:
        metrics["eval/success_rate"] = float(np.mean(successes))
    return metrics


def evaluation_due(step: int, config: Any) -> bool:
    """After update `step` (offline updates, then online steps): every offline_eval_freq offline
    updates, every eval_freq online steps, and at the end of each phase."""
    if step <= config.offline_iterations:
        return step % config.offline_eval_freq == 0 or step == config.offline_iterations
    online_step = step - config.offline_iterations
    return online_step % config.eval_freq == 0 or online_step == config.online_iterations
# ==== END SHARED: evaluation ====


# ==== BEGIN SHARED: logging and checkpoints ====
def default_run_name(config: Any) -> str:
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", config.dataset.split(":", 1)[-1]).strip("-")[-60:]
    return f"{ALGORITHM}-{dataset}-seed{config.seed}-{uuid.uuid4().hex[:8]}"


def package_versions() -> Dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gym.__version__,
                "numpy": np.__version__}
    try:
        import mujoco

        versions["mujoco"] = mujoco.__version__
    except ImportError:
        versions["mujoco"] = "not installed"
    return versions


def run_machine(device: torch.device) -> Dict[str, Any]:
    """Where the run ran, so that wall-clock numbers can be compared: CPU, cores, torch threads, device. A virtual
    machine's model name ("AMD EPYC") can hide the CPU's generation, so its family/model/stepping and the vector
    instructions torch uses (AVX2, AVX512) are kept too: a one-thread run repeats exactly only where they match."""
    cpu, cpu_id = platform.processor() or platform.machine(), ""
    try:
        info: Dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        cpu = info.get("model name", cpu)
        cpu_id = " ".join(f"{key} {info[key]}" for key in ("cpu family", "model", "stepping") if key in info)
    except OSError:
        pass
    machine = {"cpu": cpu, "cpu_id": cpu_id, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


class RunLogger:
    """Writes log_dir/<name>/ (config.yaml, metrics.jsonl, summary.json) and mirrors metrics to W&B.

    A resumed run passes the snapshot's `logger` state: metrics.jsonl is cut back to what it held at
    the snapshot (no step is logged twice) and the W&B run of that id continues.
    """

    def __init__(self, config: Any, info: DatasetInfo, resumed: Optional[Dict[str, Any]] = None):
        self.run_dir = Path(config.log_dir) / config.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "config.yaml", "w") as file:
            pyrallis.dump(config, file)
        metrics_path = self.run_dir / "metrics.jsonl"
        self.history: List[Dict[str, Any]] = []
        if resumed is not None:
            with open(metrics_path, "r+b") as file:
                file.truncate(resumed["metrics_bytes"])
            self.history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        self.metrics_file = open(metrics_path, "a", buffering=1)  # a line per event, flushed
        if not info.has_reference:
            print(f"note: {info.source} has no reference returns; scores are raw returns (eval/return)",
                  file=sys.stderr)
        self.wandb_id = resumed["wandb_id"] if resumed is not None else uuid.uuid4().hex
        self.wandb = None
        if config.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(config=asdict(config), project=config.project, group=config.group,
                                    name=config.name, id=self.wandb_id, mode=config.wandb_mode,
                                    dir=str(self.run_dir), resume="allow")

    def state_dict(self) -> Dict[str, Any]:
        return {"metrics_bytes": self.metrics_file.tell(), "wandb_id": self.wandb_id}

    def log(self, metrics: Dict[str, float], step: int, phase: str) -> None:
        record = {"step": step, "phase": phase, **metrics}
        self.history.append(record)
        self.metrics_file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        partial = self.run_dir / "summary.json.part"
        partial.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(partial, self.run_dir / "summary.json")

    def close(self) -> None:
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def result_line(summary: Dict[str, Any], path: Path) -> str:
    """The run's result in one line: final (and best) evaluation of each phase, and where its summary is."""
    metric = summary["score_metric"].split("/", 1)[1]
    parts = []
    for phase in ("offline", "online"):
        values = summary[phase]
        if values[f"final_{metric}"] is not None:
            part = f"{phase} {values[f'final_{metric}']:.1f} (best {values[f'best_{metric}']:.1f})"
            if values["final_success_rate"] is not None:
                part += f", success {values['final_success_rate']:.2f} (best {values['best_success_rate']:.2f})"
            parts.append(part)
    label = "normalised score" if metric == "normalized_score" else "return"
    return f"done: {label} {'; '.join(parts) or 'not evaluated'}; summary: {path}"


def phase_summary(history: List[Dict[str, Any]], phase: str) -> Dict[str, Any]:
    """Final and best evaluation metrics of one phase."""
    evaluations = [record for record in history if record["phase"] == phase and "eval/return" in record]
    summary: Dict[str, Any] = {"evaluations": len(evaluations)}
    for key in ("eval/normalized_score", "eval/return", "eval/success_rate"):
        values = [record[key] for record in evaluations if key in record]
        name = key.split("/", 1)[1]
        summary[f"final_{name}"] = values[-1] if values else None
        summary[f"best_{name}"] = max(values) if values else None
    return summary


class FiniteGuard:
    """Catches NaN or inf in the per-update values (losses, mean Q or V) without a device sync per update.

    `watch` stacks one update's values and keeps, on the device, the first update at which each went
    bad; `check` reads that (one sync) at log and snapshot points and stops the run, naming the value
    and the update. A snapshot is written only after a check, so the last snapshot is a good one.
    """

    def __init__(self) -> None:
        self.names: Tuple[str, ...] = ()
        self.first_bad: Optional[torch.Tensor] = None

    def watch(self, values: Dict[str, torch.Tensor], step: int) -> None:
        if tuple(values) != self.names:  # another set of values (a new phase): check the old set first
            self.check()
            self.names = tuple(values)
            self.first_bad = torch.full((len(values),), -1, dtype=torch.long,
                                        device=next(iter(values.values())).device)
        bad = ~torch.isfinite(torch.stack([value.detach().float().reshape(()) for value in values.values()]))
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self) -> None:
        if self.first_bad is None:
            return
        for name, step in zip(self.names, self.first_bad.tolist(), strict=True):
            if step >= 0:
                raise NonFiniteError(f"train/{name} became NaN or inf at update {step}")


def rng_states() -> Dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


class Snapshots:
    """<run dir>/snapshot.pt: everything a killed run needs to go on (see `--resume`).

    Written every `every` steps, but in the online phase only between episodes (so that a resumed run
    replays no partial episode), unless an episode outlasts `patience` more steps. Written to a temporary
    name, synced, then renamed: a kill at any moment leaves the previous snapshot or the new one, whole.
    """

    def __init__(self, run_dir: Path, every: int):
        self.path, self.every, self.due_since = run_dir / "snapshot.pt", every, None

    def due(self, step: int, episode_running: bool, patience: int) -> bool:
        if self.every <= 0:
            return False
        if step % self.every == 0 and self.due_since is None:
            self.due_since = step
        if self.due_since is None or (episode_running and step - self.due_since < patience):
            return False
        self.due_since = None
        return True

    def save(self, payload: Dict[str, Any]) -> None:
        partial = self.path.with_name(self.path.name + ".part")
        with open(partial, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @staticmethod
    def load(run_dir: Path, device: torch.device) -> Dict[str, Any]:
        path = run_dir / "snapshot.pt"
        if not path.is_file():
            raise UserError(f"no snapshot in {run_dir} (snapshot.pt)")
        try:
            return torch.load(path, map_location=device, weights_only=False)
        except Exception as error:  # damaged outside the run: its own writes are atomic
            raise UserError(f"snapshot {path} is unreadable: {str(error).splitlines()[0]}") from None


class Run:
    """What surrounds train()'s loop and is not the algorithm: the run folder and its logs, the progress bar,
    wall-clock per phase, evaluation checkpoints, --load_model, resumable snapshots (--resume), the NaN/inf guard
    and summary.json. Nothing here changes what the algorithm computes.

    `with Run(...) as run:` closes the envs at the end; a failure that leaves a snapshot says how to resume it.
    """

    def __init__(self, config: Any, info: DatasetInfo, device: torch.device, title: str, transitions: int,
                 patience: int, closing: Sequence[Any] = ()):
        self.config, self.info, self.device, self.title, self.closing = config, info, device, title, closing
        self.pretrained = load_checkpoint(config.load_model, device) if config.load_model else None
        self.snapshot = Snapshots.load(Path(config.resume), device) if config.resume else None
        config.name = config.name or default_run_name(config)
        self.logger = RunLogger(config, info, resumed=self.snapshot["logger"] if self.snapshot else None)
        self.snapshots, self.guard = Snapshots(self.logger.run_dir, config.snapshot_every), FiniteGuard()
        self.patience = patience  # steps a due online snapshot may wait for the episode to end
        self.checkpoint_dir = Path(config.checkpoints_path) / config.name if config.checkpoints_path else None
        self.score_key = "eval/normalized_score" if info.has_reference else "eval/return"
        self.seconds, self.updates = {"offline": 0.0, "online": 0.0}, {"offline": 0, "online": 0}
        self.state: Dict[str, Any] = {}
        self.progress: Optional[tqdm] = None
        self.postfix: Dict[str, str] = {}
        print(f"{title} on {info.source} ({info.env_id}), {transitions} transitions, device {device}, "
              f"logs in {self.logger.run_dir}")

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind: Any, error: Optional[BaseException], traceback: Any) -> None:
        if self.progress is not None:
            self.progress.close()
        for env in self.closing:
            env.close()
        if isinstance(error, UserError) and self.snapshots.path.is_file():
            raise UserError(f"{error} (the last snapshot is kept: python {sys.argv[0]} --resume "
                            f"{self.logger.run_dir})") from None

    def steps(self, state: Dict[str, Any]) -> Iterator[int]:
        """The loop's t, under a progress bar. `state` names what a snapshot holds (objects with state_dict and
        load_state_dict). A --load_model checkpoint fills the objects it names and the loop starts online; a
        --resume snapshot fills them all and the loop goes on where it stopped."""
        config, first_step, self.state = self.config, 0, state
        if self.pretrained is not None:
            for name, value in state.items():
                if name in self.pretrained:
                    value.load_state_dict(self.pretrained[name])
            first_step = config.offline_iterations
        if self.snapshot is not None:
            for name, value in state.items():
                value.load_state_dict(self.snapshot["state"][name])
            first_step, self.seconds, self.updates = (self.snapshot[key] for key in ("step", "seconds", "updates"))
            restore_rng_states(self.snapshot["rng"])
            print(f"resumed {self.logger.run_dir} at step {first_step}")
        total = config.offline_iterations + config.online_iterations
        self.progress = tqdm(range(first_step, total), initial=first_step, total=total, desc=self.title,
                             mininterval=1.0)
        self.postfix["phase"] = "offline" if first_step < config.offline_iterations else "online"
        self.clock = time.perf_counter()
        for t in self.progress:
            if t == config.offline_iterations:
                self.postfix["phase"] = "online"
                self.progress.set_postfix(self.postfix)
            yield t
        self.guard.check()  # the updates since the last check

    def log(self, metrics: Dict[str, float], step: int, phase: str) -> None:
        self.logger.log(metrics, step, phase)

    def log_step(self, step: int, phase: str, losses: Dict[str, torch.Tensor],
                 episode_log: Optional[Dict[str, float]] = None) -> None:
        """Counts the update and watches its values for NaN/inf; logs them every log_freq steps, and the
        online episode that ended at this step."""
        self.updates[phase] += 1
        self.guard.watch(losses, step)
        if step % self.config.log_freq == 0:
            self.guard.check()
            self.logger.log({f"train/{name}": value.item() for name, value in losses.items()}, step, phase)
        if episode_log is not None:
            self.logger.log(episode_log, step, phase)

    def evaluated(self, metrics: Dict[str, float], step: int, phase: str,
                  checkpoint: Callable[[], Dict[str, Any]]) -> None:
        """Logs an evaluation; with checkpoints_path set, saves checkpoint_<step>.pt holding `checkpoint()`."""
        self.logger.log(metrics, step, phase)
        if self.progress is not None:
            self.postfix[self.score_key.split("/")[1]] = f"{metrics[self.score_key]:.1f}"
            self.progress.set_postfix(self.postfix)
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir / f"checkpoint_{step}.pt",
                            {"algorithm": ALGORITHM, "step": step, "phase": phase, "config": asdict(self.config),
                             **checkpoint()})

    def end_step(self, step: int, phase: str, episode_running: bool) -> None:
        """The step's wall-clock; a snapshot when one is due (online, between episodes)."""
        now = time.perf_counter()
        self.seconds[phase], self.clock = self.seconds[phase] + now - self.clock, now
        if self.snapshots.due(step, phase == "online" and episode_running, self.patience):
            self.guard.check()  # never snapshot a run that has gone bad
            self.snapshots.save({"algorithm": ALGORITHM, "config": asdict(self.config), "step": step,
                                 "seconds": self.seconds, "updates": self.updates,
                                 "state": {name: value.state_dict() for name, value in self.state.items()},
                                 "logger": self.logger.state_dict(), "rng": rng_states()})

    def finish(self, env_steps: int, **extra: Any) -> Dict[str, Any]:
        """Writes summary.json (final and best evaluation per phase, wall-clock, versions, machine) and ends the
        run: its summary and checkpoints are what remains, the snapshots go."""
        summary = {
            "algorithm": ALGORITHM, "dataset": self.info.source, "env": self.info.env_id, "seed": self.config.seed,
            "score_metric": self.score_key,
            "offline": {**phase_summary(self.logger.history, "offline"), "iterations": self.updates["offline"],
                        "wall_clock_s": round(self.seconds["offline"], 2)},
            "online": {**phase_summary(self.logger.history, "online"), "env_steps": env_steps,
                       "updates": self.updates["online"], "wall_clock_s": round(self.seconds["online"], 2)},
            "env_steps": env_steps, **extra, "versions": package_versions(), "machine": run_machine(self.device),
        }
        self.logger.write_summary(summary)
        self.logger.close()
        self.snapshots.remove()
        return summary


def resumed_config(config_class: type, argv: List[str]) -> Optional[Any]:
    """For `--resume <run dir>` (and optionally --device): the run's own config, from its snapshot."""
    if "--resume" not in argv:
        return None
    index = argv.index("--resume")
    if index + 1 >= len(argv):
        raise UserError("--resume needs the run directory (log_dir/<name>) of the run to continue")
    run_dir, others = Path(argv[index + 1]), argv[:index] + argv[index + 2:]
    device = None
    if others[:1] == ["--device"] and len(others) == 2:
        device, others = others[1], []
    if others:
        raise UserError(f"--resume continues a run with its own config; other options are not taken: "
                        f"{' '.join(others)}")
    if not run_dir.is_dir():
        raise UserError(f"--resume: {run_dir} is not a directory")
    if (run_dir / "summary.json").is_file():
        raise UserError(f"--resume: {run_dir} finished already (it has summary.json)")
    snapshot = Snapshots.load(run_dir, torch.device("cpu"))
    if snapshot.get("algorithm") != ALGORITHM:
        raise UserError(f"--resume: {run_dir} holds a {snapshot.get('algorithm')!r} run, not {ALGORITHM!r}")
    try:
        config = pyrallis.decode(config_class, snapshot["config"])
    except Exception:  # a snapshot written by another version of this file
        raise UserError(f"--resume: the config in {run_dir}'s snapshot does not fit this version of the file") from None
    config.log_dir, config.name, config.resume = str(run_dir.parent), run_dir.name, str(run_dir)
    if device is not None:
        config.device = device
    return config


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    torch.save(payload, partial)
    os.replace(partial, path)


def load_checkpoint(path: str, device: torch.device) -> Dict[str, Any]:
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    # An EDIS file also takes its base algorithm's checkpoint: pretrain once, fine-tune with and without EDIS.
    if payload.get("algorithm") not in (ALGORITHM, ALGORITHM.removesuffix("_edis")):
        raise UserError(f"checkpoint {path} was written by {payload.get('algorithm')!r}, not {ALGORITHM!r}")
    return payload
# ==== END SHARED: logging and checkpoints ====


# ==== BEGIN SHARED: entry point ====
def main(argv: Optional[List[str]] = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        config = resumed_config(TrainConfig, argv) or parse_config(TrainConfig, CONFIG_SECTIONS, argv)
        validate_config(config)
        summary = train(config)
        print(result_line(summary, Path(config.log_dir) / config.name / "summary.json"), flush=True)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
# ==== END SHARED: entry point ====
