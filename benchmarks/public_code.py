"""The public EDIS code, measured beside ours on the same data (docs/public-code.md).

The public code (github.com/liuxhym/EDIS, the paper's) is never copied here: give a checkout of it. Its
side runs in an environment of its own (its dependencies, pinned in public_code_requirements.txt beside
this file), through benchmarks/public_code_worker.py and small shims for the modules it imports but does not
use here (gym, d4rl, mujoco_py, wandb).

    python benchmarks/public_code.py setup --venv ~/.cache/edis-public-code
    python benchmarks/public_code.py run --public-code ~/src/EDIS --python ~/.cache/edis-public-code/bin/python \\
        --config configs/cpu/walker2d-medium-replay.yaml --online collected:Walker2d-v5:medium --name walker2d

What one run does, on the config's offline data and `--online-rows` rows of the --online data standing in for
online transitions (states standardised with the offline data's statistics, as both codes store them):
- a behaviour-cloned actor on the online rows stands in for the agent (both codes' policy energies and the
  policy log-likelihood use it);
- the public code: its denoiser (--width x --blocks) trained --fit-steps on the offline rows, its three energies
  trained as its refresh trains them, then --rows samples from one noise draw per setting: unguided, IQL-EDIS's
  and Cal-QL-EDIS's configured scales for this task (read from the checkout's gin and TrainConfig) and ten
  times those;
- ours (algorithms/iql_edis.py): the same denoiser size and fit steps, the energies of a refresh on the same
  rows and actor, --rows samples unguided and at the config's scales, from one noise draw;
- per setting: state MMD to the online rows (over --batches batches), the policy log-likelihood of the actions,
  s' and r errors against the MuJoCo simulator, each with its standard error and its paired difference from
  the same code's unguided samples; each energy's loss against chance and how often it ranks a held-out
  online row below a held-out offline one; the guidance's share of the sampler's derivative per noise level;
- the findings about the public code (FINDINGS below) checked directly, each printed as holds or not.

Writes <out>/public-code-<name>.{json,md}.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "public_code_worker.py"
REQUIREMENTS = Path(__file__).resolve().parent / "public_code_requirements.txt"
# The public code's file and the text to find in it, for each finding that a reading of the code can confirm.
SOURCE_CHECKS = {
    "inpainting mask sized by the batch": (
        "diffusion/elucidated_diffusion.py", r"mask\[\.\.\., 0:condition\.shape\[0\]\] = 1"),
    "state energy trains at step 0 only": (
        "diffusion/trainer.py", r"def train_state_energy\(.*contrastive_step = 128\)"),
    "state energy's negatives are raw noise": (
        "diffusion/trainer.py", r"generator\.sample_wo_guidance\(.*denoise_step=step\)"),
    "guidance at the pre-churn point": (
        "diffusion/elucidated_diffusion.py", r"energy_inputs = inputs\.clamp\(-1\., 1\.\) if clamp else inputs$"),
    "guidance in raw units added to the normalised derivative": (
        "diffusion/elucidated_diffusion.py", r"denoised_over_sigma \+= self\.energy_guidance\("),
    "utd_ratio fixed at 20 whatever gin binds": ("algorithms/iql_edis.py", r"self\.utd_ratio: int = 20"),
    "command-line scales overwritten by TrainConfig": ("algorithms/iql_edis.py", r"args\.ope_clip = config\.ope_clip"),
}


class HarnessError(Exception):
    """Bad input: one line, exit code 2."""


def load_algorithm() -> Any:
    spec = importlib.util.spec_from_file_location("public_code_ours", ROOT / "algorithms" / "iql_edis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_guidance_sweep() -> Any:  # its simulator_errors: the same measurement as the guidance sweeps
    spec = importlib.util.spec_from_file_location("public_code_sweep", Path(__file__).resolve().parent /
                                                  "guidance_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Reading the public checkout: its configured scales and the lines behind each finding
# ---------------------------------------------------------------------------------------------
def task_of(env_id: str, dataset: str) -> Tuple[str, str]:
    """Walker2d-v5 + collected:...:medium-replay -> ("walker2d", "medium-replay"), the public configs' names."""
    env = env_id.split("-")[0].lower()
    kind = dataset.rsplit(":", 1)[-1] if dataset.startswith("collected:") else "medium-replay"
    return env, re.sub(r"-v\d+$", "", kind)


def configured_scales(public_code: Path, algorithm: str, env: str, kind: str) -> Tuple[float, float, float]:
    """(state, transition, policy) scales as the public code's run gets them: the gin file's TrainConfig bindings,
    else its TrainConfig defaults (the command-line flags are overwritten by these)."""
    source = (public_code / "algorithms" / f"{algorithm}.py").read_text()
    gin_path = public_code / "configs" / algorithm / env / f"{kind}.gin"
    gin_text = gin_path.read_text() if gin_path.is_file() else ""
    scales = []
    for name in ("ope_clip", "te_clip", "pe_clip"):
        bound = re.search(rf"^TrainConfig\.{name}\s*=\s*([0-9.eE+-]+)", gin_text, re.M)
        default = re.search(rf"self\.{name}: float = ([0-9.eE+-]+)", source)
        if not bound and not default:
            raise HarnessError(f"{algorithm}.py in {public_code} sets no {name}: is this the public EDIS code?")
        scales.append(float((bound or default).group(1)))
    return scales[0], scales[1], scales[2]


def source_lines(public_code: Path) -> Dict[str, Optional[str]]:
    """For each source check, file:line where the public code does it (None: not found in this checkout)."""
    found = {}
    for finding, (relative, pattern) in SOURCE_CHECKS.items():
        path = public_code / relative
        lines = path.read_text().splitlines() if path.is_file() else []
        numbers = [i + 1 for i, line in enumerate(lines) if re.search(pattern, line.strip())]
        found[finding] = f"{relative}:{numbers[0]}" if numbers else None
    return found


# ---------------------------------------------------------------------------------------------
# The measurements, shared by both codes' samples
# ---------------------------------------------------------------------------------------------
def mean_se(values: np.ndarray) -> List[float]:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return [float(values.mean()) if len(values) else float("nan"), float("nan")]
    return [float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))]


class Measure:
    """State MMD to the online rows, the actor's log-likelihood and the simulator's errors, per row or batch."""

    def __init__(self, module: Any, simulator: Any, online_states: torch.Tensor, actor: Callable,
                 state_mean: np.ndarray, state_std: np.ndarray, next_state_std: np.ndarray, reward_std: float,
                 batches: int, seed: int):
        self.module, self.simulator, self.online_states, self.actor = module, simulator, online_states, actor
        self.state_mean, self.state_std = state_mean, state_std
        self.next_state_std, self.reward_std, self.batches, self.seed = next_state_std, reward_std, batches, seed
        self.sweep = load_guidance_sweep()

    def per_row(self, rows: np.ndarray, state_dim: int, action_dim: int) -> Dict[str, np.ndarray]:
        """Per-row metrics and per-batch MMD of samples laid out (s, a, r, s'), states standardised."""
        rows = torch.as_tensor(rows, dtype=torch.float32)
        states, actions = rows[:, :state_dim], rows[:, state_dim:state_dim + action_dim].clamp(-1, 1)
        rewards, next_states = rows[:, state_dim + action_dim], rows[:, state_dim + action_dim + 1:]
        generator = torch.Generator().manual_seed(self.seed)
        mmd = []
        for chunk in torch.tensor_split(torch.arange(len(rows)), self.batches):
            reference = self.online_states[torch.randperm(len(self.online_states), generator=generator)[:len(chunk)]]
            mmd.append(self.module.rbf_mmd(states[chunk], reference))
        with torch.no_grad():
            loglik = self.actor(states, actions).numpy()
        next_error, reward_error = self.sweep.simulator_errors(
            self.simulator, states.numpy() * self.state_std + self.state_mean, actions.numpy(),
            next_states.numpy() * self.state_std + self.state_mean, rewards.numpy())
        return {"state_mmd": np.array(mmd), "policy_loglik": loglik,
                "dynamics_state_mse": np.mean((next_error / self.next_state_std) ** 2, axis=1),
                "dynamics_reward_mae": np.abs(reward_error) / self.reward_std}


METRICS = (("state_mmd", "state MMD to online (lower)"), ("policy_loglik", "policy log-lik (higher)"),
           ("dynamics_state_mse", "s' error / std^2 (lower)"), ("dynamics_reward_mae", "r error / std (lower)"))


def summarise(measured: Dict[str, Dict[str, np.ndarray]], unguided: str) -> Dict[str, Dict[str, List[float]]]:
    """Mean ± standard error of each metric, and of its paired difference from `unguided` (same noise, same row
    or batch)."""
    result = {}
    for name, values in measured.items():
        result[name] = {}
        for metric, _ in METRICS:
            result[name][metric] = mean_se(values[metric])
            result[name][f"{metric}_minus_unguided"] = mean_se(values[metric] - measured[unguided][metric])
    return result


def shares_by_level(shares: List[float], sigmas: List[float]) -> Dict[str, float]:
    """The guidance's share of the derivative, averaged within bands of noise level."""
    bands = (("sigma > 10", 10.0, math.inf), ("1 < sigma <= 10", 1.0, 10.0), ("0.1 < sigma <= 1", 0.1, 1.0),
             ("sigma <= 0.1", 0.0, 0.1))
    result = {}
    for label, low, high in bands:
        inside = [share for share, sigma in zip(shares, sigmas, strict=False) if low < sigma <= high]
        result[label] = float(np.mean(inside)) if inside else float("nan")
    return result


# ---------------------------------------------------------------------------------------------
# Our EDIS on the same rows
# ---------------------------------------------------------------------------------------------
def run_ours(module: Any, config: Any, offline: Dict[str, torch.Tensor], online: Dict[str, torch.Tensor],
             agent: Any, rows: int, seed: int) -> Dict[str, Any]:
    """A refresh of our EDIS on these rows, then paired samples unguided and at the config's scales."""
    state_dim, action_dim = offline["states"].shape[1], offline["actions"].shape[1]
    columns = {"states": state_dim, "actions": action_dim, "rewards": 1, "next_states": state_dim, "dones": 1}
    device = torch.device("cpu")
    online_buffer = module.ReplayBuffer(len(online["states"]), columns, device)
    online_buffer.add_batch(**online)
    edis = module.EDIS(config.edis, state_dim, action_dim, 1.0, device)
    edis.refresh(offline, module.ReplayBuffer(1, columns, device), agent)  # the fit on the offline rows
    log = edis.refresh(offline, online_buffer, agent)  # the energies (no further fit: refresh_fit_steps 0)
    diffusion, energies = edis.diffusion, edis.energies
    scales = {"state": config.edis.guidance_state, "policy": config.edis.guidance_policy,
              "transition": config.edis.guidance_transition}
    original_denoise = diffusion.denoise
    record: Dict[str, Any] = {}

    def denoise(x: torch.Tensor, sigma: torch.Tensor, *rest: Any) -> torch.Tensor:
        record["denoised"] = original_denoise(x, sigma, *rest)
        return record["denoised"]

    def guidance(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        shift = energies.guidance(x, sigma)
        # our derivative is (x - D) / sigma; guidance moves D by `shift`, so its share is |shift| / |x - D|
        share = (shift.norm(dim=1) / (x - record["denoised"]).norm(dim=1).clamp_min(1e-12)).mean()
        record["shares"].setdefault(round(float(sigma[0]), 6), []).append(float(share))
        return shift

    diffusion.denoise = denoise
    samples, shares = {}, {}
    ten_times = {name: 10 * scale for name, scale in scales.items()}
    for name, setting in (("ours unguided", None), ("ours, its scales", scales), ("ours, its scales x10", ten_times)):
        record["shares"] = {}
        energies.scales = dict(setting or scales)
        torch.manual_seed(seed + 1)  # the same noise for every setting: paired samples
        with torch.no_grad():
            generated, _ = diffusion.sample(rows, guidance=guidance if setting else None)
        layout = edis.layout.split(generated)
        samples[name] = torch.cat([layout["states"], layout["actions"], layout["rewards"], layout["next_states"]],
                                  dim=1).numpy()
        shares[name] = {sigma: float(np.mean(values)) for sigma, values in sorted(record["shares"].items(),
                                                                                   reverse=True)}
    diffusion.denoise = original_denoise
    losses = {name.removeprefix("edis/energy_loss_"): value for name, value in log.items()
              if name.startswith("edis/energy_loss_")}
    return {"samples": samples, "shares": shares, "energy_losses": losses, "scales": scales}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def behaviour_cloned_agent(module: Any, config: Any, states: torch.Tensor, actions: torch.Tensor, steps: int,
                           seed: int) -> Any:
    """An IQL agent whose actor is fitted by maximum likelihood to the online rows (the stand-in for the agent)."""
    torch.manual_seed(seed)
    agent = module.ImplicitQLearning(config, states.shape[1], actions.shape[1], 1.0, torch.device("cpu"))
    optimizer = torch.optim.Adam(agent.actor.parameters(), lr=3e-4)
    for _ in range(steps):
        index = torch.randint(0, len(states), (256,))
        loss = -agent.actor.log_prob(states[index], actions[index].clamp(-0.999, 0.999)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return agent


def actor_weights(agent: Any) -> Dict[str, np.ndarray]:
    linear = [layer for layer in agent.actor.net if isinstance(layer, torch.nn.Linear)]
    weights = {f"actor_weight_{i}": layer.weight.detach().numpy() for i, layer in enumerate(linear)}
    weights.update({f"actor_bias_{i}": layer.bias.detach().numpy() for i, layer in enumerate(linear)})
    weights["actor_log_std"] = agent.actor.log_std.detach().numpy()
    return weights


def run(args: argparse.Namespace) -> int:
    public_code = Path(args.public_code).expanduser().resolve()
    if not (public_code / "diffusion" / "elucidated_diffusion.py").is_file():
        raise HarnessError(f"--public-code {public_code} is not a checkout of github.com/liuxhym/EDIS "
                           "(no diffusion/elucidated_diffusion.py)")
    if not Path(args.python).is_file():
        raise HarnessError(f"--python {args.python} does not exist: make the environment with "
                           f"python {Path(__file__).name} setup --venv DIR")
    module = load_algorithm()
    options = ["--config", args.config, "--device", "cpu", "--edis.width", str(args.width), "--edis.blocks",
               str(args.blocks), "--edis.initial_fit_steps", str(args.fit_steps), "--edis.refresh_fit_steps", "0",
               "--edis.num_samples", str(args.rows), "--edis.positive_buffer_size", str(args.online_rows),
               *args.options]
    config = module.parse_config(module.TrainConfig, module.CONFIG_SECTIONS, options)
    module.set_seed(args.seed)
    data, info = module.load_dataset(config.dataset, config.env)
    online_data, _ = module.load_dataset(args.online, config.env or info.env_id)
    env, kind = task_of(info.env_id, config.dataset)
    simulator = module.make_env(info, seed=args.seed)
    if not module.observation_gives_state(simulator):
        raise HarnessError(f"{info.env_id}: the simulator errors need an env whose observation gives its state "
                           f"({', '.join(module.STATE_FROM_OBSERVATION)})")
    state_mean, state_std = module.state_statistics(data["observations"], True)
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(online_data["observations"]))
    held_out = 2000
    if len(pick) < args.online_rows + held_out:
        raise HarnessError(f"{args.online} has {len(pick)} rows: --online-rows {args.online_rows} and {held_out} "
                           "held-out rows need more")

    def rows_of(source: Dict[str, np.ndarray], index: np.ndarray) -> Dict[str, np.ndarray]:
        return {"states": ((source["observations"][index] - state_mean) / state_std).astype(np.float32),
                "actions": source["actions"][index].astype(np.float32),
                "rewards": source["rewards"][index].astype(np.float32),
                "next_states": ((source["next_observations"][index] - state_mean) / state_std).astype(np.float32)}

    offline = rows_of(data, np.arange(len(data["observations"])))
    online = rows_of(online_data, pick[:args.online_rows])
    heldout_online = rows_of(online_data, pick[args.online_rows:args.online_rows + held_out])
    heldout_offline = rows_of(data, rng.permutation(len(data["observations"]))[:held_out])
    agent = behaviour_cloned_agent(module, config, torch.as_tensor(online["states"]),
                                   torch.as_tensor(online["actions"]), args.bc_steps, args.seed)

    # The public code's side, in its own environment.
    iql_scales = configured_scales(public_code, "iql_edis", env, kind)
    calql_scales = configured_scales(public_code, "cal_ql_edis", env, kind)
    settings = [["public unguided", 0.0, 0.0, 0.0], ["public, IQL-EDIS scales", *iql_scales],
                ["public, IQL-EDIS scales x10", *[10 * s for s in iql_scales]],
                ["public, Cal-QL-EDIS scales", *calql_scales],
                ["public, Cal-QL-EDIS scales x10", *[10 * s for s in calql_scales]]]
    gin_file = public_code / "configs" / "iql_edis" / env / f"{kind}.gin"
    if not gin_file.is_file():
        raise HarnessError(f"the public code has no config {gin_file.relative_to(public_code)} for this task")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edis-public-") as folder:
        inputs = Path(folder) / "inputs.npz"
        arrays = {f"{prefix}_{column}": values for prefix, rows in (("offline", offline), ("online", online),
                                                                     ("heldout_online", heldout_online),
                                                                     ("heldout_offline", heldout_offline))
                  for column, values in rows.items()}
        np.savez(inputs, **arrays, **actor_weights(agent))
        command = [args.python, str(WORKER), "--public-code", str(public_code), "--inputs", str(inputs),
                   "--output", str(Path(folder) / "public"), "--gin", str(gin_file), "--width", str(args.width),
                   "--blocks", str(args.blocks), "--fit-steps", str(args.fit_steps), "--rows", str(args.rows),
                   "--energy-epochs", str(args.energy_epochs), "--settings", json.dumps(settings),
                   "--seed", str(args.seed)]
        environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
        result = subprocess.run(command, capture_output=True, text=True, env=environment)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            error = next((line for line in reversed(lines) if re.match(r"\w*(Error|Exception)\b", line)), lines[-1])
            raise HarnessError(f"the public code's side failed (exit {result.returncode}): {error.strip()}")
        public_samples = dict(np.load(Path(folder) / "public.npz"))
        public = json.loads((Path(folder) / "public.json").read_text())
    public_seconds = time.perf_counter() - started

    started = time.perf_counter()
    offline_tensors = {name: torch.as_tensor(values if values.ndim == 2 else values[:, None])
                       for name, values in offline.items()}
    offline_tensors["dones"] = torch.zeros(len(offline["states"]), 1)
    online_tensors = {name: torch.as_tensor(values if values.ndim == 2 else values[:, None])
                      for name, values in online.items()}
    online_tensors["dones"] = torch.zeros(len(online["states"]), 1)
    ours = run_ours(module, config, offline_tensors, online_tensors, agent, args.rows, args.seed)
    ours_seconds = time.perf_counter() - started

    state_dim, action_dim = offline["states"].shape[1], offline["actions"].shape[1]
    raw_next = data["next_observations"]
    measure = Measure(module, simulator, torch.as_tensor(online["states"]),
                      lambda s, a: module.policy_log_prob(agent, s, a), state_mean, state_std,
                      raw_next.std(0) + 1e-6, float(data["rewards"].std()) + 1e-6, args.batches, args.seed)
    measured_public = {name: measure.per_row(rows, state_dim, action_dim) for name, rows in public_samples.items()}
    measured_ours = {name: measure.per_row(rows, state_dim, action_dim) for name, rows in ours["samples"].items()}
    yardstick = measure.per_row(np.concatenate([heldout_offline[c] if heldout_offline[c].ndim == 2 else
                                                heldout_offline[c][:, None] for c in
                                                ("states", "actions", "rewards", "next_states")], axis=1),
                                state_dim, action_dim)
    summary = {**summarise(measured_public, "public unguided"), **summarise(measured_ours, "ours unguided")}
    sigmas = public["sampling_sigmas"]
    public_shares = {name: shares_by_level(values, sigmas) for name, values in public["guidance_share"].items()
                     if name != "public unguided"}
    ours_shares = {name: shares_by_level(list(values.values()), list(values.keys()))
                   for name, values in ours["shares"].items() if name != "ours unguided"}
    findings = check_findings(public, source_lines(public_code), summary)
    report = {"config": args.config, "dataset": config.dataset, "online": args.online, "env": info.env_id,
              "online_rows": args.online_rows, "rows": args.rows, "batches": args.batches, "width": args.width,
              "blocks": args.blocks, "fit_steps": args.fit_steps, "seed": args.seed,
              "public_code": {"path": str(public_code), "commit": git_commit(public_code)},
              "scales": {"public IQL-EDIS": iql_scales, "public Cal-QL-EDIS": calql_scales, "ours": ours["scales"]},
              "metrics": summary, "offline_vs_online_state_mmd": mean_se(yardstick["state_mmd"]),
              "guidance_share": {**public_shares, **ours_shares}, "public": public,
              "ours_energy_losses": ours["energy_losses"], "findings": findings,
              "seconds": {"public": round(public_seconds, 1), "ours": round(ours_seconds, 1)}}
    (out / f"public-code-{args.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"public-code-{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / f'public-code-{args.name}.md'} and .json")
    return 0


def git_commit(folder: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=30).stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def check_findings(public: Dict[str, Any], lines: Dict[str, Optional[str]],
                   summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each finding, measured where it can be and read from the source where it cannot."""
    last = {name: float(np.mean(values[-5:])) for name, values in public["energy_losses"].items()}
    findings = [
        {"finding": "the inpainting mask covers every column (sized by the batch, not the condition's width)",
         "holds": public["mask_width"] == public["row_width"] and public["mask_rows"] >= public["row_width"],
         "measured": f"mask width {public['mask_width']} of {public['row_width']} columns for a batch of "
                     f"{public['mask_rows']}", "where": lines["inpainting mask sized by the batch"]},
        {"finding": "the transition energy's negatives are exactly (s, a, 0, 0)",
         "holds": public["transition_negatives_free_block_zero"] == 1.0
         and public["transition_negatives_hold_condition"] == 1.0,
         "measured": f"share of negatives whose (r, s') is 0: {public['transition_negatives_free_block_zero']:.3f}",
         "where": lines["inpainting mask sized by the batch"]},
        {"finding": "the policy energy's negatives are exactly (s, 0, 0, 0)",
         "holds": public["policy_negatives_free_block_zero"] == 1.0,
         "measured": f"share of negatives whose (a, r, s') is 0: {public['policy_negatives_free_block_zero']:.3f}",
         "where": lines["inpainting mask sized by the batch"]},
        {"finding": "the transition and policy energies' losses fall well below chance (they learn to spot zeros)",
         "holds": last["transition"] < 0.5 * public["chance"]["transition"]
         and last["policy"] < 0.5 * public["chance"]["policy"],
         "measured": f"last 5 epochs: transition {last['transition']:.2f}, policy {last['policy']:.2f} against "
                     f"chance {public['chance']['transition']:.2f}", "where": None},
        {"finding": "on clean held-out rows the energies barely rank online rows below offline ones",
         "holds": all(0.4 <= value <= 0.65 for value in public["held_out_ranking"].values()),
         "measured": ", ".join(f"{name} {value:.2f}" for name, value in public["held_out_ranking"].items()),
         "where": None},
        {"finding": "the state energy trains at the first level only (sigma 80), against raw noise, at chance",
         "holds": public["energy_training_steps"]["state"] == [0]
         and abs(last["state"] - public["chance"]["state"]) < 0.05 * public["chance"]["state"],
         "measured": f"levels {public['energy_training_steps']['state']}, loss {last['state']:.2f} against chance "
                     f"{public['chance']['state']:.2f}",
         "where": lines["state energy trains at step 0 only"]},
        {"finding": "the energies train at steps {0, 16} of a 32-step schedule while sampling runs 128 steps",
         "holds": public["energy_schedule_steps"] == 32 and public["sampling_steps"] == 128
         and public["energy_training_steps"]["transition"] == [0, 16],
         "measured": "train at sigma " + ", ".join(f"{s:.2f}" for s in public["energy_training_sigmas"]["transition"])
                     + "; queried with those step numbers at sigma "
                     + ", ".join(f"{s:.2f}" for s in public["sampling_sigmas_at_those_steps"]["transition"]),
         "where": None},
        {"finding": "guidance is taken at the pre-churn point, in raw units, and added to the normalised derivative",
         "holds": lines["guidance at the pre-churn point"] is not None
         and lines["guidance in raw units added to the normalised derivative"] is not None,
         "measured": "data std per column (raw / normalised units): "
                     f"{min(public['normalizer_std']):.3g} to {max(public['normalizer_std']):.3g}",
         "where": f"{lines['guidance at the pre-churn point']}, "
                  f"{lines['guidance in raw units added to the normalised derivative']}"},
        {"finding": "IQL-EDIS's utd_ratio is 20 whatever its gin binds",
         "holds": lines["utd_ratio fixed at 20 whatever gin binds"] is not None,
         "measured": "read from the source", "where": lines["utd_ratio fixed at 20 whatever gin binds"]},
        {"finding": "its command-line scale flags are overwritten by the TrainConfig values",
         "holds": lines["command-line scales overwritten by TrainConfig"] is not None,
         "measured": "read from the source", "where": lines["command-line scales overwritten by TrainConfig"]},
    ]
    guided = summary.get("public, IQL-EDIS scales", {})
    unguided = summary.get("public unguided", {})
    if guided and unguided:
        change = guided["state_mmd_minus_unguided"][0] / max(abs(unguided["state_mmd"][0]), 1e-12)
        findings.append({
            "finding": "at its configured scales guidance moves the state MMD by a few percent at most",
            "holds": abs(change) < 0.05, "measured": f"{100 * change:+.1f}% of the unguided MMD", "where": None})
    return findings


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"# The public EDIS code beside ours: {report['env']}", "",
             f"Offline data {report['dataset']}, online rows: {report['online_rows']} of {report['online']}; denoiser "
             f"{report['width']} x {report['blocks']} trained {report['fit_steps']} steps in both codes; "
             f"{report['rows']} samples per setting from one noise draw per code (state MMD over {report['batches']} "
             f"batches); public code at {report['public_code']['commit'][:7]}. Mean ± standard error; "
             "'- unguided': the paired difference from the same code's unguided samples.", "",
             f"Offline against online state MMD (the yardstick): {report['offline_vs_online_state_mmd'][0]:.4f} ± "
             f"{report['offline_vs_online_state_mmd'][1]:.4f}", "",
             "| setting | " + " | ".join(f"{label} | - unguided" for _, label in METRICS) + " |",
             "|---|" + "---|---|" * len(METRICS)]
    for name, values in report["metrics"].items():
        cells = []
        for metric, _ in METRICS:
            mean, se = values[metric]
            difference, difference_se = values[f"{metric}_minus_unguided"]
            paired = "-" if "unguided" in name else f"{difference:+.4f} ± {difference_se:.4f}"
            cells += [f"{mean:.4f} ± {se:.4f}", paired]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Scales (state / transition / policy): " + "; ".join(
        f"{name} {' / '.join(f'{s:g}' for s in (scales.values() if isinstance(scales, dict) else scales))}"
        for name, scales in report["scales"].items()), ""]
    public = report["public"]
    lines += ["Energy losses per positive row (last 5 epochs of training) against chance:", "",
              "| code | energy | loss | chance | held-out ranking (online below offline) |", "|---|---|---|---|---|"]
    for name, values in public["energy_losses"].items():
        lines.append(f"| public | {name} | {np.mean(values[-5:]):.3f} | {public['chance'][name]:.3f} | "
                     f"{public['held_out_ranking'][name]:.2f} |")
    for name, value in report["ours_energy_losses"].items():
        lines.append(f"| ours | {name} | {value:.3f} | {math.log(11):.3f} | - |")
    bands = next(iter(report["guidance_share"].values())).keys() if report["guidance_share"] else []
    lines += ["", "The guidance's share of the sampler's derivative, |guidance| / |derivative|, by noise level:", "",
              "| setting | " + " | ".join(bands) + " |", "|---|" + "---|" * len(bands)]
    for name, values in report["guidance_share"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[band]:.4f}" for band in bands) + " |")
    lines += ["", "Findings:", ""]
    for finding in report["findings"]:
        where = f" ({finding['where']})" if finding["where"] else ""
        lines.append(f"- {'holds' if finding['holds'] else 'does not hold'}: {finding['finding']}{where}. "
                     f"Measured: {finding['measured']}.")
    return "\n".join(lines) + "\n"


def setup(args: argparse.Namespace) -> int:
    venv = Path(args.venv).expanduser()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    print(f"the public code's environment is ready: --python {python}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    setup_parser = sub.add_parser("setup", help="make the public code's environment from public_code_requirements.txt")
    setup_parser.add_argument("--venv", required=True, help="folder of the new environment")
    run_parser = sub.add_parser("run", help="measure the public code and ours on the same data")
    run_parser.add_argument("--public-code", required=True, help="a checkout of github.com/liuxhym/EDIS")
    run_parser.add_argument("--python", required=True, help="the interpreter of the environment `setup` made")
    run_parser.add_argument("--config", required=True, help="our config for the task (its dataset is the offline data)")
    run_parser.add_argument("--online", required=True, help="dataset whose rows stand in for online data")
    run_parser.add_argument("--name", required=True, help="the outputs are public-code-<name>.{md,json}")
    run_parser.add_argument("--out", default="benchmarks/results")
    run_parser.add_argument("--online-rows", type=int, default=5000)
    run_parser.add_argument("--rows", type=int, default=2000, help="samples per setting")
    run_parser.add_argument("--batches", type=int, default=4, help="state MMD batches per setting")
    run_parser.add_argument("--width", type=int, default=256)
    run_parser.add_argument("--blocks", type=int, default=3)
    run_parser.add_argument("--fit-steps", type=int, default=10_000)
    run_parser.add_argument("--energy-epochs", type=int, default=20, help="the public code's energy_train_epoch")
    run_parser.add_argument("--bc-steps", type=int, default=2000, help="behaviour-cloning steps of the actor")
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("options", nargs=argparse.REMAINDER, help="after --: options for our side's config")
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            return setup(args)
        args.options = args.options[1:] if args.options[:1] == ["--"] else args.options
        return run(args)
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a config or dataset problem: the algorithm file's own one-line message
        if type(error).__name__ != "UserError":
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
