"""The public EDIS code's side of benchmarks/public_code.py; runs in the public code's own environment.

Not for direct use: `python benchmarks/public_code.py run` calls it with the interpreter of the environment that
`public_code.py setup` made from benchmarks/public_code_requirements.txt, on the data it prepared. It imports only
the standard library, numpy, torch and the public code (github.com/liuxhym/EDIS, a checkout given by path), whose
imports of gym, d4rl, mujoco_py and wandb are met by the small shims below, written into a temporary folder.

It trains the public code's denoiser and energies through its own classes (construct_diffusion_model, REDQTrainer:
train_from_redq_buffer and the three train_*_energy methods that train_energy calls, SimpleDiffusionGenerator), as
its IQL-EDIS does at a refresh, then samples with its guided sampler at each requested setting from the same noise,
and writes the samples, the energies' losses, the guidance's share of the sampler's derivative per step and the
checks of benchmarks/public_code.py's findings to an .npz file and a .json file.
"""

import argparse
import json
import math
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

# Modules the public code imports at the top of files it needs, for things it does not use on this path.
SHIMS = {
    "gym/__init__.py": (
        "class Env:\n    pass\n\n\nclass Wrapper(Env):\n    pass\n\n\n"
        "def make(*args, **kwargs):\n    raise NotImplementedError('gym shim: no environments')\n"),
    "gym/spaces/__init__.py": "class Box:\n    def __init__(self, shape):\n        self.shape = tuple(shape)\n",
    "d4rl/__init__.py": "def qlearning_dataset(*args, **kwargs):\n    raise NotImplementedError('d4rl shim')\n",
    "mujoco_py/__init__.py": "",
    "wandb/__init__.py": ("def init(*args, **kwargs):\n    return None\n\n\n"
                          "def log(*args, **kwargs):\n    return None\n\n\n"
                          "def finish(*args, **kwargs):\n    return None\n"),
}


def write_shims(folder: Path) -> None:
    for relative, text in SHIMS.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


class BehaviourPolicy(torch.nn.Module):
    """The driver's behaviour-cloned actor (tanh mean, state-independent std) from its weights; forward gives a
    distribution, which the public code's policy energy samples with rsample()."""

    def __init__(self, weights: Dict[str, np.ndarray]):
        super().__init__()
        count = len([key for key in weights if key.startswith("actor_weight_")])
        self.layers = torch.nn.ModuleList()
        for i in range(count):
            weight, bias = weights[f"actor_weight_{i}"], weights[f"actor_bias_{i}"]
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.weight.data.copy_(torch.as_tensor(weight))
            layer.bias.data.copy_(torch.as_tensor(bias))
            self.layers.append(layer)
        self.log_std = torch.nn.Parameter(torch.as_tensor(weights["actor_log_std"]))

    def forward(self, states: torch.Tensor) -> torch.distributions.Normal:
        x = states
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.relu(x) if i < len(self.layers) - 1 else torch.tanh(x)
        return torch.distributions.Normal(x, self.log_std.clamp(-20, 2).exp())


def replay_buffer(module: Any, data: Dict[str, np.ndarray], prefix: str) -> Any:
    """The public code's calq_ReplayBuffer holding the driver's rows (states already standardised, as its
    IQL-EDIS stores them)."""
    states = data[f"{prefix}_states"]
    buffer = module.calq_ReplayBuffer(states.shape[1], data[f"{prefix}_actions"].shape[1], len(states), "cpu")
    buffer.load_d4rl_dataset({"observations": states, "actions": data[f"{prefix}_actions"],
                              "rewards": data[f"{prefix}_rewards"], "next_observations": data[f"{prefix}_next_states"],
                              "terminals": np.zeros(len(states), np.float32),
                              "mc_returns": np.zeros(len(states), np.float32)})
    return buffer


def schedule(steps: int) -> List[float]:
    """The sampler's noise levels for `steps` steps (EDM, rho 7, 0.002 to 80), as the public code computes them."""
    rho, low, high = 7.0, 0.002, 80.0
    return [(high ** (1 / rho) + i / (steps - 1 + 1e-20) * (low ** (1 / rho) - high ** (1 / rho))) ** rho
            for i in range(steps)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--public-code", required=True)
    parser.add_argument("--inputs", required=True, help=".npz written by public_code.py")
    parser.add_argument("--output", required=True, help="prefix of the .npz and .json written here")
    parser.add_argument("--gin", required=True, help="the public code's config for this task (configs/...gin)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=10_000)
    parser.add_argument("--energy-epochs", type=int, default=20, help="its TrainConfig.energy_train_epoch")
    parser.add_argument("--rows", type=int, default=2_000, help="samples per setting")
    parser.add_argument("--settings", required=True, help="JSON list of [name, state, transition, policy] scales")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    shims = Path(tempfile.mkdtemp(prefix="edis-public-shims-"))
    write_shims(shims)
    sys.path[:0] = [str(shims), str(Path(args.public_code).resolve())]
    import gin  # noqa: E402  (the public code's own dependency, installed in its environment)
    from common import buffer as public_buffer  # noqa: E402
    from common.energy import energy_model  # noqa: E402
    from diffusion.denoiser_network import ResidualMLPDenoiser  # noqa: E402,F401  (registers it with gin)
    from diffusion.train_diffuser import SimpleDiffusionGenerator  # noqa: E402
    from diffusion.trainer import REDQTrainer  # noqa: E402
    from diffusion.utils import construct_diffusion_model  # noqa: E402

    data = dict(np.load(args.inputs))
    state_dim, action_dim = data["offline_states"].shape[1], data["offline_actions"].shape[1]
    gin.parse_config_files_and_bindings([args.gin], [
        f"ResidualMLPDenoiser.mlp_width = {args.width}", f"ResidualMLPDenoiser.num_layers = {args.blocks}",
        f"REDQTrainer.train_num_steps = {args.fit_steps}"], skip_unknown=True)  # its TrainConfig: not imported
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    env = types.SimpleNamespace(observation_space=types.SimpleNamespace(shape=(state_dim,)),
                                action_space=types.SimpleNamespace(shape=(action_dim,)))
    # The flags and scales its sampler reads from the run's argparse namespace (all off while training).
    flags = types.SimpleNamespace(state_guide=True, transition_guide=True, policy_guide=True, ope_clip=0.0,
                                  te_clip=0.0, pe_clip=0.0, grad_clip=1.0)
    offline = replay_buffer(public_buffer, data, "offline")
    online = replay_buffer(public_buffer, data, "online")
    inputs = torch.cat([offline._states, offline._actions, offline._rewards, offline._next_states], dim=1)
    energies = {name: energy_model(obs_dim=state_dim, action_dim=action_dim, hidden_dims=3, activation="relu",
                                   with_reward=True, spectral_norm=True, layer_type="MLP", device="cpu")
                for name in ("state", "transition", "policy")}
    optimizers = {name: torch.optim.Adam(network.parameters(), 1e-3) for name, network in energies.items()}
    trainer = REDQTrainer(construct_diffusion_model(inputs=inputs, skip_dims=[state_dim + action_dim], args=flags),
                          state_energy=energies["state"], transition_energy=energies["transition"],
                          policy_energy=energies["policy"], ope_optim=optimizers["state"],
                          te_optim=optimizers["transition"], pe_optim=optimizers["policy"],
                          energy_train_epoch=args.energy_epochs, results_folder=str(shims / "results"), args=flags)
    trainer.update_normalizer(offline, device="cpu")
    trainer.train_from_redq_buffer(offline)
    actor = BehaviourPolicy(data)
    model = trainer.ema.ema_model
    flags = model.args  # EMA deep-copied the model, and its sampler reads the copy's flags

    # The energies, trained as train_energy trains them (one online batch per epoch, 10 negatives per row),
    # with each loss recorded per positive row; chance: every positive as likely as each of its negatives.
    negatives = 10
    losses: Dict[str, List[float]] = {"state": [], "transition": [], "policy": []}
    levels = {"state": list(range(0, model.num_sample_steps, 128)), "transition": list(range(0, model.num_sample_steps,
                                                                                               16))}
    levels["policy"] = levels["transition"]
    for _ in range(args.energy_epochs):
        batch = online.sample(trainer.ebm_batch_size)
        rows = trainer.ebm_batch_size
        losses["state"].append(trainer.train_state_energy(batch, negatives, env).item()
                               / (rows * len(levels["state"])))
        losses["transition"].append(trainer.train_transition_energy(batch, negatives, env).item()
                                    / (rows * len(levels["transition"])))
        losses["policy"].append(trainer.train_policy_energy(batch, actor, negatives, env).item()
                                / (rows * len(levels["policy"])))
    chance = {"state": math.log(trainer.ebm_batch_size * (1 + negatives)), "transition": math.log(1 + negatives),
              "policy": math.log(1 + negatives)}

    # Ranking on clean held-out rows at the first level's time feature: does an energy put online rows lower?
    ranking = {}
    with torch.no_grad():
        def energy_of(network: Any, prefix: str) -> torch.Tensor:
            columns = [torch.as_tensor(data[f"{prefix}_{column}"]).reshape(len(data[f"{prefix}_states"]), -1)
                       for column in ("states", "actions", "rewards", "next_states")]
            rows = torch.cat([*columns, torch.zeros(len(columns[0]), 1)], dim=1).float()
            return network(rows)
        for name, network in energies.items():
            online_energy, offline_energy = energy_of(network, "heldout_online"), energy_of(network, "heldout_offline")
            ranking[name] = float((online_energy[:, None] < offline_energy[None, :]).float().mean())

    # What its negatives hold: the transition energy's are drawn given (s, a), the policy energy's given s.
    condition_rows = torch.as_tensor(data["online_states"][:256])
    condition = torch.cat([condition_rows, torch.as_tensor(data["online_actions"][:256])], dim=1)
    # Zero up to the rounding of standardising and back (|x| < 1e-4 where the data's std is about 1).
    drawn = model.negative_sample(condition=condition, batch_size=len(condition), negative_step=16, clamp=False)
    transition_negatives_zero = float((drawn[:, state_dim + action_dim:].abs() < 1e-4).all(dim=1).float().mean())
    transition_negatives_hold = float(torch.allclose(drawn[:, :state_dim + action_dim], condition, atol=1e-4))
    drawn = model.negative_sample(condition=condition_rows, batch_size=len(condition_rows), negative_step=16,
                                  clamp=False)
    policy_negatives_zero = float((drawn[:, state_dim:].abs() < 1e-4).all(dim=1).float().mean())
    # The mask, as negative_sample builds it: ones over the first condition.shape[0] (the batch size) columns.
    mask = torch.zeros(len(condition_rows), state_dim * 2 + action_dim + 1)
    mask[..., 0:condition_rows.shape[0]] = 1
    mask_width = int(mask[0].sum())

    # Guided sampling at each setting from the same noise, with the guidance's share of the derivative per step.
    shares: Dict[str, List[List[float]]] = {}
    current: Dict[str, Any] = {}
    original_score, original_guidance = model.score_fn, model.energy_guidance

    def score_fn(x: torch.Tensor, sigma: float, clamp: bool = False, cond: Any = None) -> torch.Tensor:
        current["derivative"] = original_score(x, sigma, clamp=clamp, cond=cond)
        return current["derivative"]

    def energy_guidance(*call_args: Any) -> torch.Tensor:
        guidance = original_guidance(*call_args)
        derivative = current["derivative"].detach()
        step = call_args[-1]
        ratio = (guidance.norm(dim=1) / derivative.norm(dim=1).clamp_min(1e-12)).mean()
        current["shares"].setdefault(step, []).append(float(ratio))
        return guidance

    model.score_fn, model.energy_guidance = score_fn, energy_guidance
    settings = json.loads(args.settings)
    samples = {}
    for name, state_scale, transition_scale, policy_scale in settings:
        flags.state_guide, flags.transition_guide, flags.policy_guide = (state_scale > 0, transition_scale > 0,
                                                                         policy_scale > 0)
        flags.ope_clip, flags.te_clip, flags.pe_clip = state_scale, transition_scale, policy_scale
        current["shares"] = {}
        torch.manual_seed(args.seed + 1)  # the same noise for every setting: paired samples
        generator = SimpleDiffusionGenerator(env=env, ema_model=model, sample_batch_size=args.rows)
        states, actions, rewards, next_states, _ = generator.sample(
            clip=flags.grad_clip, num_samples=args.rows, state_energy=energies["state"],
            transition_energy=energies["transition"], policy_energy=energies["policy"])
        samples[name] = np.concatenate([states, actions, rewards[:, None], next_states], axis=1)
        shares[name] = [float(np.mean(current["shares"][step])) for step in sorted(current["shares"])]

    sampling_steps = generator.num_sample_steps
    report = {
        "energy_losses": losses, "chance": chance, "held_out_ranking": ranking,
        "transition_negatives_free_block_zero": transition_negatives_zero,
        "transition_negatives_hold_condition": transition_negatives_hold,
        "policy_negatives_free_block_zero": policy_negatives_zero,
        "mask_width": mask_width, "row_width": state_dim * 2 + action_dim + 1, "mask_rows": len(condition_rows),
        "energy_training_steps": levels, "energy_schedule_steps": model.num_sample_steps,
        "energy_training_sigmas": {name: [schedule(model.num_sample_steps)[step] for step in steps]
                                   for name, steps in levels.items()},
        "sampling_steps": sampling_steps,
        "sampling_sigmas_at_those_steps": {name: [schedule(sampling_steps)[step] for step in steps]
                                           for name, steps in levels.items()},
        "sampling_sigmas": schedule(sampling_steps),
        "guidance_share": shares,
        "normalizer_std": model.normalizer.std.tolist(),
        "diffusion_parameters": sum(p.numel() for p in model.net.parameters()),
    }
    np.savez_compressed(f"{args.output}.npz", **samples)
    Path(f"{args.output}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}.npz and {args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
