"""IQL + EDIS: offline pretraining, then online fine-tuning on energy-guided diffusion samples.

EDIS (Liu et al., "Energy-Guided Diffusion Sampling for Offline-to-Online Reinforcement
Learning", ICML 2024, arXiv 2407.12448) on top of IQL (Kostrikov et al. 2021) as CORL runs it.
Offline, IQL trains on the dataset. When fine-tuning starts, a diffusion model of transitions
(s, a, r, s') is fitted to the dataset; every `edis.refresh_every` online steps it is refitted on
offline + online data, three energies (state, policy, transition) are trained by contrastive
energy prediction on the most recent online transitions, and guided samples refill a buffer of
generated transitions. Each online batch mixes generated and real online data by
`edis.mix_ratio`; raw offline data are not replayed (until the first refresh, when nothing has
been generated yet, offline data stand in for generated data). That is the paper's loop.
`edis.replay: reference` runs the public code's loop instead, the one behind the published
IQL-EDIS numbers: online updates replay offline + online data as plain IQL does, and only the
`edis.utd_ratio` updates made at each refresh step see generated (+ online) data.

    python algorithms/iql_edis.py --config configs/local/hopper-random.yaml
    python algorithms/iql_edis.py --config configs/adroit/pen-cloned.yaml --edis.mix_ratio 0.3

The file is self-contained: copy it into your project and it runs. It reads top to bottom: the
configuration, the networks, the diffusion model, the energies and guided sampler, the refresh, the
agent, `train()`; the machinery (command line, data, environment, buffers, evaluation, logging)
follows the "Machinery" banner. A section marked `BEGIN SHARED: <name>` is a copy: every algorithm
file that holds that name holds it identically.

Docs (in this file's repository): docs/edis.md (the method, where our defaults differ from the
public code and why, the guidance scales), docs/public-code.md, docs/configuration.md, docs/runs.md,
docs/results.md.
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
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import gymnasium as gym
import h5py
import numpy as np
import pyrallis
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.distributions import Normal
from torch.optim.lr_scheduler import CosineAnnealingLR
from tqdm.auto import tqdm

ALGORITHM = "iql_edis"
# YAML sections this script reads besides the common keys: edis: (EDIS settings both EDIS scripts share),
# then iql_edis: (this algorithm's own values, iql_edis.edis included). iql: and the others are skipped.
CONFIG_SECTIONS = ("edis", "iql_edis")


# ==== BEGIN SHARED: EDIS config ====
@dataclass
class EDISConfig:
    """EDIS: a diffusion model of transitions, steered by three energies toward the online data."""

    mix_ratio: float = 0.5  # share of generated transitions in each online batch; the rest is online data
    replay: str = "paper"  # paper: online batches mix generated + online rows | reference: the public IQL-EDIS loop
    utd_ratio: int = 1  # replay reference only: updates on generated + online batches at each refresh step
    refresh_every: int = 10_000  # online steps between refreshes (diffusion fit, energy training, new samples)
    retrain_from_scratch: bool = False  # new diffusion weights at each refresh (the reference); false: warm start
    initial_fit_steps: int = 30_000  # denoiser updates on the offline data when fine-tuning starts
    refresh_fit_steps: int = 10_000  # denoiser updates on offline + online data at each refresh
    num_samples: int = 100_000  # transitions generated at each refresh (they replace the previous ones)
    include_terminal: bool = False  # also model the terminal flag (rounded at 0.5 after sampling); else done = 0
    simulator_labels: bool = False  # diagnostic: generated (s, a) get the simulator's (r, s', done), not the model's
    width: int = 1024  # width of the residual-MLP denoiser
    blocks: int = 6  # residual blocks of the denoiser
    time_embedding_dim: int = 256  # random Fourier features of the noise level
    lr: float = 3e-4  # denoiser learning rate, cosine-annealed over each fit
    grad_clip: float = 1.0  # clip the norm of the denoiser's gradient to this (the reference: 1)
    batch_size: int = 256  # denoiser batch
    ema_decay: float = 0.999  # EMA of the denoiser weights; the EMA copy samples
    sigma_min: float = 0.002  # smallest noise level of the sampler (EDM)
    sigma_max: float = 80.0  # largest noise level of the sampler (EDM)
    sigma_data: float = 1.0  # data std of EDM's preconditioning; the data are standardised per dimension
    rho: float = 7.0  # EDM's noise-level spacing exponent
    p_mean: float = -1.2  # training noise levels: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2  # training noise levels: ln(sigma) ~ N(p_mean, p_std^2)
    sample_steps: int = 128  # Heun steps of the sampler
    s_churn: float = 80.0  # EDM's stochasticity
    s_tmin: float = 0.05  # churn only for sigma in [s_tmin, s_tmax]
    s_tmax: float = 50.0  # churn only for sigma in [s_tmin, s_tmax]
    s_noise: float = 1.003  # EDM's noise inflation during churn
    sample_batch_size: int = 10_000  # transitions sampled at once
    bf16: bool = False  # bfloat16 autocast for the denoiser (training and sampling)
    positive_buffer_size: int = 10_000  # most recent online transitions: the energies' positives
    energy_hidden: int = 256  # width of each energy MLP
    energy_layers: int = 3  # hidden layers of each energy MLP
    energy_lr: float = 1e-3  # energy learning rate
    energy_epochs: int = 20  # passes over the positive buffer at each refresh
    energy_batch_size: int = 256  # positives per energy update
    energy_negatives: int = 10  # model samples that compete with each positive
    negative_pool: int = 8_192  # sampler trajectories recorded per refresh; their states at every level are negatives
    transition_pool: int = 20_480  # runs with (s, a) held at positives' (energy_negatives each): E_transition negatives
    inpainting_weight: float = 4.0  # reconstruction guidance of those runs: pulls (r, s') toward the held (s, a)
    guidance_state: float = 0.5  # scale of E_state's guidance on the s block (0: off); docs/edis.md has the sweep
    guidance_transition: float = 0.5  # scale of E_transition's guidance on the (r, s', done) block (0: off)
    guidance_policy: float = 0.5  # scale of E_policy's guidance on the a block (0: off)
    guidance_clip: float = 1.0  # largest norm of each energy's shift of a denoised transition (standardised units)
    metric_samples: int = 1_000  # transitions per batch for the alignment metrics at each refresh
    drop_beyond_std: float = 10.0  # generated rows with a value this many data stds from the data mean are dropped
# ==== END SHARED: EDIS config ====


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
    n_episodes: int = 100  # episodes per evaluation
    eval_envs: int = 10  # evaluation episodes run side by side (one batched policy call per step)
    log_freq: int = 1_000  # log training losses every this many updates
    batch_size: int = 256  # transitions per gradient update
    buffer_size: int = 2_000_000  # replay capacity (offline data + online transitions)
    normalize: bool = True  # standardise states with the dataset's mean and std
    normalize_reward: bool = False  # locomotion only: scale rewards by max_episode_steps / (max - min episode return)
    reward_scale: float = 1.0  # after normalize_reward: reward * reward_scale + reward_bias
    reward_bias: float = 0.0  # after normalize_reward: reward * reward_scale + reward_bias (AntMaze: -1)
    discount: float = 0.99  # discount factor
    tau: float = 0.005  # target Q network soft-update rate
    beta: float = 10.0  # inverse temperature of the advantage weights; small: BC, large: greedy (reference: 10)
    iql_tau: float = 0.7  # expectile of the value regression
    iql_deterministic: bool = False  # deterministic actor (MSE) instead of a Gaussian one
    actor_dropout: float = 0.0  # dropout probability in the actor
    expl_noise: float = 0.03  # std of the exploration noise of the deterministic actor online
    noise_clip: float = 0.5  # clip of that exploration noise
    actor_lr: float = 3e-4  # actor learning rate (cosine schedule with period offline_iterations, as CORL)
    qf_lr: float = 3e-4  # Q-network learning rate
    vf_lr: float = 3e-4  # value-network learning rate
    hidden_dim: int = 256  # width of every hidden layer
    n_hidden: int = 2  # hidden layers of actor, Q and value networks
    project: str = "CORL"  # W&B project
    group: str = "IQL-EDIS-D4RL"  # W&B group
    name: str = ""  # run name; empty: <algorithm>-<dataset>-seed<seed>-<8 hex>
    wandb_mode: str = "offline"  # online | offline | disabled
    log_dir: str = "runs"  # each run writes log_dir/<name>/: config.yaml, metrics.jsonl, summary.json
    checkpoints_path: str = ""  # save a checkpoint at each evaluation to checkpoints_path/<name>/ (empty: none)
    snapshot_every: int = 10_000  # steps between snapshots that --resume continues from (0: none)
    resume: str = ""  # a run directory (log_dir/<name>) to continue from its last snapshot
    load_model: str = ""  # checkpoint to start from; it skips offline pretraining
    edis: EDISConfig = field(default_factory=EDISConfig)  # EDIS settings: YAML section edis:, --edis.<field>


# ==== BEGIN SHARED: IQL networks ====
# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------
EXP_ADV_MAX = 100.0
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


def mlp(dims: List[int], output_activation: Optional[Callable[[], nn.Module]] = None,
        dropout: float = 0.0) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
        if dropout > 0.0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(dims[-2], dims[-1]))
    if output_activation is not None:
        layers.append(output_activation())
    return nn.Sequential(*layers)


class GaussianPolicy(nn.Module):
    """tanh-bounded mean, state-independent log std (CORL's IQL actor)."""

    def __init__(self, state_dim: int, action_dim: int, hidden_dim: int, n_hidden: int, dropout: float):
        super().__init__()
        self.net = mlp([state_dim, *[hidden_dim] * n_hidden, action_dim], nn.Tanh, dropout)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def forward(self, states: torch.Tensor) -> Normal:
        std = torch.exp(self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX))
        # No argument checks: each costs a device sync, and NaN is reported by the run's FiniteGuard in one line.
        return Normal(self.net(states), std, validate_args=False)

    def log_prob(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self(states).log_prob(actions).sum(-1)


class DeterministicPolicy(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden_dim: int, n_hidden: int, dropout: float):
        super().__init__()
        self.net = mlp([state_dim, *[hidden_dim] * n_hidden, action_dim], nn.Tanh, dropout)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states)


class TwinQ(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        dims = [state_dim + action_dim, *[hidden_dim] * n_hidden, 1]
        self.q1, self.q2 = mlp(dims), mlp(dims)

    def both(self, states: torch.Tensor, actions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        state_actions = torch.cat([states, actions], -1)
        return self.q1(state_actions).squeeze(-1), self.q2(state_actions).squeeze(-1)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return torch.min(*self.both(states, actions))


class ValueFunction(nn.Module):
    def __init__(self, state_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.v = mlp([state_dim, *[hidden_dim] * n_hidden, 1])

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.v(states).squeeze(-1)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source, one fused call over every parameter."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def asymmetric_l2_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.mean(torch.abs(tau - (u < 0).float()) * u**2)
# ==== END SHARED: IQL networks ====


# ==== BEGIN SHARED: EDIS diffusion model ====
@dataclass
class TransitionLayout:
    """Where s, a, r, s' (and the terminal flag) sit in a flat transition vector x."""

    state_dim: int
    action_dim: int
    include_terminal: bool

    @property
    def dim(self) -> int:
        return 2 * self.state_dim + self.action_dim + 1 + int(self.include_terminal)

    def block_masks(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """0/1 masks of the blocks each energy's guidance may touch: s, a, and (r, s', done)."""
        s, a = self.state_dim, self.action_dim
        masks = {name: torch.zeros(self.dim, device=device) for name in ("state", "policy", "transition")}
        masks["state"][:s] = 1.0
        masks["policy"][s:s + a] = 1.0
        masks["transition"][s + a:] = 1.0
        return masks

    def join(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [batch["states"], batch["actions"], batch["rewards"], batch["next_states"]]
        if self.include_terminal:
            parts.append(batch["dones"])
        return torch.cat(parts, dim=-1)

    def split(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        s, a = self.state_dim, self.action_dim
        dones = (x[:, -1:] > 0.5).float() if self.include_terminal else torch.zeros_like(x[:, :1])
        return {"states": x[:, :s], "actions": x[:, s:s + a], "rewards": x[:, s + a:s + a + 1],
                "next_states": x[:, s + a + 1:2 * s + a + 1], "dones": dones}


class RandomFourierEmbedding(nn.Module):
    """Fixed random Fourier features of EDM's noise input c_noise = ln(sigma) / 4."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(dim // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * c_noise[:, None] * self.frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.linear(F.silu(self.norm(h)))


class ResidualMLPDenoiser(nn.Module):
    """SynthER-style residual MLP: F(x, c_noise), the raw network inside EDM's preconditioning."""

    def __init__(self, dim: int, width: int, blocks: int, time_embedding_dim: int):
        super().__init__()
        self.input = nn.Linear(dim, width)
        self.time = nn.Sequential(RandomFourierEmbedding(time_embedding_dim), nn.Linear(time_embedding_dim, width),
                                  nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.output = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return self.output(self.blocks(self.input(x) + self.time(c_noise)))


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: unit-variance loss at every level."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class TransitionDiffusion:
    """EDM (Karras et al. 2022) over transitions standardised per dimension.

    Training: log-normal noise levels, EDM's loss weighting. Sampling: the stochastic Heun sampler
    on the EMA weights, optionally with a guidance term; it can also record the sampler's state at
    every level where it calls the denoiser (the energies' negatives come from there).
    """

    def __init__(self, dim: int, config: EDISConfig, device: torch.device, raw_columns: int = 0):
        self.dim, self.config, self.device = dim, config, device
        self.mean = torch.zeros(dim, device=device)
        self.std = torch.ones(dim, device=device)
        # The last raw_columns columns (the 0/1 terminal flag) are modelled as they are: standardised, a flag
        # set on 0.6% of rows would sit 10+ stds out and be both hard to model and dropped as out of range.
        self.standardised = torch.arange(dim, device=device) < dim - raw_columns
        self.reset_weights()

    def reset_weights(self) -> None:
        config = self.config
        self.model = ResidualMLPDenoiser(self.dim, config.width, config.blocks, config.time_embedding_dim).to(
            self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, network: Optional[nn.Module] = None) -> torch.Tensor:
        """D(x; sigma) with EDM's preconditioning; sigma has one entry per row."""
        network = self.ema if network is None else network
        sigma = sigma.reshape(-1, 1)
        sigma_data = self.config.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1.0 / (sigma**2 + sigma_data**2).sqrt()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            out = network(c_in * x, sigma.log().flatten() / 4)
        return c_skip * x + c_out * out.float()

    def fit(self, data: torch.Tensor, steps: int, desc: str = "diffusion") -> float:
        """Trains the denoiser on raw transitions (the standardisation is refit on them); returns the last loss."""
        config = self.config
        self.mean = torch.where(self.standardised, data.mean(0), 0.0)
        self.std = torch.where(self.standardised, data.std(0) + 1e-3, 1.0)
        normalized = self.normalize(data)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(steps, 1))
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr
        loss = torch.zeros((), device=self.device)
        for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0, disable=steps < 1000):
            x0 = normalized[torch.randint(0, len(normalized), (config.batch_size,), device=self.device)]
            sigma = (torch.randn(len(x0), device=self.device) * config.p_std + config.p_mean).exp()
            weight = edm_loss_weight(sigma, config.sigma_data)
            denoised = self.denoise(x0 + sigma[:, None] * torch.randn_like(x0), sigma, self.model)
            loss = (weight[:, None] * (denoised - x0) ** 2).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            schedule.step()
            with torch.no_grad():  # one fused call for the whole EMA update
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1.0 - config.ema_decay)
        return float(loss.detach())

    def sampler_levels(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sigma_i for i = 0..N with sigma_N = 0, and the churned levels sigma_hat_i for i < N)."""
        config = self.config
        steps = config.sample_steps
        ramp = torch.linspace(0, 1, steps, device=self.device, dtype=torch.float64)
        inv_rho = 1.0 / config.rho
        sigmas = (config.sigma_max**inv_rho + ramp * (config.sigma_min**inv_rho - config.sigma_max**inv_rho))
        sigmas = torch.cat([sigmas**config.rho, sigmas.new_zeros(1)])
        gamma = min(config.s_churn / steps, math.sqrt(2) - 1)
        churn = (sigmas[:-1] >= config.s_tmin) & (sigmas[:-1] <= config.s_tmax)
        sigma_hats = sigmas[:-1] * (1 + gamma * churn)
        return sigmas.float(), sigma_hats.float()

    def guidance_levels(self) -> torch.Tensor:
        """Every noise level at which the sampler calls the denoiser (and so the guidance), in call order."""
        sigmas, sigma_hats = self.sampler_levels()
        levels = []
        for i in range(len(sigma_hats)):
            levels.append(sigma_hats[i])
            if i < len(sigma_hats) - 1:  # the last step goes to sigma = 0 without a correction
                levels.append(sigmas[i + 1])
        return torch.stack(levels)

    def sample(self, count: int, guidance: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
               record: bool = False, known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`count` raw transitions; with record, also the standardised states at every guidance level
        (levels x count x dim). guidance(x, sigma) returns the shift subtracted from each denoised estimate.
        known (count x dim, standardised) and known_mask (dim): the masked block of row i is held at
        known[i] noised to each level (replacement inpainting), so the rest is drawn given it, steered by
        reconstruction guidance (see _held_denoise)."""
        samples, trajectories = [], []
        for start in range(0, count, self.config.sample_batch_size):
            rows = min(self.config.sample_batch_size, count - start)
            held = None if known is None else (known[start:start + rows], known_mask)
            x, trajectory = self._sample_batch(rows, guidance, record, held)
            samples.append(x)
            trajectories.append(trajectory)
        recorded = torch.cat(trajectories, dim=1) if record else None
        return self.unnormalize(torch.cat(samples)), recorded

    def _guided_denoise(self, x: torch.Tensor, sigma: torch.Tensor, guidance: Optional[Callable],
                        held: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        sigma_rows = sigma.expand(len(x))
        if held is None:
            with torch.no_grad():
                denoised = self.denoise(x, sigma_rows)
        elif self.config.inpainting_weight == 0:  # replacement alone
            with torch.no_grad():
                denoised = self.denoise(x, sigma_rows)
        else:
            denoised = self._held_denoise(x, sigma_rows, *held)
        if guidance is None:
            return denoised
        # Score of p * exp(-E) is score - grad E, so the guided denoised estimate is D - sigma^2 grad E.
        return denoised - guidance(x, sigma_rows)

    def _held_denoise(self, x: torch.Tensor, sigma_rows: torch.Tensor, known: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        """D(x) with reconstruction guidance (Ho et al. 2022, "Video Diffusion Models"): the free block moves
        down the gradient of the held block's squared denoising error, weighted by inpainting_weight / 2.
        Replacement alone draws (r, s') far from p_model(r, s' | s, a) (docs/edis.md, E_transition)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            denoised = self.denoise(x, sigma_rows)
            mismatch = (((denoised - known) * mask) ** 2).sum()
            (gradient,) = torch.autograd.grad(mismatch, x)
        return (denoised - self.config.inpainting_weight / 2 * gradient * (1 - mask)).detach()

    def _sample_batch(self, count: int, guidance: Optional[Callable], record: bool,
                      held: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, Any]:
        config = self.config
        sigmas, sigma_hats = self.sampler_levels()
        x = torch.randn(count, self.dim, device=self.device) * sigmas[0]
        if held is None:
            def hold(values: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                return values
        else:
            known, mask = held
            held_noise = torch.randn_like(x)  # one noise draw per row: the held block moves smoothly to known

            def hold(values: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                return values * (1 - mask) + (known + sigma * held_noise) * mask
        x = hold(x, sigmas[0])
        states = []
        for i in range(config.sample_steps):
            sigma, sigma_hat, sigma_next = sigmas[i], sigma_hats[i], sigmas[i + 1]
            x_hat = x + (sigma_hat**2 - sigma**2).clamp_min(0).sqrt() * config.s_noise * torch.randn_like(x)
            x_hat = hold(x_hat, sigma_hat)
            if record:
                states.append(x_hat)
            d = (x_hat - self._guided_denoise(x_hat, sigma_hat, guidance, held)) / sigma_hat
            x = x_hat + (sigma_next - sigma_hat) * d
            if i < config.sample_steps - 1:  # sigma_next > 0, decided on the host (no device sync)
                x = hold(x, sigma_next)
                if record:
                    states.append(x)
                d_next = (x - self._guided_denoise(x, sigma_next, guidance, held)) / sigma_next
                x = x_hat + (sigma_next - sigma_hat) * (d + d_next) / 2
            x = hold(x, sigma_next)
        return x, (torch.stack(states) if record else None)
# ==== END SHARED: EDIS diffusion model ====


# ==== BEGIN SHARED: EDIS energies and guidance ====
class EnergyNetwork(nn.Module):
    """E(x_sigma, sigma): an MLP on the noised transition and the noise level's Fourier features."""

    def __init__(self, dim: int, hidden: int, layers: int, time_embedding_dim: int):
        super().__init__()
        self.time = RandomFourierEmbedding(time_embedding_dim)
        sizes = [dim + time_embedding_dim, *[hidden] * layers, 1]
        modules: List[nn.Module] = []
        for i in range(len(sizes) - 1):
            modules.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                modules.append(nn.ReLU())
        self.net = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, self.time(sigma.log() / 4)], dim=-1)).squeeze(-1)


class TransitionEnergies:
    """E_state, E_policy, E_transition trained by contrastive energy prediction (InfoNCE).

    A positive (a recent online transition, noised to level sigma) competes with K negatives at that
    same level, each differing from it only in the block its energy guides, so that the energy can
    tell them apart by that block alone:
    - E_state: the sampler's own states (every block is the model's);
    - E_policy: the positive's action is the current policy's, the negatives' the model's; s, r, s'
      are the positive's;
    - E_transition: the negatives' (r, s', done) come from sampler runs whose (s, a) block was held
      at the positive's (inpainting), so they are draws of p_model(r, s' | s, a), not of the model's
      marginal; their (s, a) is the positive's.
    The loss picks the positive with logits -E, so at the optimum exp(-E) is proportional to online
    density / model density (for E_transition, of r, s' given s, a). Only energies with a non-zero
    guidance scale are trained or evaluated.
    """

    NAMES = ("state", "policy", "transition")

    def __init__(self, layout: TransitionLayout, config: EDISConfig, device: torch.device):
        self.layout, self.config, self.device = layout, config, device
        self.scales = {"state": config.guidance_state, "policy": config.guidance_policy,
                       "transition": config.guidance_transition}
        self.active = [name for name in self.NAMES if self.scales[name] > 0]
        self.masks = layout.block_masks(device)
        self.networks = {name: EnergyNetwork(layout.dim, config.energy_hidden, config.energy_layers,
                                             config.time_embedding_dim).to(device) for name in self.active}
        self.optimizers = {name: torch.optim.Adam(self.networks[name].parameters(), lr=config.energy_lr)
                           for name in self.active}
        self.reset_guidance_statistics()

    def _infonce(self, name: str, positive: torch.Tensor, negatives: torch.Tensor, sigma: torch.Tensor
                 ) -> torch.Tensor:
        """positive (B, dim), negatives (B, K, dim), sigma (B,): cross-entropy of picking the positive."""
        candidates = torch.cat([positive[:, None], negatives], dim=1)
        batch, count, dim = candidates.shape
        energies = self.networks[name](candidates.reshape(-1, dim), sigma.repeat_interleave(count))
        logits = -energies.reshape(batch, count)
        return F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=self.device))

    def negatives(self, name: str, positive: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """Negatives (B, K, dim) for positives (B, dim): the drawn sampler states in the energy's own block
        (all of it for E_state), the positive's values everywhere else."""
        own = torch.ones_like(self.masks[name]) if name == "state" else self.masks[name]
        return drawn * own + positive[:, None] * (1 - own)

    def fit(self, positives: torch.Tensor, policy_positives: torch.Tensor, trajectory: torch.Tensor,
              levels: torch.Tensor, epochs: int, conditioned: Optional[torch.Tensor] = None,
              conditioned_trajectory: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """positives, policy_positives: standardised transitions (N, dim); trajectory: the sampler's states at
        each level (L, M, dim); levels: those L noise levels. conditioned (P, dim): the positives whose (s, a)
        held conditioned_trajectory's runs, energy_negatives runs each, in order (L, P * K, dim): E_transition's
        positives and negatives. Every energy makes the same number of updates. Returns each last loss."""
        config, losses = self.config, {}
        count, pool, negatives_per_row = len(positives), trajectory.shape[1], config.energy_negatives
        if "transition" in self.active and (conditioned is None or conditioned_trajectory is None):
            raise ValueError("E_transition needs sampler runs conditioned on its positives' (s, a)")
        offsets = torch.arange(negatives_per_row, device=self.device)
        for _ in range(epochs):
            order = torch.randperm(count, device=self.device)
            for start in range(0, count, config.energy_batch_size):
                index = order[start:start + config.energy_batch_size]
                batch = len(index)
                level = torch.randint(0, len(levels), (batch,), device=self.device)
                sigma = levels[level]
                noise = torch.randn(batch, self.layout.dim, device=self.device)
                negative_rows = torch.randint(0, pool, (batch, negatives_per_row), device=self.device)
                for name in self.active:
                    if name == "transition":
                        rows = torch.randint(0, len(conditioned), (batch,), device=self.device)
                        positive = conditioned[rows] + sigma[:, None] * noise
                        drawn = conditioned_trajectory[level[:, None], rows[:, None] * negatives_per_row + offsets]
                    else:
                        positive = (policy_positives if name == "policy" else positives)[index] + sigma[:, None] * noise
                        drawn = trajectory[level[:, None], negative_rows]  # (B, K, dim) at the positive's level
                    loss = self._infonce(name, positive, self.negatives(name, positive, drawn), sigma)
                    self.optimizers[name].zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizers[name].step()
                    losses[name] = loss.detach()
        return {name: float(loss) for name, loss in losses.items()}

    def reset_guidance_statistics(self) -> None:
        """Running sums (on the device) behind guidance_statistics()."""
        self.guidance_sums = {kind: {name: torch.zeros((), device=self.device) for name in self.active}
                              for kind in ("norm", "clipped")}
        self.guidance_sums["rows"] = torch.zeros((), device=self.device)

    def guidance_statistics(self) -> Dict[str, float]:
        """Per energy, over every guided denoiser call since the reset: the mean norm of its shift
        before clipping (standardised units) and the share of rows whose shift the clip cut."""
        sums = self.guidance_sums
        rows = float(sums["rows"])
        if rows == 0:
            return {}
        stats = {}
        for name in self.active:
            stats[f"edis/guidance_norm_{name}"] = float(sums["norm"][name]) / rows
            stats[f"edis/guidance_clipped_{name}"] = float(sums["clipped"][name]) / rows
        return stats

    def guidance(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The shift sigma^2 * scale_k * grad_x E_k(x, sigma) of each energy's block, each clipped in norm.

        One backward pass: each energy sees its own block attached to the graph and the other blocks
        detached, so the gradient of the weighted sum is already masked per energy. The blocks are
        disjoint, so each energy's shift is clipped on its own: one energy's outlier does not mute the others.
        """
        if not self.active:
            return torch.zeros_like(x)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            total = x.new_zeros(())
            for name in self.active:
                mask = self.masks[name]
                total = total + self.scales[name] * self.networks[name](x * mask + x.detach() * (1 - mask), sigma).sum()
            (gradient,) = torch.autograd.grad(total, x)
        gradient = sigma[:, None] ** 2 * gradient
        shift = torch.zeros_like(x)
        sums = self.guidance_sums
        for name in self.active:
            block = gradient * self.masks[name]
            norm = block.norm(dim=-1, keepdim=True)
            shift = shift + block * (self.config.guidance_clip / norm.clamp_min(1e-12)).clamp(max=1.0)
            sums["norm"][name] += norm.sum()
            sums["clipped"][name] += (norm > self.config.guidance_clip).sum()
        sums["rows"] += len(x)
        return shift
# ==== END SHARED: EDIS energies and guidance ====


# ==== BEGIN SHARED: EDIS refresh ====
def recent_rows(buffer: "ReplayBuffer", count: int) -> Dict[str, torch.Tensor]:
    """The last `count` rows added to a replay buffer (all rows when fewer), oldest first."""
    count = min(count, buffer.size)
    index = (buffer.pointer - count + torch.arange(count, device=buffer.device)) % buffer.capacity
    return {name: column[index] for name, column in buffer.data.items()}


def check_finite_values(values: Dict[str, float], where: str) -> None:
    """A refresh's losses and guidance norms: NaN or inf stops the run with one line."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} became NaN or inf {where}")


class EnergyNegatives(NamedTuple):
    unguided: torch.Tensor  # the free runs' ends: unguided samples of the model
    trajectory: torch.Tensor  # the free runs at every guidance level (levels x runs x dim)
    conditioned: Optional[torch.Tensor]  # the positives whose (s, a) E_transition's runs held (None: no E_transition)
    conditioned_trajectory: Optional[torch.Tensor]  # those runs at every guidance level


def draw_energy_negatives(diffusion: TransitionDiffusion, energies: TransitionEnergies, positives: torch.Tensor,
                          config: EDISConfig) -> EnergyNegatives:
    """Sampler runs recorded at every guidance level: negative_pool free runs (E_state's and E_policy's negatives;
    their ends are the unguided reference) and, for E_transition, energy_negatives runs per chosen positive that hold
    its (s, a), so that E_transition learns against p_model(r, s' | s, a), not the model's marginal (r, s')."""
    with torch.no_grad():
        unguided, trajectory = diffusion.sample(config.negative_pool, record=True)
        if "transition" not in energies.active:
            return EnergyNegatives(unguided, trajectory, None, None)
        rows = torch.randperm(len(positives), device=positives.device)[:config.transition_pool
                                                                       // config.energy_negatives]
        conditioned = positives[rows]
        _, conditioned_trajectory = diffusion.sample(
            len(rows) * config.energy_negatives, record=True,
            known=conditioned.repeat_interleave(config.energy_negatives, 0),
            known_mask=energies.masks["state"] + energies.masks["policy"])
    return EnergyNegatives(unguided, trajectory, conditioned, conditioned_trajectory)


class EDIS:
    """Owns the diffusion model, the three energies and the buffer of generated transitions.

    `refresh` is one round of the method: fit the diffusion model (on offline + online data), train
    the energies on the most recent online transitions, refill the generated buffer with guided
    samples. It keeps those samples and unguided ones of the same model in `last_samples`, which
    `measure_refresh` (machinery, below) turns into the fidelity metrics against a simulator.
    """

    def __init__(self, config: EDISConfig, state_dim: int, action_dim: int, max_action: float,
                 device: torch.device):
        self.config, self.device, self.max_action = config, device, max_action
        self.layout = TransitionLayout(state_dim, action_dim, config.include_terminal)
        self.diffusion = TransitionDiffusion(self.layout.dim, config, device, int(config.include_terminal))
        self.energies = TransitionEnergies(self.layout, config, device)
        columns = {"states": state_dim, "actions": action_dim, "rewards": 1, "next_states": state_dim, "dones": 1}
        self.generated = ReplayBuffer(config.num_samples, columns, device)
        self.refreshes = 0

    def state_dict(self) -> Dict[str, Any]:
        """Diffusion model (with its EMA, optimiser and standardisation) and energies, for checkpoints."""
        diffusion = self.diffusion
        return {"model": diffusion.model.state_dict(), "ema": diffusion.ema.state_dict(),
                "optimizer": diffusion.optimizer.state_dict(), "mean": diffusion.mean, "std": diffusion.std,
                "energies": {name: network.state_dict() for name, network in self.energies.networks.items()},
                "energy_optimizers": {name: opt.state_dict() for name, opt in self.energies.optimizers.items()},
                "refreshes": self.refreshes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """A loaded model is warm: the next refresh fits it for refresh_fit_steps, not initial_fit_steps."""
        diffusion = self.diffusion
        diffusion.model.load_state_dict(state["model"])
        diffusion.ema.load_state_dict(state["ema"])
        diffusion.optimizer.load_state_dict(state["optimizer"])
        diffusion.mean, diffusion.std = state["mean"], state["std"]
        for name, network in self.energies.networks.items():
            if name in state["energies"]:
                network.load_state_dict(state["energies"][name])
                self.energies.optimizers[name].load_state_dict(state["energy_optimizers"][name])
        self.refreshes = state["refreshes"]

    def refresh(self, offline: Dict[str, torch.Tensor], online_buffer: "ReplayBuffer", agent: Any,
                relabel: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None
                ) -> Dict[str, float]:
        """One EDIS round. Without online data yet, only the diffusion model is fitted. `relabel` (a diagnostic,
        edis.simulator_labels) replaces the generated rows' (r, s', done) before they are stored."""
        config, log = self.config, {}
        columns = ("states", "actions", "rewards", "next_states", "dones")
        online = recent_rows(online_buffer, len(online_buffer))
        data = self.layout.join({name: torch.cat([offline[name], online[name]]) for name in columns})
        first, self.last_samples = self.refreshes == 0, None
        if config.retrain_from_scratch and not first:
            self.diffusion.reset_weights()
        start = time.perf_counter()
        steps = config.initial_fit_steps if first else config.refresh_fit_steps
        log["edis/diffusion_loss"] = self.diffusion.fit(data, steps, desc=f"EDIS fit {self.refreshes}")
        check_finite_values({"edis/diffusion_loss": log["edis/diffusion_loss"]},
                            f"in the denoiser fit of refresh {self.refreshes}")
        log["edis/time_diffusion_s"] = time.perf_counter() - start
        self.refreshes += 1
        if len(online_buffer) == 0:
            return log

        start = time.perf_counter()
        recent = recent_rows(online_buffer, config.positive_buffer_size)
        positives = self.diffusion.normalize(self.layout.join(recent))
        on_policy = dict(recent, actions=sample_policy_actions(agent, recent["states"]))
        policy_positives = self.diffusion.normalize(self.layout.join(on_policy))
        negatives = draw_energy_negatives(self.diffusion, self.energies, positives, config)
        levels = self.diffusion.guidance_levels()
        sampling_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for name, loss in self.energies.fit(positives, policy_positives, negatives.trajectory, levels,
                                            config.energy_epochs, negatives.conditioned,
                                            negatives.conditioned_trajectory).items():
            log[f"edis/energy_loss_{name}"] = loss
        check_finite_values({key: value for key, value in log.items() if key.startswith("edis/energy_loss")},
                            f"in the energy training of refresh {self.refreshes}")
        log["edis/time_energy_s"] = time.perf_counter() - start

        start = time.perf_counter()
        self.energies.reset_guidance_statistics()
        guided, _ = self.diffusion.sample(config.num_samples, guidance=self.energies.guidance)
        guidance_log = self.energies.guidance_statistics()
        check_finite_values(guidance_log, f"in the guided sampling of refresh {self.refreshes}")
        log.update(guidance_log)
        # Rows far outside the data (in any dimension) are the sampler's failures, not transitions: drop them.
        # The comparison is false for NaN, so such rows go too.
        in_range = (self.diffusion.normalize(guided).abs() <= config.drop_beyond_std).all(dim=1)
        guided = guided[in_range]
        log["edis/dropped_out_of_range"] = float(config.num_samples - len(guided))
        generated = self.layout.split(guided)
        if config.include_terminal:  # the data's share is about 1 / mean episode length
            log["edis/generated_terminal_share"] = float(generated["dones"].mean())
        generated["actions"] = generated["actions"].clamp(-self.max_action, self.max_action)
        if relabel is not None:
            generated.update(relabel(generated))
        self.generated.size = self.generated.pointer = 0  # the new samples replace the old ones
        self.generated.add_batch(**generated)
        log["edis/time_sampling_s"] = sampling_seconds + time.perf_counter() - start
        log["edis/generated"] = float(len(self.generated))
        self.last_samples = {"guided": guided, "unguided": negatives.unguided, "online_states": recent["states"]}
        return log
# ==== END SHARED: EDIS refresh ====


# ==== BEGIN SHARED: IQL agent ====
# ---------------------------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------------------------
class ImplicitQLearning:
    def __init__(self, config: TrainConfig, state_dim: int, action_dim: int, max_action: float,
                 device: torch.device):
        self.config, self.device, self.max_action = config, device, max_action
        policy_class = DeterministicPolicy if config.iql_deterministic else GaussianPolicy
        self.actor = policy_class(state_dim, action_dim, config.hidden_dim, config.n_hidden,
                                  config.actor_dropout).to(device)
        self.qf = TwinQ(state_dim, action_dim, config.hidden_dim, config.n_hidden).to(device)
        self.q_target = copy.deepcopy(self.qf).requires_grad_(False)
        self.vf = ValueFunction(state_dim, config.hidden_dim, config.n_hidden).to(device)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.q_optimizer = torch.optim.Adam(self.qf.parameters(), lr=config.qf_lr)
        self.v_optimizer = torch.optim.Adam(self.vf.parameters(), lr=config.vf_lr)
        # As CORL: T_max = offline_iterations, and the schedule keeps stepping online.
        self.actor_lr_schedule = CosineAnnealingLR(self.actor_optimizer, max(config.offline_iterations, 1))
        self.total_it = 0

    def update(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One IQL step: V by expectile regression, Q by TD to V, actor by advantage-weighted BC."""
        self.total_it += 1
        states, actions = batch["states"], batch["actions"]
        rewards, dones = batch["rewards"].squeeze(-1), batch["dones"].squeeze(-1)
        with torch.no_grad():
            target_q = self.q_target(states, actions)
            next_v = self.vf(batch["next_states"])

        value = self.vf(states)
        advantage = target_q - value
        value_loss = asymmetric_l2_loss(advantage, self.config.iql_tau)
        self.v_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.v_optimizer.step()

        targets = rewards + (1.0 - dones) * self.config.discount * next_v
        q1, q2 = self.qf.both(states, actions)
        q_loss = (F.mse_loss(q1, targets) + F.mse_loss(q2, targets)) / 2
        self.q_optimizer.zero_grad(set_to_none=True)
        q_loss.backward()
        self.q_optimizer.step()
        soft_update(self.q_target, self.qf, self.config.tau)

        exp_advantage = torch.exp(self.config.beta * advantage.detach()).clamp(max=EXP_ADV_MAX)
        unit_actions = actions / self.max_action  # the actor's outputs live in [-1, 1]
        if isinstance(self.actor, GaussianPolicy):
            bc_losses = -self.actor.log_prob(states, unit_actions)
        else:
            bc_losses = ((self.actor(states) - unit_actions) ** 2).sum(-1)
        actor_loss = torch.mean(exp_advantage * bc_losses)
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        self.actor_lr_schedule.step()
        return {"value_loss": value_loss.detach(), "q_loss": q_loss.detach(), "actor_loss": actor_loss.detach(),
                "mean_value": value.detach().mean(), "mean_advantage": advantage.detach().mean()}

    @torch.no_grad()
    def act(self, state: np.ndarray, explore: bool) -> np.ndarray:
        """Evaluation: the mean action, dropout off. Exploration: a Gaussian sample (or noise)."""
        self.actor.train(explore)
        states = torch.atleast_2d(torch.as_tensor(state, dtype=torch.float32, device=self.device))
        if isinstance(self.actor, GaussianPolicy):
            distribution = self.actor(states)
            action = distribution.sample() if explore else distribution.mean
        else:
            action = self.actor(states)
            if explore:
                noise = (torch.randn_like(action) * self.config.expl_noise).clamp(-self.config.noise_clip,
                                                                                   self.config.noise_clip)
                action = action + noise
        self.actor.train()
        action = (action * self.max_action).clamp(-self.max_action, self.max_action)
        action = action.cpu().numpy()
        return action[0] if np.ndim(state) == 1 else action

    def state_dict(self) -> Dict[str, Any]:
        return {"actor": self.actor.state_dict(), "qf": self.qf.state_dict(), "q_target": self.q_target.state_dict(),
                "vf": self.vf.state_dict(), "actor_optimizer": self.actor_optimizer.state_dict(),
                "q_optimizer": self.q_optimizer.state_dict(), "v_optimizer": self.v_optimizer.state_dict(),
                "actor_lr_schedule": self.actor_lr_schedule.state_dict(), "total_it": self.total_it}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name in ("actor", "qf", "q_target", "vf", "actor_optimizer", "q_optimizer", "v_optimizer",
                     "actor_lr_schedule"):
            getattr(self, name).load_state_dict(state[name])
        self.total_it = state["total_it"]
# ==== END SHARED: IQL agent ====


# ---------------------------------------------------------------------------------------------
# What EDIS asks of the IQL policy (the policy energy's positives and the log-likelihood metric)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_policy_actions(agent: ImplicitQLearning, states: torch.Tensor) -> torch.Tensor:
    """A batch of exploration actions of the current policy (E_policy's positives)."""
    agent.actor.eval()
    if isinstance(agent.actor, GaussianPolicy):
        actions = agent.actor(states).sample()
    else:
        config = agent.config
        actions = agent.actor(states)
        actions = actions + (torch.randn_like(actions) * config.expl_noise).clamp(-config.noise_clip, config.noise_clip)
    agent.actor.train()
    return (actions * agent.max_action).clamp(-agent.max_action, agent.max_action)


@torch.no_grad()
def policy_log_prob(agent: ImplicitQLearning, states: torch.Tensor, actions: torch.Tensor) -> Optional[torch.Tensor]:
    """log pi(a|s) per row; None for the deterministic actor, which has no density."""
    if not isinstance(agent.actor, GaussianPolicy):
        return None
    agent.actor.eval()
    log_prob = agent.actor.log_prob(states, actions / agent.max_action)
    agent.actor.train()
    return log_prob


# ---------------------------------------------------------------------------------------------
# Training: offline pretraining, then online fine-tuning
# ---------------------------------------------------------------------------------------------
def mixed_batch(generated: "ReplayBuffer", online: "ReplayBuffer", generated_rows: int,
                online_rows: int) -> Dict[str, torch.Tensor]:
    """generated_rows generated transitions followed by online_rows online ones."""
    generated_part, online_part = generated.sample(generated_rows), online.sample(online_rows)
    return {name: torch.cat([generated_part[name], online_part[name]]) for name in generated_part}


def sample_union(first: "ReplayBuffer", second: "ReplayBuffer", batch_size: int) -> Dict[str, torch.Tensor]:
    """Uniform rows of the two buffers taken as one (CORL's single offline + online buffer), without a copy."""
    index = torch.randint(0, len(first) + len(second), (batch_size,), device=first.device)
    from_second = index >= len(first)
    first_index = index.clamp(max=len(first) - 1)
    second_index = (index - len(first)).clamp(min=0, max=max(len(second) - 1, 0))
    return {name: torch.where(from_second[:, None], second.data[name][second_index], column[first_index])
            for name, column in first.data.items()}


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

    # Offline phase: the dataset alone. Online: real online transitions mixed with generated ones.
    offline = transition_columns(data)
    offline["states"] = (offline["states"] - state_mean) / state_std
    offline["next_states"] = (offline["next_states"] - state_mean) / state_std
    offline["rewards"] = offline["rewards"] * reward_scale + reward_bias
    columns = {"states": state_dim, "actions": action_dim, "rewards": 1, "next_states": state_dim, "dones": 1}
    offline_capacity = min(config.buffer_size, len(data["observations"]))
    offline_buffer = ReplayBuffer(offline_capacity, columns, device)
    # Filled once, exactly: offline_buffer.data holds the offline data in order (what a refresh fits).
    offline_buffer.add_batch(**{name: values[-offline_capacity:] for name, values in offline.items()})
    online_buffer = ReplayBuffer(max(min(config.buffer_size, config.online_iterations), 1), columns, device)
    simulator = Simulator(make_env(info, seed=config.seed), state_mean, state_std, reward_scale, reward_bias)
    relabel = relabel_with(simulator, device, config.edis.simulator_labels)
    edis = EDIS(config.edis, state_dim, action_dim, max_action, device)
    generated_batch_size = int(config.batch_size * config.edis.mix_ratio)
    online_batch_size = config.batch_size - generated_batch_size

    agent = ImplicitQLearning(config, state_dim, action_dim, max_action, device)
    collector = OnlineCollector(env, info, config.seed, reward_scale, reward_bias)
    last_step = config.offline_iterations + config.online_iterations

    with Run(config, info, device, "IQL-EDIS", len(data["observations"]), max_steps,
             closing=(env, eval_envs, simulator.env)) as run:
        for t in run.steps({"agent": agent, "edis": edis, "generated": edis.generated, "online_buffer": online_buffer,
                            "collector": collector}):
            phase, step = ("offline" if t < config.offline_iterations else "online"), t + 1
            # Online starts with a fit alone, unless each refresh refits from scratch (no head start needed).
            if t == config.offline_iterations and not config.edis.retrain_from_scratch:
                run.log(edis.refresh(offline_buffer.data, online_buffer, agent), t, phase)
            episode_log = None
            if phase == "online":
                action = agent.act(collector.state, explore=True)
                transition, episode_log = collector.step(action)
                online_buffer.add(**transition)
                # No refresh at the last step, where a single update would see its samples (the reference loop
                # keeps it: its utd_ratio updates at that step use them).
                refreshed = collector.env_steps % config.edis.refresh_every == 0 and (
                    step < last_step or config.edis.replay == "reference")
                if refreshed:
                    refresh_log = edis.refresh(offline_buffer.data, online_buffer, agent, relabel)
                    refresh_log.update(measure_refresh(edis, simulator, offline_buffer.data, agent))
                    run.log({**refresh_log, "env_steps": collector.env_steps}, step, phase)
                if config.edis.replay == "reference":
                    # The public code's loop: plain IQL fine-tuning on offline + online data, except that
                    # each refresh step makes utd_ratio updates on generated + online batches instead.
                    if refreshed and len(edis.generated):
                        for _ in range(config.edis.utd_ratio - 1):
                            agent.update(mixed_batch(edis.generated, online_buffer, generated_batch_size,
                                                     online_batch_size))
                            run.updates["online"] += 1
                        batch = mixed_batch(edis.generated, online_buffer, generated_batch_size, online_batch_size)
                    else:
                        batch = sample_union(offline_buffer, online_buffer, config.batch_size)
                else:
                    # Until the first refresh has generated anything, offline data stand in for generated data.
                    generated_source = edis.generated if len(edis.generated) else offline_buffer
                    batch = mixed_batch(generated_source, online_buffer, generated_batch_size, online_batch_size)
            else:
                batch = offline_buffer.sample(config.batch_size)
            losses = agent.update(batch)
            run.log_step(step, phase, losses, episode_log)
            if evaluation_due(step, config):
                metrics = evaluate(eval_envs, lambda s: agent.act(s, explore=False), info, config.n_episodes,
                                   config.eval_seed)
                run.evaluated(metrics, step, phase, checkpoint=lambda: {
                    "agent": agent.state_dict(), "state_mean": state_mean, "state_std": state_std,
                    **({"edis": edis.state_dict()} if edis.refreshes else {})})  # a fitted EDIS model goes with it
            run.end_step(step, phase, episode_running=collector.episode_length > 0)
    return run.finish(collector.env_steps, edis_refreshes=edis.refreshes)


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
    check_range(config, "tau", 0.0, 1.0)
    check_range(config, "iql_tau", 0.0, 1.0)
    check_range(config, "actor_dropout", 0.0, 1.0)
    for name in ("beta", "expl_noise", "noise_clip"):
        check_range(config, name, 0.0, math.inf)
    for name in ("actor_lr", "qf_lr", "vf_lr"):
        check_range(config, name, 0.0, math.inf, low_inclusive=False)
    for name in ("hidden_dim", "n_hidden"):
        check_range(config, name, 1, math.inf)
    validate_edis_config(config.edis)


# ==== BEGIN SHARED: EDIS config checks ====
def validate_edis_config(edis: EDISConfig) -> None:
    check_range(edis, "mix_ratio", 0.0, 1.0, label="edis.mix_ratio")
    for name in ("refresh_every", "num_samples", "width", "blocks", "batch_size", "sample_steps", "sample_batch_size",
                 "positive_buffer_size", "energy_hidden", "energy_layers", "energy_batch_size", "energy_negatives",
                 "negative_pool", "transition_pool", "metric_samples"):
        check_range(edis, name, 1, math.inf, label=f"edis.{name}")
    for name in ("initial_fit_steps", "refresh_fit_steps", "energy_epochs", "guidance_state", "guidance_transition",
                 "guidance_policy", "s_churn", "inpainting_weight"):
        check_range(edis, name, 0, math.inf, label=f"edis.{name}")
    for name in ("lr", "grad_clip", "energy_lr", "sigma_min", "sigma_data", "rho", "guidance_clip", "p_std",
                 "drop_beyond_std"):
        check_range(edis, name, 0.0, math.inf, low_inclusive=False, label=f"edis.{name}")
    check_range(edis, "ema_decay", 0.0, 1.0, label="edis.ema_decay")
    check_range(edis, "utd_ratio", 1, math.inf, label="edis.utd_ratio")
    if edis.replay not in ("paper", "reference"):
        raise UserError(f"edis.replay = {edis.replay!r} must be paper or reference")
    if edis.transition_pool < edis.energy_negatives:
        raise UserError(f"edis.transition_pool = {edis.transition_pool} must be at least edis.energy_negatives = "
                        f"{edis.energy_negatives} (energy_negatives runs per conditioned positive)")
    if edis.time_embedding_dim < 2 or edis.time_embedding_dim % 2:
        raise UserError(f"edis.time_embedding_dim = {edis.time_embedding_dim} must be even and at least 2")
    if edis.sigma_max <= edis.sigma_min:
        raise UserError(f"edis.sigma_max = {edis.sigma_max} must exceed edis.sigma_min = {edis.sigma_min}")
# ==== END SHARED: EDIS config checks ====


# ==== BEGIN SHARED: EDIS fidelity metrics ====
def rbf_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel, bandwidth = median pairwise distance."""
    joint = torch.cat([x, y])
    distances = torch.cdist(joint, joint) ** 2
    bandwidth = distances[distances > 0].median().clamp_min(1e-6)
    kernel = torch.exp(-distances / bandwidth)
    n = len(x)
    return float(kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean())


STATE_FROM_OBSERVATION = ("Hopper", "Walker2d", "HalfCheetah")  # observe qpos without the x position, then qvel


def observation_gives_state(env: gym.Env) -> bool:
    return env.spec is not None and env.spec.id.split("-")[0] in STATE_FROM_OBSERVATION


def simulator_steps(env: gym.Env, states: np.ndarray, actions: np.ndarray
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s', r, terminated) of the simulator set to each raw s (x = 0: rewards use x differences only), stepping a.

    Only for envs where `observation_gives_state`.
    """
    base = env.unwrapped
    env.reset(seed=0)
    nq = base.model.nq
    next_states, rewards, terminated = np.empty_like(states), np.empty(len(states)), np.empty(len(states))
    for i, (state, action) in enumerate(zip(states, actions, strict=True)):
        base.set_state(np.concatenate([[0.0], state[:nq - 1]]), state[nq - 1:])
        next_states[i], rewards[i], terminated[i], *_ = base.step(
            np.clip(action, env.action_space.low, env.action_space.high))
    return next_states, rewards, terminated


def dynamics_errors(env: gym.Env, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray,
                    rewards: np.ndarray, dones: np.ndarray, next_state_std: np.ndarray, reward_std: float
                    ) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per row, the error of generated (s', r, done) against the simulator, (s', r) in units of the data's std.

    Returns (mean over dimensions of the squared s' error / next_state_std^2, |r error| / reward_std,
    1 where the generated done flag is not the simulator's termination), so that numbers compare across
    envs, or None where the observation does not give the state. With done = 0 on every generated row,
    the last is the share of rows that hide a fall.
    """
    if not observation_gives_state(env):
        return None
    true_next_states, true_rewards, true_dones = simulator_steps(env, states, actions)
    state_errors = np.mean(((true_next_states - next_states) / next_state_std) ** 2, axis=1)
    return state_errors, np.abs(true_rewards - rewards) / reward_std, (true_dones != (dones > 0.5)).astype(float)


def mean_and_standard_error(values: np.ndarray) -> Tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(max(len(values), 1)))


@dataclass
class Simulator:
    """What the measurements need beside EDIS: an env that steps any (s, a), and the agent's units."""

    env: gym.Env
    state_mean: np.ndarray
    state_std: np.ndarray
    reward_scale: float
    reward_bias: float
    note_shown: bool = False  # the note that an env's observation does not give its state, shown once


def relabel_with(simulator: Simulator, device: torch.device, enabled: bool) -> Optional[Callable]:
    """edis.simulator_labels: the refresh's relabelling of generated rows by the simulator (None when off),
    checked before the run starts."""
    if not enabled:
        return None
    if not observation_gives_state(simulator.env):
        raise UserError(f"edis.simulator_labels needs an env whose observation gives its simulator state "
                        f"({', '.join(STATE_FROM_OBSERVATION)}), not {simulator.env.spec.id}")
    return functools.partial(simulator_labels, simulator, device)


def simulator_labels(simulator: Simulator, device: torch.device, rows: Dict[str, torch.Tensor]
                     ) -> Dict[str, torch.Tensor]:
    """The simulator's (r, s', done) for each row's (s, a), in the agent's units."""
    states = rows["states"].cpu().numpy() * simulator.state_std + simulator.state_mean
    next_states, rewards, terminated = simulator_steps(simulator.env, states, rows["actions"].cpu().numpy())
    labels = {"next_states": (next_states - simulator.state_mean) / simulator.state_std, "dones": terminated[:, None],
              "rewards": rewards[:, None] * simulator.reward_scale + simulator.reward_bias}
    return {name: torch.as_tensor(value, dtype=torch.float32, device=device) for name, value in labels.items()}


def measure_refresh(edis: "EDIS", simulator: Simulator, offline: Dict[str, torch.Tensor], agent: Any
                    ) -> Dict[str, float]:
    """What guidance bought at the last refresh: its guided samples and unguided ones of the same model against
    the recent online data (state MMD, policy log-likelihood, the simulator's dynamics); {} after a fit alone."""
    samples, config = edis.last_samples, edis.config
    count = 0 if samples is None else min(config.metric_samples, len(samples["unguided"]), len(samples["guided"]))
    if count < 2:  # no samples yet, or everything was dropped: nothing to measure
        return {}
    reference_states = samples["online_states"][-count:]
    offline_states = offline["states"][torch.randperm(len(offline["states"]), device=edis.device)[:count]]
    log = {"edis/state_mmd_offline": rbf_mmd(offline_states, reference_states)}
    # The dynamics errors are in units of the data's std, so that numbers compare across envs.
    data_std = {"next_states": offline["next_states"].std(0).cpu().numpy() * simulator.state_std + 1e-6,
                "rewards": float(offline["rewards"].std()) / abs(simulator.reward_scale) + 1e-6}
    for label in ("guided", "unguided"):
        batch = edis.layout.split(samples[label][:count])
        log.update(alignment(edis, simulator, label, batch, reference_states, agent, data_std))
    return log


def alignment(edis: "EDIS", simulator: Simulator, label: str, batch: Dict[str, torch.Tensor],
              online_states: torch.Tensor, agent: Any, data_std: Dict[str, Any]) -> Dict[str, float]:
    """The three properties of generated data the paper claims, for one batch (means with standard errors)."""
    metrics = {f"edis/state_mmd_{label}": rbf_mmd(batch["states"], online_states)}
    outside = batch["actions"].abs() > edis.max_action  # action dimensions that are clamped onto the bounds
    metrics[f"edis/actions_out_of_bounds_{label}"] = float(outside.float().mean())
    log_prob = policy_log_prob(agent, batch["states"], batch["actions"].clamp(-edis.max_action, edis.max_action))
    if log_prob is not None:
        mean, error = mean_and_standard_error(log_prob.cpu().numpy())
        metrics[f"edis/policy_loglik_{label}"], metrics[f"edis/policy_loglik_{label}_se"] = mean, error
    raw = {name: batch[name].cpu().numpy() for name in ("states", "actions", "next_states", "rewards", "dones")}
    mean, std = simulator.state_mean, simulator.state_std
    errors = dynamics_errors(simulator.env, raw["states"] * std + mean, raw["actions"], raw["next_states"] * std + mean,
                             (raw["rewards"][:, 0] - simulator.reward_bias) / simulator.reward_scale,
                             raw["dones"][:, 0], data_std["next_states"], data_std["rewards"])
    if errors is None:
        if not simulator.note_shown:
            print("note: dynamics fidelity is skipped: this env's observation does not determine its "
                  "simulator state", file=sys.stderr)
            simulator.note_shown = True
        return metrics
    for name, values in zip(("dynamics_state_mse", "dynamics_reward_mae", "dynamics_terminal_error"), errors,
                            strict=True):
        mean, error = mean_and_standard_error(values)
        metrics[f"edis/{name}_{label}"], metrics[f"edis/{name}_{label}_se"] = mean, error
    return metrics
# ==== END SHARED: EDIS fidelity metrics ====


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
