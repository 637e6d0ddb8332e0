"""Speed: what the four algorithm files cost, and what an EDIS refresh costs under the public code's
settings and under ours, beside the fidelity of both settings' samples.

    python benchmarks/speed.py costs                 # per-call costs -> refresh cost model, updates/s, evaluation
    python benchmarks/speed.py costs --device cuda   # the same on a GPU
    python benchmarks/speed.py fidelity --config configs/cpu/hopper-medium-replay.yaml \\
        --checkpoint runs/finetune/checkpoints/pretrain-iql--cpu__hopper-medium-replay--seed0/checkpoint_50000.pt
    python benchmarks/speed.py online --log-dir runs/finetune    # online phase of each EDIS variant against its base
    python benchmarks/speed.py estimate --costs benchmarks/results/speed-costs-*.json   # a paper-scale run
    python benchmarks/speed.py report                # benchmarks/results/speed.md from the measurements

`costs` times each piece on random data of the chosen sizes (Hopper-v5 and AdroitHandPen-v1
observation/action sizes), medians over --repeats blocks after a warm-up, one process. A refresh
is then priced from those per-call costs and the number of calls each setting makes:

    reference  the public EDIS code: a new denoiser trained from scratch for its step count, 128
               Heun steps, 100k samples, energy negatives drawn by re-running the sampler from
               sigma_max down to each negative's level, three guidance backward passes per call
    ours       EDISConfig's defaults: warm start, refresh_fit_steps, sample_steps, negatives read
               from one recorded sampler trajectory, one backward pass for all three energies

`fidelity` rebuilds an IQL-EDIS refresh from a checkpoint (benchmarks/guidance_sweep.py's Setup),
fits the denoiser both ways at the config's network size, and measures each setting's samples
(state MMD, policy log-likelihood, dynamics error), the sampler-step curve and bf16. Each command
writes benchmarks/results/speed-<part>[-<name>].json; `report` assembles speed.md, ratios first.
"""

import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import cpu_description  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIZES = {"Hopper": "Hopper-v5", "Pen": "AdroitHandPen-v1"}
FILES = {"iql": "ImplicitQLearning", "calql": "CalQL", "iql_edis": "ImplicitQLearning", "calql_edis": "CalQL"}
# The public code's refresh (github.com/liuxhym/EDIS): IQL-EDIS retrains for 30k steps on hopper-medium-replay and
# pen-human (50k on some AntMaze tasks, 10k in Cal-QL-EDIS); 20 energy "epochs" of one batch each per energy.
REFERENCE = {"fit_steps": 30_000, "sample_steps": 128, "num_samples": 100_000, "energy_updates": 20}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"speed_{name}", ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(work: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock of `work` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        work()
    timings = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def machine(threads: bool = True) -> str:
    """This machine; `threads`: with this process's torch threads (not when it only reads others' runs)."""
    cpu = cpu_description()
    described = f"{cpu['cpu']} ({cpu['cpu_id'] or 'family unknown'}, {torch.backends.cpu.get_cpu_capability()}), " \
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    return f"{described}, {torch.get_num_threads()} thread(s)" if threads else described


def env_sizes(module: ModuleType, env_id: str) -> tuple:
    env = module.make_env(module.DatasetInfo("speed", env_id, module.domain_of(env_id)))
    return env.observation_space.shape[0], env.action_space.shape[0]


# ---------------------------------------------------------------------------------------------
# costs: updates, refresh pieces, evaluation
# ---------------------------------------------------------------------------------------------
def time_updates(name: str, state_dim: int, action_dim: int, device: torch.device, updates: int,
                 repeats: int) -> Dict[str, float]:
    """Updates per second, offline (one buffer) and online (the file's online batch: two buffers mixed)."""
    module = load(name)
    config = module.TrainConfig(device=str(device))
    agent = getattr(module, FILES[name])(config, state_dim, action_dim, 1.0, device)
    columns = {"states": state_dim, "actions": action_dim, "rewards": 1, "next_states": state_dim, "dones": 1}
    if name.startswith("calql"):
        columns["mc_returns"] = 1
    rng = np.random.default_rng(0)
    buffers = []
    for _ in range(2):
        buffer = module.ReplayBuffer(20_000, columns, device)
        buffer.add_batch(**{key: rng.uniform(-1, 1, (20_000, width)).astype(np.float32)
                            for key, width in columns.items()})
        buffers.append(buffer)
    half = config.batch_size // 2

    def offline() -> None:
        for _ in range(updates):
            agent.update(buffers[0].sample(config.batch_size))

    def online() -> None:
        for _ in range(updates):
            if name == "iql":  # CORL's IQL: one buffer that holds offline and online rows
                batch = buffers[0].sample(config.batch_size)
            else:  # Cal-QL: offline + online; the EDIS files: generated + online
                first, second = buffers[0].sample(half), buffers[1].sample(config.batch_size - half)
                batch = {key: torch.cat([first[key], second[key]]) for key in first}
            agent.update(batch)

    return {phase: updates / median_seconds(work, device, repeats)
            for phase, work in (("offline", offline), ("online", online))}


def time_refresh_pieces(state_dim: int, action_dim: int, device: torch.device, rows: int, fit_steps: int,
                        repeats: int, bf16: bool, width: int, blocks: int) -> Dict[str, float]:
    """Per-call costs of the refresh with a width x blocks denoiser and EDISConfig's energies (seconds)."""
    module = load("iql_edis")
    config = module.EDISConfig(bf16=bf16, width=width, blocks=blocks, guidance_state=1.0, guidance_policy=1.0,
                               guidance_transition=1.0)
    layout = module.TransitionLayout(state_dim, action_dim, config.include_terminal)
    diffusion = module.TransitionDiffusion(layout.dim, config, device)
    energies = module.TransitionEnergies(layout, config, device)
    data = torch.randn(20_000, layout.dim, device=device)
    x = torch.randn(rows, layout.dim, device=device)
    sigma = torch.full((rows,), 0.5, device=device)
    costs = {"fit_step": median_seconds(lambda: diffusion.fit(data, fit_steps), device, repeats) / fit_steps}
    with torch.no_grad():
        costs["denoise_row"] = median_seconds(lambda: diffusion.denoise(x, sigma), device, repeats) / rows
        costs["guidance_joint_row"] = median_seconds(lambda: energies.guidance(x, sigma), device, repeats) / rows

    def separate() -> torch.Tensor:  # the reference: one backward pass per energy
        shift = torch.zeros_like(x)
        for name in energies.active:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                (gradient,) = torch.autograd.grad(energies.networks[name](leaf, sigma).sum(), leaf)
            shift = shift + energies.masks[name] * gradient
        return shift

    with torch.no_grad():
        costs["guidance_separate_row"] = median_seconds(separate, device, repeats) / rows
    positives = torch.randn(2 * config.energy_batch_size, layout.dim, device=device)
    trajectory = torch.randn(8, 2048, layout.dim, device=device)
    levels = torch.linspace(0.01, 10, 8, device=device)
    conditioned = positives[:64]
    conditioned_trajectory = torch.randn(8, 64 * config.energy_negatives, layout.dim, device=device)
    per_call = median_seconds(lambda: energies.fit(positives, positives, trajectory, levels, 1, conditioned,
                                                     conditioned_trajectory), device, repeats)
    costs["energy_update"] = per_call / 2 / len(energies.active)  # 2 batches x 3 energies per call
    return costs


def refresh_model(costs: Dict[str, float], config: Any) -> Dict[str, Dict[str, float]]:
    """Seconds per refresh, split in four, for the reference's settings and for ours (EDISConfig defaults)."""
    energies = 3
    batch_rows = config.energy_batch_size * config.energy_negatives

    def calls(steps: int) -> int:  # denoiser calls per sample: a Heun step costs two, the last one
        return 2 * steps - 1

    ref_calls = calls(REFERENCE["sample_steps"])
    reference = {
        "diffusion training": REFERENCE["fit_steps"] * costs["fit_step"],
        "energy training": energies * REFERENCE["energy_updates"] * costs["energy_update"],
        # every negative is a fresh sampler run from sigma_max down to its level: (L + 1) / 2 calls on average
        "negative sampling": energies * REFERENCE["energy_updates"] * batch_rows * (ref_calls + 1) / 2
        * costs["denoise_row"],
        "guided sampling": REFERENCE["num_samples"] * ref_calls
        * (costs["denoise_row"] + costs["guidance_separate_row"]),
    }
    our_calls = calls(config.sample_steps)
    updates_per_energy = config.energy_epochs * math.ceil(config.positive_buffer_size / config.energy_batch_size)
    ours = {
        "diffusion training": config.refresh_fit_steps * costs["fit_step"],
        "energy training": energies * updates_per_energy * costs["energy_update"],
        "negative sampling": (config.negative_pool + config.transition_pool) * our_calls * costs["denoise_row"],
        "guided sampling": config.num_samples * our_calls * (costs["denoise_row"] + costs["guidance_joint_row"]),
    }
    return {"reference": reference, "ours": ours}


def time_evaluation(env_id: str, episodes: int, copies: List[int], repeats: int) -> Dict[str, float]:
    """Seconds for `episodes` evaluation episodes of an (untrained) IQL policy, per number of side-by-side copies."""
    module = load("iql")
    info = module.DatasetInfo("speed", env_id, module.domain_of(env_id))
    state_dim, action_dim = env_sizes(module, env_id)
    agent = module.ImplicitQLearning(module.TrainConfig(), state_dim, action_dim, 1.0, torch.device("cpu"))
    seconds = {}
    for count in copies:
        envs = module.make_eval_envs(info, np.zeros(state_dim), np.ones(state_dim), count, seed=0)
        seconds[str(count)] = median_seconds(
            lambda envs=envs: module.evaluate(envs, lambda s: agent.act(s, explore=False), info, episodes, 0),
            torch.device("cpu"), repeats, warmup=0)
        envs.close()
    return seconds


D3RLPY_SCRIPT = """
import json, sys, time, numpy as np, torch, d3rlpy
state_dim, action_dim, updates, repeats = (int(value) for value in sys.argv[1:5])
rng = np.random.default_rng(0)
rows = 20_000
terminals = np.zeros(rows)
terminals[999::1000] = 1
dataset = d3rlpy.dataset.MDPDataset(rng.uniform(-1, 1, (rows, state_dim)).astype(np.float32),
                                    rng.uniform(-1, 1, (rows, action_dim)).astype(np.float32),
                                    rng.uniform(-1, 1, (rows, 1)).astype(np.float32), terminals)
rates = {}
for name, config in (("iql", d3rlpy.algos.IQLConfig(batch_size=256)),
                     ("calql", d3rlpy.algos.CalQLConfig(batch_size=256, n_action_samples=10))):
    algo = config.create(device="cpu:0")
    algo.build_with_dataset(dataset)
    for _ in range(20):
        algo.update(dataset.sample_transition_batch(256))
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(updates):
            algo.update(dataset.sample_transition_batch(256))
        timings.append(updates / (time.perf_counter() - start))
    rates[name] = sorted(timings)[len(timings) // 2]
print("D3RLPY " + json.dumps({"version": d3rlpy.__version__, "offline": rates}))
"""


def time_d3rlpy(python: str, state_dim: int, action_dim: int, updates: int, repeats: int) -> Dict[str, Any]:
    """d3rlpy's IQL and Cal-QL offline updates per second, run by another interpreter (d3rlpy pins an older
    gymnasium, so it lives in its own environment)."""
    import subprocess

    result = subprocess.run([python, "-c", D3RLPY_SCRIPT, str(state_dim), str(action_dim), str(updates),
                             str(repeats)], capture_output=True, text=True, timeout=3600)
    line = next((line for line in result.stdout.splitlines() if line.startswith("D3RLPY ")), None)
    if line is None:
        raise SystemExit(f"error: d3rlpy timing failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(line[len("D3RLPY "):])


def costs_command(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    module = load("iql_edis")
    config = module.EDISConfig()
    width, blocks = (int(part) for part in args.denoiser.split("x")) if args.denoiser else (config.width, config.blocks)
    result: Dict[str, Any] = {"machine": machine(), "device": str(device), "command": " ".join(sys.argv),
                              "reference": REFERENCE, "ours": {key: getattr(config, key) for key in (
                                  "refresh_fit_steps", "sample_steps", "num_samples", "energy_epochs",
                                  "positive_buffer_size", "negative_pool", "transition_pool")},
                              "denoiser": [width, blocks], "sizes": {}}
    for label, env_id in SIZES.items():
        if args.sizes and label not in args.sizes:
            continue
        state_dim, action_dim = env_sizes(module, env_id)
        entry: Dict[str, Any] = {"env": env_id, "state_dim": state_dim, "action_dim": action_dim, "updates": {}}
        for name in FILES if "updates" in args.parts else ():
            entry["updates"][name] = time_updates(name, state_dim, action_dim, device, args.updates, args.repeats)
            print(f"{label} {name}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in entry["updates"][name].items()),
                  flush=True)
        if args.d3rlpy_python:
            entry["d3rlpy"] = time_d3rlpy(args.d3rlpy_python, state_dim, action_dim, args.updates, args.repeats)
            print(f"{label} d3rlpy: {entry['d3rlpy']}", flush=True)
        for bf16 in (False, True) if "refresh" in args.parts else ():
            pieces = time_refresh_pieces(state_dim, action_dim, device, args.rows, args.fit_steps, args.repeats, bf16,
                                         width, blocks)
            entry["bf16" if bf16 else "fp32"] = {"per_call": pieces, "refresh_s": refresh_model(pieces, config)}
            print(f"{label} refresh pieces ({'bf16' if bf16 else 'fp32'}): {pieces}", flush=True)
        if "evaluation" in args.parts and (device.type == "cpu" or args.evaluation):
            entry["evaluation_s"] = time_evaluation(env_id, args.episodes, [1, 10, args.episodes], args.repeats)
            print(f"{label} evaluation of {args.episodes} episodes: {entry['evaluation_s']}", flush=True)
        result["sizes"][label] = entry
    path = Path(args.results) / f"speed-costs-{args.name or device.type}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# fidelity: the reference's settings against ours, sampler steps, bf16 (one refresh, real data)
# ---------------------------------------------------------------------------------------------
def fidelity_command(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from guidance_sweep import Setup

    module = load("iql_edis")
    defaults = module.parse_config(module.TrainConfig, module.CONFIG_SECTIONS, ["--config", args.config, *args.options])
    scales = {"state": defaults.edis.guidance_state, "policy": defaults.edis.guidance_policy,
              "transition": defaults.edis.guidance_transition}
    ours_fit = {"initial": args.initial_fit_steps or module.EDISConfig().initial_fit_steps,
                "refresh": args.refresh_fit_steps or module.EDISConfig().refresh_fit_steps}
    setup = Setup(module, argparse.Namespace(config=args.config, checkpoint=args.checkpoint, seed=args.seed,
                                             online_steps=args.online_steps, options=args.options), refresh=False)
    edis, config = setup.edis, setup.config.edis
    # The refreshes below fit nothing (0 steps): they train the energies on the current model's sampler levels.
    config.retrain_from_scratch, config.initial_fit_steps, config.refresh_fit_steps = False, 0, 0
    config.num_samples = 1_000  # what the refresh itself draws is not measured here
    columns = ("states", "actions", "rewards", "next_states", "dones")
    online = setup.module.recent_rows(setup.online, len(setup.online))
    offline_data = edis.layout.join(setup.offline)
    all_data = edis.layout.join({name: torch.cat([setup.offline[name], online[name]]) for name in columns})
    result: Dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv), "config": args.config,
                              "checkpoint": args.checkpoint, "online_steps": args.online_steps, "rows": args.rows,
                              "repeats": args.repeats, "scales": scales, "width": config.width,
                              "blocks": config.blocks, "ours_fit": ours_fit, "reference_fit": args.reference_fit_steps,
                              "settings": {}}

    def fit(label: str, steps_and_data: List[tuple]) -> float:
        edis.diffusion.reset_weights()
        start = time.perf_counter()
        for steps, data in steps_and_data:
            edis.diffusion.fit(data, steps, desc=label)
        return time.perf_counter() - start

    def measure(label: str, sample_steps: int, fit_seconds: float) -> None:
        config.sample_steps = sample_steps
        edis.energies = module.TransitionEnergies(edis.layout, config, torch.device("cpu"))  # all three trained
        start = time.perf_counter()
        edis.refresh(setup.offline, setup.online, setup.agent)  # no fit: energies on this model's sampler levels
        energy_seconds = time.perf_counter() - start
        start = time.perf_counter()
        guided = setup.measure(scales, args.rows, args.repeats)
        guided_seconds = time.perf_counter() - start
        unguided = setup.measure({name: 0.0 for name in scales}, args.rows, args.repeats)
        result["settings"][label] = {"sample_steps": sample_steps, "bf16": config.bf16, "fit_s": round(fit_seconds, 1),
                                     "energies_s": round(energy_seconds, 1),
                                     "guided_sampling_and_metrics_s": round(guided_seconds, 1),
                                     "guided": guided, "unguided": unguided}
        print(f"{label}: guided " + ", ".join(f"{k} {v[0]:.4f}±{v[1]:.4f}" for k, v in guided.items()), flush=True)

    seconds = fit("ours", [(ours_fit["initial"], offline_data), (ours_fit["refresh"], all_data)])
    for steps in args.steps:
        measure(f"ours, {steps} steps", steps, seconds)
    # bf16 autocast for the sampler on the same fp32-trained model (training in bf16 is not measured here: on a
    # CPU without bf16 units it is several times slower than fp32).
    config.bf16 = True
    measure(f"ours, bf16 sampling, {args.bf16_steps} steps", args.bf16_steps, seconds)
    config.bf16 = False
    seconds = fit("reference", [(args.reference_fit_steps, all_data)])
    measure("reference (from scratch, 128 steps)", 128, seconds)
    name = args.name or Path(args.config).stem
    path = Path(args.results) / f"speed-fidelity-{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# online: wall-clock of each EDIS variant's online phase against its base, from finetune.py runs
# ---------------------------------------------------------------------------------------------
def stopped_intervals(pauses_log: Path) -> Dict[str, List[tuple]]:
    """Run name -> (stopped, continued) times (epoch seconds) from a pauses.log of `table.py pause/continue`:
    lines `<UTC time> stop|cont <run name> ...`; a run's pause ends at the first `cont` line that names it."""
    intervals: Dict[str, List[tuple]] = {}
    stopped_since: Dict[str, float] = {}
    if not pauses_log.is_file():
        return intervals
    for line in pauses_log.read_text().splitlines():
        stamp, action, *names = line.split()
        moment = time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        for name in names:
            if action == "stop":
                stopped_since.setdefault(name, moment)
            elif name in stopped_since:
                intervals.setdefault(name, []).append((stopped_since.pop(name), moment))
    return intervals


def online_command(args: argparse.Namespace) -> int:
    """Each EDIS variant's online wall-clock beside its base's from the same seed, less the time the runs spent
    stopped (log_dir/pauses.log) between the start of their last attempt (config.yaml, written at each start)
    and their end (summary.json). A run resumed from a snapshot is left out: the time its earlier attempts
    spent stopped, or lost after their last snapshot, cannot be told from its logs."""
    runs: Dict[tuple, Dict[str, Any]] = {}
    for log_dir in map(Path, args.log_dir):
        if not log_dir.is_dir():
            print(f"error: {log_dir} is not a folder of runs (a finetune.py --log-dir)", file=sys.stderr)
            return 2
        stopped = stopped_intervals(log_dir / "pauses.log")
        for summary_path in log_dir.glob("*/summary.json"):
            run_dir = summary_path.parent
            parts = run_dir.name.split("--")
            if len(parts) != 3 or parts[0].startswith("pretrain"):
                continue
            log = log_dir / f"{run_dir.name}.log"
            resumed = log.is_file() and any(line.startswith("resumed ") for line in log.read_text().splitlines())
            start, end = (run_dir / "config.yaml").stat().st_mtime, summary_path.stat().st_mtime
            paused = sum(max(0.0, min(end, b) - max(start, a)) for a, b in stopped.get(run_dir.name, []))
            summary = json.loads(summary_path.read_text())
            steps = yaml.safe_load((run_dir / "config.yaml").read_text()).get("online_iterations")
            runs[tuple(parts)] = {"seconds": round(summary["online"]["wall_clock_s"] - paused, 2),
                                  "paused_s": round(paused, 2), "resumed": resumed, "online_steps": steps,
                                  "threads": summary.get("machine", {}).get("torch_threads")}
    command = [word if word != args.note else "<the note below>" for word in sys.argv] if args.note else sys.argv
    result: Dict[str, Any] = {"machine": machine(threads=False), "command": shlex.join(command), "pairs": {},
                              "left_out": [], "note": args.note}
    for (variant, key, seed), run in sorted(runs.items()):
        base = "calql" if variant.startswith("calql") else "iql"
        if variant == base or (base, key, seed) not in runs:
            continue
        base_run = runs[(base, key, seed)]
        pair = f"{variant} / {base} ({key})"
        if run["resumed"] or base_run["resumed"]:
            result["left_out"].append(f"{pair} {seed}: resumed from a snapshot")
            continue
        result["pairs"].setdefault(pair, []).append(
            {"seed": seed, "variant_s": run["seconds"], "base_s": base_run["seconds"],
             "ratio": round(run["seconds"] / base_run["seconds"], 3), "online_steps": run["online_steps"],
             "threads": {"variant": run["threads"], "base": base_run["threads"]},
             "paused_s": {"variant": run["paused_s"], "base": base_run["paused_s"]}})
    path = Path(args.results) / (f"speed-online-{args.name}.json" if args.name else "speed-online.json")
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}: {sum(len(v) for v in result['pairs'].values())} pair(s), "
          f"{len(result['left_out'])} left out")
    return 0


# ---------------------------------------------------------------------------------------------
# estimate: a paper-scale run, from measured per-call costs and the run's counts
# ---------------------------------------------------------------------------------------------
# The paper-scale schedules (the public code's: github.com/liuxhym/EDIS): updates, online steps, refresh period,
# and the reference's denoiser steps per refresh (from scratch).
PAPER = {"iql_edis": {"offline_updates": 1_000_000, "online_steps": 200_000, "refresh_every": 10_000,
                      "reference_fit_steps": 30_000},
         "calql_edis": {"offline_updates": 300_000, "online_steps": 200_000, "refresh_every": 10_000,
                        "reference_fit_steps": 10_000}}


def paper_scale_estimate(sizes: Dict[str, Any], config: Any, precision: str = "fp32") -> Dict[str, Dict]:
    """Hours of each piece of a paper-scale IQL-EDIS and Cal-QL-EDIS run, under the reference's refresh settings
    and under ours: counts x measured per-call costs. Evaluation and env steps are left out (CPU work in both)."""
    estimate: Dict[str, Dict] = {}
    for name, schedule in PAPER.items():
        rates = sizes["updates"][name]
        refreshes = schedule["online_steps"] // schedule["refresh_every"]
        model = refresh_model(sizes[precision]["per_call"], config)
        fit_step = sizes[precision]["per_call"]["fit_step"]
        reference = dict(model["reference"])
        reference["diffusion training"] = schedule["reference_fit_steps"] * fit_step
        pieces = {"offline updates": schedule["offline_updates"] / rates["offline"],
                  "online updates": schedule["online_steps"] / rates["online"]}
        estimate[name] = {"refreshes": refreshes, "settings": {}}
        for setting, refresh in (("reference", reference), ("ours", model["ours"])):
            hours = dict(pieces)
            hours.update({f"refresh: {piece}": refreshes * seconds for piece, seconds in refresh.items()})
            if setting == "ours":  # the fit on the offline data at online start
                hours["refresh: diffusion training"] += config.initial_fit_steps * fit_step
            estimate[name]["settings"][setting] = {piece: seconds / 3600 for piece, seconds in hours.items()}
    return estimate


def estimate_command(args: argparse.Namespace) -> int:
    sizes: Dict[str, Any] = {}
    machines = []
    for path in args.costs:  # update rates and refresh costs may come from separate `costs --parts` runs
        costs = json.loads(Path(path).read_text())
        machines.append(f"{Path(path).name}: {costs['machine']}, device {costs['device']}")
        for key, value in costs["sizes"].get(args.sizes, {}).items():
            if value or key not in sizes:
                sizes[key] = value
    missing = [name for name in PAPER if name not in sizes.get("updates", {})] + (
        [] if args.precision in sizes else [f"refresh costs ({args.precision})"])
    if missing:
        sys.exit(f"error: the costs files lack {', '.join(missing)} for {args.sizes} sizes")
    estimate = paper_scale_estimate(sizes, load("iql_edis").EDISConfig(), args.precision)
    result = {"command": " ".join(sys.argv), "machines": machines, "sizes": args.sizes, "precision": args.precision,
              "paper": PAPER, "estimate": estimate}
    path = Path(args.results) / f"speed-estimate-{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    for name, entry in estimate.items():
        for setting, hours in entry["settings"].items():
            print(f"{name} {setting}: {sum(hours.values()):.1f} h (" + ", ".join(
                f"{piece} {value:.1f}" for piece, value in hours.items()) + ")")
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def relative(value: float, reference: float) -> str:
    return f"{(value / reference - 1) * 100:+.0f}%"


FIDELITY_AXES = {"state_mmd": "state MMD (lower)", "policy_loglik": "policy log-lik (higher)",
                 "dynamics_state_mse": "s' error / std^2 (lower)", "dynamics_reward_mae": "r error / std (lower)"}


def plot_sampler_steps(fidelity_files: List[Path], path: Path) -> None:
    """Each fidelity metric against the sampler's steps (fp32, ours), guided and unguided, with the
    reference settings' value (from scratch, 128 steps) as a star: where more steps stop paying."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FIDELITY_AXES), figsize=(4 * len(FIDELITY_AXES), 3.4))
    for index, fidelity_path in enumerate(fidelity_files):
        settings = json.loads(fidelity_path.read_text())["settings"]
        curve = sorted((entry["sample_steps"], entry) for label, entry in settings.items()
                       if label.startswith("ours") and not entry["bf16"])
        reference = next((entry for label, entry in settings.items() if label.startswith("reference")), None)
        name = fidelity_path.stem.removeprefix("speed-fidelity-")
        color = f"C{index}"
        for ax, (key, title) in zip(axes, FIDELITY_AXES.items(), strict=True):
            for kind, style in (("guided", "-"), ("unguided", "--")):
                steps = [step for step, _ in curve]
                means = np.array([entry[kind][key][0] for _, entry in curve])
                errors = np.array([entry[kind][key][1] for _, entry in curve])
                ax.errorbar(steps, means, yerr=errors, fmt=style + "o", color=color, markersize=3, capsize=2,
                            label=f"{name}, {kind}")
                if reference is not None:
                    ax.plot([reference["sample_steps"]], [reference[kind][key][0]], "*", color=color,
                            markersize=10, markerfacecolor="white" if kind == "unguided" else color)
            ax.set_xscale("log", base=2)
            ax.set_xticks([16, 32, 64, 128], ["16", "32", "64", "128"])
            ax.set_xlim(12, 170)
            ax.set_xlabel("sampler steps", fontsize=8)
            ax.set_title(title, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle("Sample fidelity against sampler steps (ours, fp32; star: reference settings)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_command(args: argparse.Namespace) -> int:
    lines = ["# Speed", "", "Made by `python benchmarks/speed.py report` from the measurements below; each section",
             "names the command and the machine that produced it.", ""]
    results = Path(args.results)
    costs_files = sorted(results.glob("speed-costs-*.json"))
    fidelity_files = sorted(results.glob("speed-fidelity-*.json"))
    ratio_lines, body = [], []
    for path in costs_files:
        costs = json.loads(path.read_text())
        body += [f"## Costs ({path.name})", "",
                 f"`{costs['command']}` on {costs['machine']}, device {costs['device']}.", ""]
        has_updates = any(entry["updates"] for entry in costs["sizes"].values())
        if has_updates:
            body += ["| sizes | file | offline updates/s | online updates/s |", "|---|---|---|---|"]
        for label, entry in costs["sizes"].items():
            for name, rates in entry["updates"].items():
                body.append(f"| {label} | {name}.py | {rates['offline']:,.0f} | {rates['online']:,.0f} |")
            for name, rate in entry.get("d3rlpy", {}).get("offline", {}).items():
                body.append(f"| {label} | d3rlpy {entry['d3rlpy']['version']} {name} | {rate:,.0f} | - |")
                if name in entry["updates"]:
                    ratio_lines.append(f"- {name}.py / d3rlpy {entry['d3rlpy']['version']}, {label} sizes, offline "
                                       f"updates per second: **{entry['updates'][name]['offline'] / rate:.1f}x** "
                                       f"({path.name})")
        if has_updates:
            body.append("")
        if any("fp32" in entry for entry in costs["sizes"].values()):
            body += [f"Refresh with a {costs['denoiser'][0]} x {costs['denoiser'][1]} denoiser, priced from "
                     "per-call costs (seconds):", "",
                     "| sizes | precision | setting | diffusion training | energy training | negative sampling | "
                     "guided sampling | total |", "|---|---|---|---|---|---|---|---|"]
        for label, entry in costs["sizes"].items():
            for precision in ("fp32", "bf16") if "fp32" in entry else ():
                model = entry[precision]["refresh_s"]
                for setting in ("reference", "ours"):
                    parts = model[setting]
                    body.append(f"| {label} | {precision} | {setting} | " + " | ".join(
                        f"{value:,.0f}" for value in parts.values()) + f" | {sum(parts.values()):,.0f} |")
                ratio = sum(model["reference"].values()) / sum(model["ours"].values())
                ratio_lines.append(f"- Refresh, {label} sizes, {precision}, {costs['device']}: reference settings / "
                                   f"ours = **{ratio:.1f}x** ({path.name})")
        if any("fp32" in entry for entry in costs["sizes"].values()):
            body += ["", "Per-call costs (seconds): " + "; ".join(
                f"{label} {precision} " + ", ".join(f"{k} {v:.3g}" for k, v in entry[precision]["per_call"].items())
                for label, entry in costs["sizes"].items() for precision in ("fp32", "bf16") if precision in entry),
                ""]
        for label, entry in costs["sizes"].items():
            if "evaluation_s" in entry:
                evaluation = entry["evaluation_s"]
                sequential = evaluation["1"]
                body.append(f"- Evaluation, {label}: " + ", ".join(
                    f"{count} side by side {value:.1f} s" for count, value in evaluation.items()))
                best = min(evaluation.values())
                ratio_lines.append(f"- Evaluation, {label} sizes: one env at a time / vector env = "
                                   f"**{sequential / best:.1f}x** ({path.name})")
        body.append("")
    if fidelity_files:
        plot_path = results / "speed-sampler-steps.png"
        plot_sampler_steps(fidelity_files, plot_path)
        body += ["## Fidelity against sampler steps", "", f"![fidelity against sampler steps]({plot_path.name})", "",
                 "From the fidelity measurements below: lines are ours (fp32) at 16-128 sampler steps, solid guided "
                 "and dashed unguided, with the standard error; stars are the reference settings (filled: guided).",
                 ""]
    for path in fidelity_files:
        fidelity = json.loads(path.read_text())
        settings = fidelity["settings"]
        body += [f"## Fidelity ({path.name})", "",
                 f"`{fidelity['command']}` on {fidelity['machine']}. Denoiser {fidelity['width']} x "
                 f"{fidelity['blocks']}; ours: {fidelity['ours_fit']['initial']:,} steps on the offline data at "
                 f"online start, then {fidelity['ours_fit']['refresh']:,} warm steps on offline + online; reference: "
                 f"{fidelity['reference_fit']:,} steps from scratch. Guidance scales {fidelity['scales']}; "
                 f"{fidelity['repeats']} batches x {fidelity['rows']} rows, mean ± standard error.", "",
                 "| setting | kind | state MMD (lower) | policy log-lik (higher) | s' error / std^2 (lower) | "
                 "r error / std (lower) |", "|---|---|---|---|---|---|"]
        for label, entry in settings.items():
            for kind in ("guided", "unguided"):
                metrics = entry[kind]
                body.append(f"| {label} | {kind} | " + " | ".join(
                    f"{metrics[key][0]:.4f} ± {metrics[key][1]:.4f}" for key in (
                        "state_mmd", "policy_loglik", "dynamics_state_mse", "dynamics_reward_mae")) + " |")
        body += ["", "Seconds per setting (guided and unguided samples share them):", "",
                 "| setting | denoiser fit s | refresh without fit s |", "|---|---|---|"]
        body += [f"| {label} | {entry['fit_s']} | {entry['energies_s']} |" for label, entry in settings.items()]
        reference = next((entry for label, entry in settings.items() if label.startswith("reference")), None)
        if reference is not None:
            for label, entry in settings.items():
                if label.startswith("reference"):
                    continue
                changes = ", ".join(
                    f"{key} {relative(entry['guided'][key][0], reference['guided'][key][0])}"
                    for key in ("state_mmd", "dynamics_state_mse", "dynamics_reward_mae"))
                loglik = entry["guided"]["policy_loglik"][0] - reference["guided"]["policy_loglik"][0]
                ratio_lines.append(f"- Fidelity, {label} against the reference settings ({path.name}): {changes}, "
                                   f"policy log-lik {loglik:+.2f} nats")
        body.append("")
    for online_path in sorted(results.glob("speed-online*.json")):
        online = json.loads(online_path.read_text())
        threads = sorted({str(count) for entries in online["pairs"].values() for entry in entries
                          for count in entry.get("threads", {}).values() if count is not None})
        threads_text = (f"torch threads per run, as the runs recorded them: {', '.join(threads)}" if threads else
                        "the runs did not record their torch threads: finetune.py's --threads-per-run, 1 by default")
        body += [f"## Online phase (configs/cpu, from finetune.py runs; {online_path.name})", "",
                 f"`{online['command']}`, read on {online['machine']} ({threads_text}). "
                 "Each pair: one seed's EDIS variant and its base, "
                 "fine-tuned from the same checkpoint; seconds of the online phase, less any time the runs were "
                 "stopped (`table.py pause`). Ratio: median over seeds of the per-seed ratio."
                 + (f" {online['note']}" if online.get("note") else ""), "",
                 "| variant / base | seeds | online steps | variant s (mean) | base s (mean) | ratio (median) "
                 "| per-seed ratios |", "|---|---|---|---|---|---|---|"]
        for pair, entries in online["pairs"].items():
            variant = statistics.mean(entry["variant_s"] for entry in entries)
            base = statistics.mean(entry["base_s"] for entry in entries)
            ratio = statistics.median(entry["variant_s"] / entry["base_s"] for entry in entries)
            each = ", ".join(f"{entry['variant_s'] / entry['base_s']:.2f}" for entry in entries)
            steps = ", ".join(sorted({f"{entry['online_steps']:,}" if entry.get("online_steps") else "not recorded"
                                      for entry in entries}))
            steps_text = "online steps not recorded" if steps == "not recorded" else f"{steps} online steps"
            body.append(f"| {pair} | {len(entries)} | {steps} | {variant:,.0f} | {base:,.0f} | {ratio:.2f} | {each} |")
            ratio_lines.append(f"- Online phase, {pair}: **{ratio:.2f}x** its base (median of {len(entries)} seed(s), "
                               f"{steps_text}; {online_path.name})")
        if online.get("left_out"):
            body += [""] + [f"- left out: {entry}" for entry in online["left_out"]]
        body.append("")
    for path in sorted(results.glob("speed-estimate-*.json")):
        estimate = json.loads(path.read_text())
        body += [f"## A paper-scale run, estimated ({path.name})", "",
                 f"`{estimate['command']}`: counts of the public code's schedule x per-call costs measured on "
                 f"{'; '.join(estimate['machines'])}. {estimate['sizes']} sizes, {estimate['precision']}. "
                 "Evaluation episodes and env steps are not included. Hours:", ""]
        for name, entry in estimate["estimate"].items():
            schedule = estimate["paper"][name]
            pieces = list(entry["settings"]["ours"])
            body += [f"{name}: {schedule['offline_updates']:,} offline updates, {schedule['online_steps']:,} online "
                     f"steps, {entry['refreshes']} refreshes.", "",
                     "| setting | " + " | ".join(pieces) + " | total |", "|---" * (len(pieces) + 2) + "|"]
            for setting, hours in entry["settings"].items():
                body.append(f"| {setting} | " + " | ".join(f"{hours[piece]:,.1f}" for piece in pieces)
                            + f" | {sum(hours.values()):,.1f} |")
            totals = {setting: sum(hours.values()) for setting, hours in entry["settings"].items()}
            ratio_lines.append(f"- Paper-scale {name} ({path.name}): {totals['ours']:,.1f} h with our refresh, "
                               f"{totals['reference']:,.1f} h with the reference's")
            body.append("")
    for path in sorted(results.glob("speed-threads*.json")):
        measured = json.loads(path.read_text())
        body += [f"## Threads ({path.name})", "",
                 f"`python {measured['command']}` on {measured['machine']}: one run of each algorithm file per cell "
                 f"on `{measured['dataset']}`, {measured['updates']:,} offline updates then {measured['steps']:,} "
                 "online steps (evaluation included); the neighbour is one single-thread process multiplying "
                 "matrices.", "", "| algorithm | threads | load | offline updates/s | online steps/s |",
                 "|---|---|---|---|---|"]
        for row in measured["rows"]:
            body.append(f"| {row['algorithm']} | {row['threads']} | "
                        f"{'one busy neighbour' if row['neighbour'] else 'idle'} | {row['updates_per_s']:.1f} | "
                        f"{row['online_steps_per_s']:.1f} |")
        for algorithm in dict.fromkeys(row["algorithm"] for row in measured["rows"]):
            rate = {(row["threads"], row["neighbour"]): row["updates_per_s"] for row in measured["rows"]
                    if row["algorithm"] == algorithm}
            if {(1, False), (2, False), (1, True), (2, True)} <= set(rate):
                ratio_lines.append(f"- Threads, {algorithm}: 2 threads / 1 thread, offline updates/s: idle "
                                   f"**{rate[2, False] / rate[1, False]:.2f}x**, beside one busy neighbour "
                                   f"**{rate[2, True] / rate[1, True]:.2f}x** ({path.name})")
        body.append("")
    lines += ["## Ratios", "", *ratio_lines, "", *body]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


NEIGHBOUR = ("import torch\ntorch.set_num_threads(1)\nx = torch.randn(512, 512)\n"
             "while True:\n    x = torch.tanh(x @ x)\n")  # one busy core: a build, a neighbour's job


def threads_command(args: argparse.Namespace) -> int:
    """Offline updates/s and online steps/s of each algorithm at each thread count, on an idle machine and beside
    one busy single-thread neighbour: what the `threads` default rests on. Each cell is one run of the algorithm
    file (its summary.json's wall-clock per phase, evaluation at each phase's end included)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="speed-threads-") as folder:
        for algorithm in args.algorithms:
            for neighbour in (False, True):
                for threads in args.threads:
                    burner = (subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=dict(os.environ,
                              OMP_NUM_THREADS="1")) if neighbour else None)
                    try:
                        name = f"{algorithm}-{threads}-{int(neighbour)}"
                        command = [sys.executable, str(ROOT / "algorithms" / f"{algorithm}.py"), "--dataset",
                                   args.dataset, "--offline_iterations", str(args.updates), "--online_iterations",
                                   str(args.steps), "--offline_eval_freq", str(10 * args.updates), "--eval_freq",
                                   str(10 * args.steps), "--n_episodes", "1", "--wandb_mode", "disabled", "--device",
                                   "cpu", "--threads", str(threads), "--log_dir", folder, "--name", name]
                        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                                env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                    finally:
                        if burner is not None:
                            burner.kill()
                            burner.wait()
                    if result.returncode != 0:
                        print(f"error: {name} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                        return 2
                    summary = json.loads((Path(folder) / name / "summary.json").read_text())
                    rows.append({"algorithm": algorithm, "threads": threads, "neighbour": neighbour,
                                 "updates_per_s": args.updates / summary["offline"]["wall_clock_s"],
                                 "online_steps_per_s": args.steps / summary["online"]["wall_clock_s"]})
                    print(f"{algorithm}, {threads} thread(s), {'one busy neighbour' if neighbour else 'idle'}: "
                          f"{rows[-1]['updates_per_s']:.1f} updates/s, {rows[-1]['online_steps_per_s']:.1f} online "
                          "steps/s", flush=True)
    result = {"machine": machine(threads=False), "command": " ".join(sys.argv), "dataset": args.dataset,
              "updates": args.updates, "steps": args.steps, "rows": rows}
    path = Path(args.results) / f"speed-threads{'-' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS), help="where the measurements and speed.md go")
    commands = parser.add_subparsers(dest="command", required=True)
    costs = commands.add_parser("costs", help="per-call costs, the refresh cost model, updates/s, evaluation")
    costs.add_argument("--device", default="cpu")
    costs.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES))
    costs.add_argument("--updates", type=int, default=200, help="updates per timed block")
    costs.add_argument("--repeats", type=int, default=3)
    costs.add_argument("--rows", type=int, default=10_000, help="rows per timed denoiser / guidance call")
    costs.add_argument("--fit-steps", type=int, default=20, help="denoiser training steps per timed block")
    costs.add_argument("--episodes", type=int, default=100, help="evaluation episodes per timed evaluation")
    costs.add_argument("--evaluation", action="store_true", help="time evaluation on a GPU device too")
    costs.add_argument("--parts", nargs="+", choices=["updates", "refresh", "evaluation"],
                       default=["updates", "refresh", "evaluation"])
    costs.add_argument("--d3rlpy-python", default="", help="an interpreter with d3rlpy: time its IQL and Cal-QL too")
    costs.add_argument("--denoiser", default="", help="WIDTHxBLOCKS (default: EDISConfig's, the reference's size)")
    costs.add_argument("--name", default="", help="output name (default: the device type)")
    fidelity = commands.add_parser("fidelity", help="samples of the reference's settings against ours")
    fidelity.add_argument("--config", required=True)
    fidelity.add_argument("--checkpoint", required=True)
    fidelity.add_argument("--online-steps", type=int, default=10_000)
    fidelity.add_argument("--steps", nargs="+", type=int, default=[16, 32, 64, 128], help="sampler steps to try")
    fidelity.add_argument("--bf16-steps", type=int, default=32, help="sampler steps of the bf16 setting")
    fidelity.add_argument("--initial-fit-steps", type=int, default=0, help="ours (0: EDISConfig's default)")
    fidelity.add_argument("--refresh-fit-steps", type=int, default=0, help="ours (0: EDISConfig's default)")
    fidelity.add_argument("--reference-fit-steps", type=int, default=REFERENCE["fit_steps"])
    fidelity.add_argument("--rows", type=int, default=2000)
    fidelity.add_argument("--repeats", type=int, default=2)
    fidelity.add_argument("--seed", type=int, default=0)
    fidelity.add_argument("--name", default="")
    fidelity.add_argument("options", nargs=argparse.REMAINDER, help="after --: options for the config")
    online = commands.add_parser("online", help="online-phase wall-clock of EDIS variants against their base")
    online.add_argument("--log-dir", nargs="+", required=True, help="finetune.py log directories")
    online.add_argument("--name", default="", help="output: speed-online-<name>.json (default: speed-online.json)")
    online.add_argument("--note", default="", help="what the runs were, for speed.md (their budgets, their purpose)")
    estimate = commands.add_parser("estimate", help="a paper-scale IQL-EDIS and Cal-QL-EDIS run, from measured costs")
    estimate.add_argument("--costs", nargs="+", required=True, help="speed-costs-*.json files (updates and refresh)")
    estimate.add_argument("--sizes", choices=list(SIZES), default="Hopper")
    estimate.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    estimate.add_argument("--name", default="cpu", help="output: speed-estimate-<name>.json")
    threads = commands.add_parser("threads", help="updates/s and online steps/s per thread count, idle and beside "
                                  "one busy neighbour (run it on an otherwise idle machine)")
    threads.add_argument("--algorithms", nargs="+", default=["iql", "calql"])
    threads.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    threads.add_argument("--dataset", default="random:Hopper-v5:20000", help="Hopper sizes")
    threads.add_argument("--updates", type=int, default=2000, help="offline updates per run")
    threads.add_argument("--steps", type=int, default=2000, help="online steps per run")
    threads.add_argument("--name", default="")
    report = commands.add_parser("report", help="write speed.md")
    report.add_argument("--out", default="", help="default: speed.md in --results")
    args = parser.parse_args()
    args.out = getattr(args, "out", "") or str(Path(args.results) / "speed.md")
    if getattr(args, "options", None):
        args.options = args.options[1:] if args.options[:1] == ["--"] else args.options
    Path(args.results).mkdir(parents=True, exist_ok=True)
    return {"costs": costs_command, "fidelity": fidelity_command, "online": online_command,
            "estimate": estimate_command, "threads": threads_command, "report": report_command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
