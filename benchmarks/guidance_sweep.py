"""What does each energy's guidance scale do to the generated data? One refresh, many scales.

Rebuilds the state of an IQL-EDIS run at its first refresh: a pretrained agent (a checkpoint, for
example from `benchmarks/finetune.py run --pretrain-only`), `--online-steps` transitions that it
collected with its exploration policy, the diffusion model fitted as the run fits it, and the three
energies trained on those online transitions. Then, from that one model and those energies, it
draws `--rows` samples unguided and with each energy alone at each `--scales` value, and measures
against the online data:

    state MMD            generated states against the online states (lower: closer)
    policy log-lik       log pi(a|s) of the generated actions under the agent's policy (higher: closer)
    s' error, r error    generated (s', r) against the simulator, in units of the data's std (lower)

each with its standard error (MMD: over --repeats independent batches), so that a difference can be
told from noise. Writes <out>/guidance_sweep-<name>.{json,md,png}.

With --redraw, each batch's (r, s', done) is also drawn again, unguided, given its own (s, a)
(replacement inpainting, as E_transition's negatives are drawn), and measured the same way: the
"redrawn" s' and r errors. Guided samples' (s, a) lie elsewhere than unguided ones' (closer to the
online data, where the model may know the dynamics less well); the redrawn errors tell that apart
from what guidance does to the (r, s') block itself. At scale 0 they measure what inpainting costs.

    python benchmarks/guidance_sweep.py --config configs/cpu/hopper-medium-replay.yaml \\
        --checkpoint runs/finetune/checkpoints/pretrain-iql--cpu__hopper-medium-replay--seed0/checkpoint_50000.pt

`--algorithm-file` runs the same measurement with another version of algorithms/iql_edis.py (for
example one from git history), to compare energy designs on the same data and checkpoint.
"""

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ENERGIES = ("state", "policy", "transition")


def load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("sweep_algorithm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def simulator_errors(env: Any, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray,
                     rewards: np.ndarray) -> tuple:
    """Per row: the s' and r errors against the MuJoCo simulator.

    Kept here rather than taken from the algorithm file, so that every --algorithm-file version is
    measured by the same code (older versions compute their metrics differently)."""
    base = env.unwrapped
    env.reset(seed=0)
    nq = base.model.nq
    true_next, true_reward = np.empty_like(next_states), np.empty(len(rewards))
    for i, (state, action) in enumerate(zip(states, actions, strict=True)):
        base.set_state(np.concatenate([[0.0], state[:nq - 1]]), state[nq - 1:])
        true_next[i], true_reward[i], *_ = base.step(np.clip(action, env.action_space.low, env.action_space.high))
    return true_next - next_states, true_reward - rewards


class Setup:
    """The pieces of an IQL-EDIS run at its first refresh, built with the algorithm file's own code."""

    def __init__(self, module: Any, args: argparse.Namespace, refresh: bool = True):
        """refresh=False stops before the diffusion fit: the caller fits the model its own way."""
        self.redraw = getattr(args, "redraw", False)
        config = module.parse_config(module.TrainConfig, module.CONFIG_SECTIONS,
                                     ["--config", args.config, "--device", "cpu", *args.options])
        config.edis.guidance_state = config.edis.guidance_policy = config.edis.guidance_transition = 1.0
        self.module, self.config = module, config
        module.set_seed(args.seed)
        data, info = module.load_dataset(config.dataset, config.env)
        env = module.make_env(info, seed=args.seed)
        self.simulator = module.make_env(info, seed=args.seed)
        max_steps = module.max_episode_steps_of(env)
        self.reward_scale, self.reward_bias = module.reward_transform(
            data, info, config.normalize_reward, config.reward_scale, config.reward_bias, max_steps)
        self.state_mean, self.state_std = module.state_statistics(data["observations"], config.normalize)
        env = module.NormalizeState(env, self.state_mean, self.state_std)
        state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
        self.max_action = float(env.action_space.high[0])
        device = torch.device("cpu")
        offline = module.transition_columns(data)
        offline["states"] = (offline["states"] - self.state_mean) / self.state_std
        offline["next_states"] = (offline["next_states"] - self.state_mean) / self.state_std
        offline["rewards"] = offline["rewards"] * self.reward_scale + self.reward_bias
        self.offline = {name: torch.as_tensor(values, dtype=torch.float32) for name, values in offline.items()}
        self.agent = module.ImplicitQLearning(config, state_dim, action_dim, self.max_action, device)
        self.agent.load_state_dict(module.load_checkpoint(args.checkpoint, device)["agent"])
        columns = {"states": state_dim, "actions": action_dim, "rewards": 1, "next_states": state_dim, "dones": 1}
        self.online = module.ReplayBuffer(args.online_steps, columns, device)
        collector = module.OnlineCollector(env, info, args.seed, self.reward_scale, self.reward_bias)
        for _ in range(args.online_steps):
            transition, _ = collector.step(self.agent.act(collector.state, explore=True))
            self.online.add(**transition)
        env.close()
        if hasattr(module, "Simulator"):  # the measurement env lives beside EDIS, not in it
            self.fidelity = module.Simulator(self.simulator, self.state_mean, self.state_std, self.reward_scale,
                                             self.reward_bias)
            self.edis = module.EDIS(config.edis, state_dim, action_dim, self.max_action, device)
        else:  # an older algorithm file (--algorithm-file)
            self.fidelity = None
            self.edis = module.EDIS(config.edis, state_dim, action_dim, self.max_action, device, self.simulator,
                                    self.state_mean, self.state_std, self.reward_scale, self.reward_bias)
        raw_next = self.offline["next_states"].numpy() * self.state_std + self.state_mean
        self.next_state_std = raw_next.std(0) + 1e-6
        self.reward_std = float(data["rewards"].std()) + 1e-6
        if not refresh:
            return
        start = time.perf_counter()
        empty = module.ReplayBuffer(1, columns, device)
        if not config.edis.retrain_from_scratch:
            self.edis.refresh(self.offline, empty, self.agent)  # the fit at online start
        self.refresh_log = self.edis.refresh(self.offline, self.online, self.agent)
        if self.fidelity is not None:  # older algorithm files measured inside the refresh
            self.refresh_log.update(module.measure_refresh(self.edis, self.fidelity, self.offline, self.agent))
        self.refresh_seconds = time.perf_counter() - start

    def measure(self, scales: Dict[str, float], rows: int, repeats: int) -> Dict[str, Any]:
        """Metrics of `repeats` batches of `rows` samples at these guidance scales (all 0: unguided)."""
        energies = self.edis.energies
        energies.scales = dict(scales)
        guided = any(value > 0 for value in scales.values())
        online_states = self.module.recent_rows(self.online, len(self.online))["states"]
        mmd, loglik = [], []
        errors: Dict[str, List[np.ndarray]] = {key: [] for key, _ in METRICS[2:]}
        for _ in range(repeats):
            with torch.no_grad():  # the guidance takes its own gradients inside
                samples, _ = self.edis.diffusion.sample(rows, guidance=energies.guidance if guided else None)
            batch = self.edis.layout.split(samples)
            reference = online_states[torch.randperm(len(online_states))[:rows]]
            mmd.append(self.module.rbf_mmd(batch["states"], reference))
            actions = batch["actions"].clamp(-self.max_action, self.max_action)
            loglik.append(self.module.policy_log_prob(self.agent, batch["states"], actions).detach().numpy())
            state_error, reward_error = self.dynamics_errors(batch)
            errors["dynamics_state_mse"].append(state_error)
            errors["dynamics_reward_mae"].append(reward_error)
            if self.redraw:  # the model's own (r, s', done) at these (s, a), drawn without guidance
                masks = energies.masks
                with torch.no_grad():
                    redrawn, _ = self.edis.diffusion.sample(rows, known=self.edis.diffusion.normalize(samples),
                                                            known_mask=masks["state"] + masks["policy"])
                state_error, reward_error = self.dynamics_errors(self.edis.layout.split(redrawn))
                errors["dynamics_state_mse_redrawn"].append(state_error)
                errors["dynamics_reward_mae_redrawn"].append(reward_error)

        def summary(values: np.ndarray) -> List[float]:
            return [float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))]

        return {"state_mmd": summary(np.array(mmd)), "policy_loglik": summary(np.concatenate(loglik)),
                **{key: summary(np.concatenate(values)) for key, values in errors.items() if values}}

    def dynamics_errors(self, batch: Dict[str, torch.Tensor]) -> tuple:
        """Per row: squared s' error and absolute r error against the simulator, in units of the data's std."""
        raw = {name: batch[name].numpy() for name in ("states", "actions", "next_states", "rewards")}
        next_error, r_error = simulator_errors(
            self.simulator, raw["states"] * self.state_std + self.state_mean, raw["actions"],
            raw["next_states"] * self.state_std + self.state_mean,
            (raw["rewards"][:, 0] - self.reward_bias) / self.reward_scale)
        return np.mean((next_error / self.next_state_std) ** 2, axis=1), np.abs(r_error) / self.reward_std


METRICS = (("state_mmd", "state MMD (lower)"), ("policy_loglik", "policy log-lik (higher)"),
           ("dynamics_state_mse", "s' error / std^2 (lower)"), ("dynamics_reward_mae", "r error / std (lower)"),
           ("dynamics_state_mse_redrawn", "redrawn s' error / std^2"), ("dynamics_reward_mae_redrawn",
                                                                        "redrawn r error / std"))


def write_outputs(result: Dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"guidance_sweep-{name}.json").write_text(json.dumps(result, indent=1))
    unguided = result["unguided"]
    metrics = [(key, label) for key, label in METRICS if key in unguided]  # redrawn: only with --redraw
    lines = [f"Guidance sweep, {result['config']} (checkpoint {result['checkpoint']}, {result['online_steps']} "
             f"online steps, {result['rows']} rows x {result['repeats']} batches per setting, "
             f"algorithm file {result['algorithm_file']}). Mean ± standard error.", "",
             "| energy | scale | " + " | ".join(label for _, label in metrics) + " | guidance norm | clipped |",
             "|---|---|" + "---|" * (len(metrics) + 2)]

    def cells(values: Dict[str, List[float]]) -> str:
        return " | ".join(f"{values[key][0]:.4f} ± {values[key][1]:.4f}" for key, _ in metrics)

    lines.append(f"| none | 0 | {cells(unguided)} | - | - |")
    if "together" in result:
        scales = result["together"]["scales"]
        label = " / ".join(f"{scales[energy]:g}" for energy in ENERGIES)
        lines.append(f"| all three (state / policy / transition) | {label} | {cells(result['together']['metrics'])} "
                     "| - | - |")
    for energy in ENERGIES:
        for entry in result["sweep"][energy]:
            norm = entry.get("guidance_norm")
            clipped = entry.get("guidance_clipped")
            lines.append(f"| {energy} | {entry['scale']:g} | {cells(entry['metrics'])} | "
                         f"{'-' if norm is None else f'{norm:.3f}'} | "
                         f"{'-' if clipped is None else f'{clipped:.2f}'} |")
    (out / f"guidance_sweep-{name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for energy in ENERGIES:
            entries = result["sweep"][energy]
            scales = [0.0] + [entry["scale"] for entry in entries]
            means = [unguided[key][0]] + [entry["metrics"][key][0] for entry in entries]
            errors = [unguided[key][1]] + [entry["metrics"][key][1] for entry in entries]
            ax.errorbar(scales, means, yerr=errors, marker="o", capsize=3, label=f"E_{energy} alone")
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xlabel("guidance scale")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['config']}: one energy at a time, against unguided (scale 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"guidance_sweep-{name}.png", dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="a pretrained IQL (or IQL-EDIS) checkpoint")
    parser.add_argument("--online-steps", type=int, default=5000, help="online transitions before the refresh")
    parser.add_argument("--scales", nargs="*", type=float, default=[0.25, 0.5, 1.0, 2.0, 4.0],
                        help="scales of the one-energy-at-a-time sweep (none: only unguided and --together)")
    parser.add_argument("--rows", type=int, default=2000, help="samples per batch")
    parser.add_argument("--repeats", type=int, default=2, help="batches per setting")
    parser.add_argument("--together", nargs=3, type=float, metavar=("STATE", "POLICY", "TRANSITION"),
                        help="also measure these three scales at once (for example the defaults)")
    parser.add_argument("--redraw", action="store_true",
                        help="also redraw each batch's (r, s', done) unguided given its (s, a) and measure that")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithm-file", default=str(ROOT / "algorithms" / "iql_edis.py"))
    parser.add_argument("--name", default="", help="output name (default: the config's file name)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="after --: options for the config (--edis.x y)")
    args = parser.parse_args()
    args.options = args.options[1:] if args.options[:1] == ["--"] else args.options
    module = load_module(Path(args.algorithm_file))
    try:
        started = time.perf_counter()
        setup = Setup(module, args)
        print(f"refresh done in {setup.refresh_seconds:.0f} s; sweeping", flush=True)
        result = {"config": args.config, "checkpoint": args.checkpoint, "online_steps": args.online_steps,
                  "rows": args.rows, "repeats": args.repeats, "seed": args.seed,
                  "algorithm_file": str(Path(args.algorithm_file).resolve().relative_to(ROOT))
                  if Path(args.algorithm_file).resolve().is_relative_to(ROOT) else args.algorithm_file,
                  "refresh_log": setup.refresh_log, "sweep": {}}
        off = {energy: 0.0 for energy in ENERGIES}
        result["unguided"] = setup.measure(off, args.rows, args.repeats)
        for energy in ENERGIES:
            result["sweep"][energy] = []
            for scale in args.scales:
                energies = setup.edis.energies
                if hasattr(energies, "reset_guidance_statistics"):
                    energies.reset_guidance_statistics()
                metrics = setup.measure({**off, energy: scale}, args.rows, args.repeats)
                entry = {"scale": scale, "metrics": metrics}
                if hasattr(energies, "guidance_statistics"):
                    stats = energies.guidance_statistics()
                    entry["guidance_norm"] = stats.get(f"edis/guidance_norm_{energy}")
                    entry["guidance_clipped"] = stats.get(f"edis/guidance_clipped_{energy}")
                result["sweep"][energy].append(entry)
                print(f"{energy} {scale:g}: " + ", ".join(f"{k} {v[0]:.4f}±{v[1]:.4f}" for k, v in metrics.items()),
                      flush=True)
        if args.together:
            scales = dict(zip(ENERGIES, args.together, strict=True))
            setup.edis.energies.reset_guidance_statistics()
            result["together"] = {"scales": scales, "metrics": setup.measure(scales, args.rows, args.repeats),
                                  "guidance": setup.edis.energies.guidance_statistics()}
        result["seconds"] = round(time.perf_counter() - started, 1)
    except Exception as error:
        if type(error).__name__ != "UserError":
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = args.name or Path(args.config).stem
    write_outputs(result, Path(args.out), name)
    print(f"wrote {Path(args.out) / f'guidance_sweep-{name}'}.{{json,md,png}} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
