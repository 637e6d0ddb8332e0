"""The core formulas, each on a case small enough to compute by hand: a wrong sign or a dropped term fails here in
a second, not in a learning check minutes later. The shared sections are identical across files (tested in
test_single_file.py), so each formula is checked in one file that holds it."""

import math

import numpy as np
import pytest
import torch
from torch import nn


class LinearValue(nn.Module):
    """V(s) = w * s[:, 0], w = 1: the value of a state is its first feature."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.w * states[:, 0]


class ActionQ(nn.Module):
    """Q1(s, a) = w * a[:, 0], Q2 = 2 w * a[:, 0]; forward is their minimum (the twin critic's contract)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def both(self, states: torch.Tensor, actions: torch.Tensor):
        return self.w * actions[:, 0], 2 * self.w * actions[:, 0]

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return torch.min(*self.both(states, actions))


def iql_batch(dones):
    # Two rows: s = [3, 0], a = [0.5], r = 1, s' = [10, 0]; the second row ends its episode when dones[1] = 1.
    return {"states": torch.tensor([[3.0, 0.0], [3.0, 0.0]]), "actions": torch.tensor([[0.5], [0.5]]),
            "rewards": torch.tensor([[1.0], [1.0]]), "next_states": torch.tensor([[10.0, 0.0], [10.0, 0.0]]),
            "dones": torch.tensor(dones).reshape(2, 1)}


def iql_agent(iql, beta: float = 3.0):
    config = iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--beta", str(beta), "--discount", "0.99",
                                                                    "--iql_tau", "0.7"])
    torch.manual_seed(0)
    agent = iql.ImplicitQLearning(config, 2, 1, 1.0, torch.device("cpu"))
    agent.vf, agent.qf, agent.q_target = LinearValue(), ActionQ(), ActionQ()
    agent.v_optimizer = torch.optim.SGD(agent.vf.parameters(), lr=0.0)
    agent.q_optimizer = torch.optim.SGD(agent.qf.parameters(), lr=0.0)
    return agent


def test_expectile_loss_weights_negative_errors_by_one_minus_tau(iql):
    # u = -2 weighs |0.7 - 1| = 0.3: 0.3 * 4 = 1.2; u = 1 weighs 0.7: 0.7; mean 0.95
    assert iql.asymmetric_l2_loss(torch.tensor([-2.0, 1.0]), 0.7).item() == pytest.approx(0.95)
    assert iql.asymmetric_l2_loss(torch.tensor([2.0, -1.0]), 0.7).item() == pytest.approx((0.7 * 4 + 0.3) / 2)


@pytest.mark.parametrize("dones", [[0.0, 0.0], [0.0, 1.0]], ids=["no terminal", "terminal row"])
def test_iql_td_target_stops_at_terminal_rows(iql, dones):
    """Q's target is r + (1 - done) * discount * V(s'): V(s') = 10, r = 1, so 10.9, or 1 on a terminal row."""
    agent = iql_agent(iql)
    losses = agent.update(iql_batch(dones))
    targets = np.array([1 + 0.99 * 10, 1 + (1 - dones[1]) * 0.99 * 10])
    q1, q2 = 0.5, 1.0  # w * a and 2 w * a
    expected = (np.mean((q1 - targets) ** 2) + np.mean((q2 - targets) ** 2)) / 2
    assert losses["q_loss"].item() == pytest.approx(expected, rel=1e-6)
    # V by expectile regression towards Q_target(s, a) = min(0.5, 1.0) = 0.5 from V(s) = 3: u = -2.5, weight 0.3
    assert losses["value_loss"].item() == pytest.approx(0.3 * 2.5**2, rel=1e-6)


def test_iql_actor_weights_behaviour_cloning_by_the_exponentiated_advantage(iql):
    agent = iql_agent(iql, beta=0.5)
    batch = iql_batch([0.0, 0.0])
    bc_losses = -agent.actor.log_prob(batch["states"], batch["actions"]).detach()
    advantage = 0.5 - 3.0  # Q_target(s, a) - V(s)
    losses = agent.update(batch)
    assert losses["actor_loss"].item() == pytest.approx(math.exp(0.5 * advantage) * bc_losses.mean().item(),
                                                        rel=1e-5)
    assert iql.EXP_ADV_MAX == 100.0  # the weight's cap, CORL's


@pytest.mark.parametrize("name", ["iql", "calql"])
def test_soft_update_moves_the_target_by_tau(name, request):
    module = request.getfixturevalue(name)
    target, source = nn.Linear(3, 2), nn.Linear(3, 2)
    nn.init.zeros_(target.weight), nn.init.zeros_(target.bias)
    nn.init.ones_(source.weight), nn.init.ones_(source.bias)
    module.soft_update(target, source, 0.005)
    assert torch.allclose(target.weight, torch.full((2, 3), 0.005)) and torch.allclose(target.bias,
                                                                                       torch.full((2,), 0.005))
    assert torch.equal(source.weight, torch.ones(2, 3))


class StateQ(nn.Module):
    """Q(s, a) = w * s[..., 0] + offset for every action; (B, n) for actions (B, n, A)."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.w, self.offset = nn.Parameter(torch.tensor(1.0)), offset

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        value = self.w * states[:, 0] + self.offset
        return value[:, None].expand(-1, actions.shape[1]) if actions.ndim == 3 else value


class FixedActor(nn.Module):
    """Action 0 with log-probability -1, for any state (and `repeat` copies)."""

    def forward(self, states: torch.Tensor, deterministic: bool = False, repeat=None):
        shape = (len(states), repeat, 1) if repeat is not None else (len(states), 1)
        return torch.zeros(shape), torch.full(shape[:-1], -1.0)


def calql_agent(calql, options=()):
    config = calql.parse_config(calql.TrainConfig, calql.CONFIG_SECTIONS, [
        "--discount", "0.99", "--cql_n_actions", "2", "--cql_max_target_backup", "false", "--cql_lagrange", "false",
        "--cql_importance_sample", "true", "--cql_temp", "1.0", "--cql_alpha", "5.0", *options])
    agent = calql.CalQL(config, 1, 1, 1.0, torch.device("cpu"))
    agent.actor = FixedActor()
    agent.critic_1, agent.critic_2 = StateQ(), StateQ()
    agent.target_critic_1, agent.target_critic_2 = StateQ(offset=0.0), StateQ(offset=1.0)
    return agent


def calql_batch(dones, mc_return: float = 0.0):
    # Two rows: s = 2, a = 0.3, r = 1, s' = 10; Q(s, .) = 2 for every action, min target Q(s', .) = 10.
    return {"states": torch.tensor([[2.0], [2.0]]), "actions": torch.tensor([[0.3], [0.3]]),
            "rewards": torch.tensor([[1.0], [1.0]]), "next_states": torch.tensor([[10.0], [10.0]]),
            "dones": torch.tensor(dones).reshape(2, 1), "mc_returns": torch.full((2, 1), mc_return)}


@pytest.mark.parametrize("backup_entropy", [False, True], ids=["plain", "entropy backup"])
@pytest.mark.parametrize("dones", [[0.0, 0.0], [0.0, 1.0]], ids=["no terminal", "terminal row"])
def test_calql_td_target(calql, dones, backup_entropy):
    """r + (1 - done) * discount * (min target Q(s', a') - alpha * log pi(a'|s')): with log pi = -1 and alpha 0.5
    the entropy backup adds 0.5 to the target Q."""
    agent = calql_agent(calql, ["--backup_entropy", str(backup_entropy).lower()])
    log = {}
    agent._q_loss(calql_batch(dones), torch.tensor(0.5), log)
    next_value = 10.0 + (0.5 if backup_entropy else 0.0)
    targets = np.array([1 + 0.99 * next_value, 1 + (1 - dones[1]) * 0.99 * next_value])
    assert log["qf1_loss"].item() == pytest.approx(np.mean((2.0 - targets) ** 2), rel=1e-6)


def cql_gap(values_random: float, values_policy: float, predicted: float) -> float:
    """logsumexp over 2 random actions (Q minus the log-density of U(-1, 1), log 0.5) and 2 + 2 policy actions
    (Q minus log pi = -1), minus Q(s, a) of the data."""
    logits = [values_random - math.log(0.5)] * 2 + [values_policy + 1.0] * 4
    return math.log(sum(math.exp(v) for v in logits)) - predicted


def test_cql_regulariser_pushes_down_q_off_the_data(calql):
    agent = calql_agent(calql)
    agent.calibration_enabled = False
    log = {}
    agent._q_loss(calql_batch([0.0, 0.0], mc_return=5.0), torch.tensor(0.5), log)
    assert log["cql_min_qf1_loss"].item() == pytest.approx(5.0 * cql_gap(2.0, 2.0, 2.0), rel=1e-6)


def test_calibration_bounds_policy_q_values_below_by_the_return_to_go(calql):
    """Cal-QL: Q of the policy's actions (current and next) is raised to the Monte-Carlo return when below it;
    random actions and the data's Q are not."""
    agent = calql_agent(calql)
    log = {}
    agent._q_loss(calql_batch([0.0, 0.0], mc_return=5.0), torch.tensor(0.5), log)
    assert log["cql_min_qf1_loss"].item() == pytest.approx(5.0 * cql_gap(2.0, 5.0, 2.0), rel=1e-6)
    assert log["bound_rate_cql_q1_current_actions"].item() == 1.0
    log = {}
    agent._q_loss(calql_batch([0.0, 0.0], mc_return=-5.0), torch.tensor(0.5), log)  # below Q: no effect
    assert log["cql_min_qf1_loss"].item() == pytest.approx(5.0 * cql_gap(2.0, 2.0, 2.0), rel=1e-6)
    agent.start_online()  # online: calibration off, cql_alpha_online
    assert not agent.calibration_enabled and agent.cql_alpha == agent.config.cql_alpha_online


def test_returns_to_go_restart_at_episode_ends_and_stop_at_terminals(calql):
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    terminals = np.array([0, 0, 1, 0, 0], np.float32)  # episode 1 ends in a terminal, episode 2 by a timeout
    ends = np.array([0, 0, 1, 0, 1], bool)
    returns = calql.returns_to_go(rewards, terminals, ends, 0.5)
    assert returns.tolist() == pytest.approx([1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3, 4 + 0.5 * 5, 5])
    # a terminal stops the return where it is, even where no episode end is marked
    stopped = calql.returns_to_go(rewards[:3], np.array([0, 1, 0], np.float32), np.array([0, 0, 1], bool), 0.5)
    assert stopped.tolist() == pytest.approx([1 + 0.5 * 2, 2, 3])
    # an episode that never left the failure reward is worth failing forever: r / (1 - discount)
    failed = calql.returns_to_go(np.array([-1.0, -1.0, 0.0], np.float32), np.zeros(3, np.float32),
                                 np.array([0, 1, 1], bool), 0.5, sparse_failure_reward=-1.0)
    assert failed.tolist() == pytest.approx([-2.0, -2.0, 0.0])


def test_edm_preconditioning_and_loss_weight(iql_edis):
    config = iql_edis.parse_config(iql_edis.TrainConfig, iql_edis.CONFIG_SECTIONS, ["--edis.sigma_data", "0.5"])
    diffusion = iql_edis.TransitionDiffusion(2, config.edis, torch.device("cpu"))
    seen = {}

    class Probe(nn.Module):
        def forward(self, x, c_noise):
            seen["input"], seen["c_noise"] = x, c_noise
            return torch.ones_like(x)

    x, sigma = torch.tensor([[1.0, -2.0]]), torch.tensor([2.0])
    denoised = diffusion.denoise(x, sigma, Probe())
    total = 2.0**2 + 0.5**2
    c_skip, c_out, c_in = 0.5**2 / total, 2.0 * 0.5 / math.sqrt(total), 1 / math.sqrt(total)
    assert torch.allclose(denoised, c_skip * x + c_out)
    assert torch.allclose(seen["input"], c_in * x) and seen["c_noise"].item() == pytest.approx(math.log(2.0) / 4)
    assert iql_edis.edm_loss_weight(torch.tensor([3.0]), 0.5).item() == pytest.approx((9 + 0.25) / 1.5**2)


def test_guidance_shift_is_sigma_squared_scale_times_the_energy_gradient_per_block(iql_edis):
    """The guided denoiser is D - shift with shift = sigma^2 * scale * grad E on each energy's own block, clipped
    in norm per block: with E(x) = w . x it moves x against w, towards lower energy."""
    config = iql_edis.parse_config(iql_edis.TrainConfig, iql_edis.CONFIG_SECTIONS, [
        "--edis.guidance_state", "0.5", "--edis.guidance_policy", "2.0", "--edis.guidance_transition", "0",
        "--edis.guidance_clip", "1.0"])
    layout = iql_edis.TransitionLayout(2, 1, False)  # x = (s1, s2, a, r, s'1, s'2)
    energies = iql_edis.TransitionEnergies(layout, config.edis, torch.device("cpu"))
    w = torch.tensor([0.1, -0.2, 0.3, 5.0, 5.0, 5.0])

    class Linear(nn.Module):
        def forward(self, x, sigma):
            return x @ w

    energies.networks = {name: Linear() for name in energies.active}
    x = torch.zeros(2, layout.dim)
    shift = energies.guidance(x, torch.tensor([1.0, 3.0]))
    # sigma 1: state block 0.5 * (0.1, -0.2) (norm 0.11, under the clip); policy 2.0 * 0.3 = 0.6; (r, s') untouched
    assert torch.allclose(shift[0], torch.tensor([0.05, -0.1, 0.6, 0.0, 0.0, 0.0]))
    # sigma 3: x9 -> state (0.45, -0.9), norm 1.006, clipped to norm 1; policy 5.4, clipped to 1
    state = torch.tensor([0.45, -0.9])
    assert torch.allclose(shift[1, :2], state / state.norm()) and shift[1, 2].item() == pytest.approx(1.0)
    assert torch.count_nonzero(shift[:, 3:]) == 0
