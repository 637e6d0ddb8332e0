"""Does EDIS help fine-tuning? One offline checkpoint per seed, fine-tuned by every variant.

For each config and seed, the base algorithm is pretrained offline once, with the EDIS algorithm's
own settings (the config's iql_edis: or calql_edis: section), and every variant fine-tunes that same
checkpoint online, so the variants differ only in what happens online:

    iql                 IQL fine-tuning (offline + online replay), IQL-EDIS's settings
    iql_edis            IQL-EDIS, the paper's loop (generated + online data in every batch)
    iql_edis_unguided   the same with every guidance scale 0 (plain diffusion samples)
    iql_edis_reference  the same with --edis.replay reference (the public code's loop)
    iql_edis_offline_rows  the paper's loop with real offline rows where generated rows would go (no
                        diffusion model): what the batch mix does without the samples, so that the
                        samples' own effect is iql_edis minus this
    iql_edis_terminals  IQL-EDIS with the terminal flag modelled (--edis.include_terminal true): the
                        default, as in the public code, gives every generated row done = 0
    iql_edis_simulator_labels  IQL-EDIS whose generated (s, a) get the simulator's (r, s', done)
                        (--edis.simulator_labels true; Hopper, Walker2d, HalfCheetah): a diagnostic that
                        tells what the model's dynamics errors cost from what its choice of (s, a) does
    iql_edis_simulator_labels_unguided  the same with every guidance scale 0: against it, guided (s, a)
                        with true dynamics is the paper's idea with the model's weakest part removed
    calql, calql_edis, calql_edis_unguided, calql_edis_offline_rows, calql_edis_terminals,
    calql_edis_simulator_labels, calql_edis_simulator_labels_unguided   the same for Cal-QL

    python benchmarks/finetune.py run --configs configs/cpu/hopper-medium-replay.yaml --seeds 0 1 2 3 4 \\
        --variants iql iql_edis iql_edis_unguided iql_edis_reference -- --wandb_mode disabled
    python benchmarks/finetune.py status --log-dir runs/finetune
    python benchmarks/finetune.py report --log-dir runs/finetune --out benchmarks/results

`run` pretrains first (all pending pretraining runs, --workers at a time), then fine-tunes; finished
runs (summary.json) are skipped, so the same command resumes a dead sweep. `--data-dir DIR` reads the
configs' collected: datasets from DIR (data committed beside a result, collect.py --copy-to); the
sha256 of every dataset file and the weights of every checkpoint are recorded in the log folder
(data-fingerprints.json, checkpoint-fingerprints.json), and a sweep continued on other data or
other weights is refused. Each `run` appends its command, commit and machine to sweeps.jsonl.

`status` lists every run that the commands in the log folder's sweeps.jsonl plan (finished, started,
not started) with the time left, estimated from the finished runs' wall-clock.

`report` writes finetune.md and finetune.png: the final scores with rliable's interquartile mean
and 95% bootstrap interval (Agarwal et al., NeurIPS 2021), the probability that a variant's run
beats its base's and its counterpart's, mean ± std, the changes paired by seed (over the base, the
offline-rows mix, simulator labels, unguided), the critic's TD loss, the fidelity of the samples at
the refreshes, learning curves and a strip plot of every seed's final score.
"""

import argparse
import functools
import hashlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import ROOT, config_key, cpu_description, run_jobs  # noqa: E402

UNGUIDED = ["--edis.guidance_state", "0", "--edis.guidance_transition", "0", "--edis.guidance_policy", "0"]
# No refresh ever comes and nothing is fitted, so the offline rows that stand in for generated ones until the
# first refresh stay in every online batch, at the same share.
OFFLINE_ROWS = ["--edis.refresh_every", "1000000000", "--edis.initial_fit_steps", "0"]
TERMINALS = ["--edis.include_terminal", "true"]
SIMULATOR_LABELS = ["--edis.simulator_labels", "true"]
# variant: (script, the EDIS algorithm whose settings it runs with, extra options)
VARIANTS = {
    "iql": ("iql", "iql_edis", []),
    "iql_edis": ("iql_edis", "iql_edis", []),
    "iql_edis_unguided": ("iql_edis", "iql_edis", UNGUIDED),
    "iql_edis_reference": ("iql_edis", "iql_edis", ["--edis.replay", "reference"]),
    "iql_edis_offline_rows": ("iql_edis", "iql_edis", OFFLINE_ROWS),
    "iql_edis_terminals": ("iql_edis", "iql_edis", TERMINALS),
    "iql_edis_simulator_labels": ("iql_edis", "iql_edis", SIMULATOR_LABELS),
    "iql_edis_simulator_labels_unguided": ("iql_edis", "iql_edis", SIMULATOR_LABELS + UNGUIDED),
    "calql": ("calql", "calql_edis", []),
    "calql_edis": ("calql_edis", "calql_edis", []),
    "calql_edis_unguided": ("calql_edis", "calql_edis", UNGUIDED),
    "calql_edis_offline_rows": ("calql_edis", "calql_edis", OFFLINE_ROWS),
    "calql_edis_terminals": ("calql_edis", "calql_edis", TERMINALS),
    "calql_edis_simulator_labels": ("calql_edis", "calql_edis", SIMULATOR_LABELS),
    "calql_edis_simulator_labels_unguided": ("calql_edis", "calql_edis", SIMULATOR_LABELS + UNGUIDED),
}
# Fields that name or place a run rather than define the algorithm.
NOT_SETTINGS = {"seed", "threads", "name", "group", "project", "log_dir", "checkpoints_path", "load_model",
                "wandb_mode", "edis"}
FIDELITY = ("state_mmd", "policy_loglik", "actions_out_of_bounds", "dynamics_state_mse", "dynamics_reward_mae",
            "dynamics_terminal_error")
# (TD loss, value) as each base algorithm logs them under train/: IQL, then Cal-QL.
CRITIC_KEYS = (("train/q_loss", "train/mean_value"), ("train/qf1_loss", "train/average_qf1"))


def load_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"finetune_{name}", ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(value)


def base_overrides(config: str, base: str, edis_algorithm: str, modules: Dict[str, Any]) -> List[str]:
    """Options that make the base script run with the EDIS algorithm's settings from this config."""
    base_module, edis_module = modules[base], modules[edis_algorithm]
    read = {}
    for name, module in ((base, base_module), (edis_algorithm, edis_module)):
        read[name] = module.parse_config(module.TrainConfig, module.CONFIG_SECTIONS, ["--config", config])
    options = []
    for field in base_module.TrainConfig.__dataclass_fields__:
        if field in NOT_SETTINGS or not hasattr(read[edis_algorithm], field):
            continue
        wanted = getattr(read[edis_algorithm], field)
        if getattr(read[base], field) != wanted:
            options += [f"--{field}", option_value(wanted)]
    return options


def without_edis_options(options: List[str]) -> List[str]:
    """The options a base script takes: --edis.* (with its value) is for the EDIS scripts only."""
    kept, skip = [], False
    for option in options:
        if skip:
            skip = False
        elif option.startswith("--edis."):
            skip = "=" not in option
        else:
            kept.append(option)
    return kept


def pretrain_name(key: str, base: str, seed: int) -> str:
    return f"pretrain-{base}--{key.replace('/', '__')}--seed{seed}"


def finetune_name(variant: str, key: str, seed: int) -> str:
    return f"{variant}--{key.replace('/', '__')}--seed{seed}"


def checkpoint_of(log_dir: Path, key: str, base: str, seed: int, offline_iterations: int) -> Path:
    """The pretraining run's checkpoint at the end of pretraining (it saves one at each offline evaluation)."""
    return log_dir / "checkpoints" / pretrain_name(key, base, seed) / f"checkpoint_{offline_iterations}.pt"


def plan(args: argparse.Namespace) -> List[tuple]:
    """(name, command, needs) jobs: one pretraining run per config, family and seed, then the fine-tuning runs
    that load its checkpoint (`needs` names that pretraining run; None for a pretraining run).

    Seed-major order: a sweep cut short leaves whole seeds (every config and variant), not whole configs.
    """
    families = sorted({VARIANTS[variant][1] for variant in args.variants})  # iql_edis and/or calql_edis
    modules = {name: load_module(name) for family in families for name in (family, family.removesuffix("_edis"))}
    base_extra = without_edis_options(args.extra)
    for config in args.configs:
        if not Path(config).is_file():
            sys.exit(f"error: config not found: {config}")
    overrides_of = {(config, family): base_overrides(config, family.removesuffix("_edis"), family, modules)
                    for config in args.configs for family in families}
    jobs = []
    for seed in args.seeds:
        for config in args.configs:
            key = config_key(config)
            for family in families:
                base = family.removesuffix("_edis")
                overrides = overrides_of[(config, family)]
                pretraining = pretrain_name(key, base, seed)
                # --online_iterations 0 comes last: the options after -- (an online budget, say) are for every run,
                # but a pretraining run never goes online.
                command = ["python", f"algorithms/{base}.py", "--config", config, "--seed", str(seed),
                           "--threads", str(args.threads_per_run), "--name", pretraining, "--log_dir", args.log_dir,
                           "--checkpoints_path", str(Path(args.log_dir) / "checkpoints"), *overrides, *base_extra,
                           "--online_iterations", "0"]
                jobs.append((pretraining, command, None))
                module = modules[base]
                offline_iterations = module.parse_config(module.TrainConfig, module.CONFIG_SECTIONS,
                                                         command[2:]).offline_iterations
                checkpoint = checkpoint_of(Path(args.log_dir), key, base, seed, offline_iterations)
                for variant in args.variants:
                    script, variant_family, extra = VARIANTS[variant]
                    if variant_family != family:
                        continue
                    own = [*overrides, *base_extra] if script == base else args.extra
                    name = finetune_name(variant, key, seed)
                    jobs.append((name, ["python", f"algorithms/{script}.py", "--config", config, "--seed", str(seed),
                                        "--threads", str(args.threads_per_run), "--name", name, "--log_dir",
                                        args.log_dir, *own, *extra, "--load_model", str(checkpoint)], pretraining))
    return jobs


def weights_fingerprint(checkpoint: Path) -> str:
    """sha256 of the agent's tensors in a checkpoint (the file's bytes also hold its name and paths)."""
    import torch

    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if torch.is_tensor(value):
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            digest.update(repr(value).encode())

    add(torch.load(checkpoint, map_location="cpu", weights_only=False)["agent"])
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def dataset_files(args: argparse.Namespace) -> Dict[str, Path]:
    """The file each config's dataset is read from (collected: and hdf5: sources; EDIS_DATA_DIR set first)."""
    module = load_module(VARIANTS[args.variants[0]][1].removesuffix("_edis"))
    files = {}
    for config in args.configs:
        options = ["--config", config, *without_edis_options(args.extra)]
        source = module.parse_config(module.TrainConfig, module.CONFIG_SECTIONS, options).dataset
        scheme, _, rest = source.partition(":")
        path = (module.collected_dataset_path(source) if scheme == "collected" else Path(rest).expanduser()
                if scheme == "hdf5" else None)
        if path is not None:
            files[source] = path
    return files


def record_fingerprint(path: Path, name: str, fingerprint: str) -> str:
    """The fingerprint recorded for `name` in the JSON file at `path`, recording this one where there is none. The
    file is read and written at each call, so that two sweeps on one log folder keep each other's records."""
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if name not in recorded:
        recorded[name] = fingerprint
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        partial.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        os.replace(partial, path)
    return recorded[name]


def check_data(log_dir: Path, files: Dict[str, Path]) -> Optional[str]:
    """log_dir/data-fingerprints.json: the sha256 of every dataset file a sweep's runs read. A sweep continued on
    other data (a re-collection, another machine's) would mix two datasets in one table: refused."""
    path = log_dir / "data-fingerprints.json"
    for source, file in files.items():
        fingerprint = file_sha256(file)
        recorded = record_fingerprint(path, source, fingerprint)
        if recorded != fingerprint:
            return (f"{source} reads {file} (sha256 {fingerprint[:12]}), not the file this sweep's runs used "
                    f"(sha256 {recorded[:12]} in {path}): point --data-dir at that data, or use another --log-dir")
    return None


def record_sweep(log_dir: Path, argv: List[str]) -> None:
    """Appends to log_dir/sweeps.jsonl what ran: the command, the code's commit (and whether it had changes), the
    machine and the data directory, so that a committed table says exactly what made it."""
    def git(*words: str) -> str:
        try:
            return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(["python", *argv]),
             "commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain",
                                                                                 "--untracked-files=no")),
             **cpu_description(), "cores": os.cpu_count(), "edis_data_dir": os.environ.get("EDIS_DATA_DIR", "")}
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "sweeps.jsonl", "a") as file:
        file.write(json.dumps(entry) + "\n")


def check_checkpoint(log_dir: Path, name: str, checkpoint: Path) -> Optional[str]:
    """log_dir/checkpoint-fingerprints.json: the weights every fine-tuning run of a seed started from.

    A pretraining run that finished but left no checkpoint (a fresh machine, a sweep whose checkpoints were not
    kept) is made again (one thread is deterministic on a given machine and library version), and its new
    checkpoint must have the fingerprint that the seed's earlier fine-tuning runs started from, or nothing is
    fine-tuned on it.
    """
    path = log_dir / "checkpoint-fingerprints.json"
    fingerprint = weights_fingerprint(checkpoint)
    recorded = record_fingerprint(path, name, fingerprint)
    if recorded != fingerprint:
        return (f"its checkpoint {checkpoint} is not the one that this seed's earlier fine-tuning runs started "
                f"from (weights {fingerprint[:12]}, recorded {recorded[:12]} in {path}); fine-tuning it "
                f"would mix two checkpoints in one seed: move that seed's runs elsewhere to start it afresh")
    return None


def run(args: argparse.Namespace) -> int:
    jobs = plan(args)
    log_dir = Path(args.log_dir)
    checkpoints = {need: Path(command[command.index("--load_model") + 1]) for _, command, need in jobs if need}
    unfinished_needs = {need for name, _, need in jobs if need and not (log_dir / name / "summary.json").is_file()}
    if args.pretrain_only:
        jobs = [job for job in jobs if job[2] is None]
    if args.print_commands:
        for _, command, _ in jobs:
            print(shlex.join(command))
        return 0
    problem = check_data(log_dir, dataset_files(args))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    record_sweep(log_dir, sys.argv)
    for name, checkpoint in checkpoints.items():
        finished = (log_dir / name / "summary.json").is_file()
        if finished and checkpoint.is_file():
            problem = check_checkpoint(log_dir, name, checkpoint)
            if problem:
                print(f"error: {name}: {problem}", file=sys.stderr)
                return 2
        elif finished and name in unfinished_needs:
            superseded = log_dir / "superseded" / name
            shutil.rmtree(superseded, ignore_errors=True)
            superseded.parent.mkdir(parents=True, exist_ok=True)
            os.replace(log_dir / name, superseded)
            print(f"{name}: finished before, but its checkpoint {checkpoint} is gone: pretraining it again "
                  f"(its earlier record moved to {superseded})")

    def check(name: str) -> Optional[str]:
        return check_checkpoint(log_dir, name, checkpoints[name]) if name in checkpoints else None

    pretraining = sum(need is None for _, _, need in jobs)
    print(f"pretraining: {pretraining} run(s), fine-tuning: {len(jobs) - pretraining} run(s)")
    # One queue: each fine-tuning run starts as soon as its own pretraining run has finished.
    needs = {name: need for name, _, need in jobs if need is not None}
    return run_jobs([(name, command) for name, command, _ in jobs], log_dir, args.workers,
                    args.threads_per_run, needs, retries=args.retries, check=check)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def run_progress(folder: Path) -> float:
    """The share of a started run's steps done: the last step in its metrics.jsonl (about where --resume goes on)."""
    config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else None
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").is_file() else []
    if not config or not lines:
        return 0.0
    first = config["offline_iterations"] if config.get("load_model") else 0  # a fine-tuning run starts online
    total = config["offline_iterations"] + config["online_iterations"]
    return min(max((json.loads(lines[-1])["step"] - first) / max(total - first, 1), 0.0), 1.0)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def status(args: argparse.Namespace) -> int:
    """Every run that the commands in log_dir/sweeps.jsonl plan: finished, started or not, with the time a finished
    run of each kind took and an estimate of the time left (from the finished runs of the same kind, else from the
    config's other pretraining or fine-tuning runs of the same base algorithm)."""
    log_dir = Path(args.log_dir)
    if not (log_dir / "sweeps.jsonl").is_file():
        print(f"error: {log_dir / 'sweeps.jsonl'} not found: `finetune.py run --log-dir {log_dir}` writes it",
              file=sys.stderr)
        return 2
    jobs: Dict[str, tuple] = {}  # name: (config key, kind, base algorithm, whether it is a pretraining run)
    for line in (log_dir / "sweeps.jsonl").read_text().splitlines():
        argv = shlex.split(json.loads(line)["command"])
        recorded = parse_run_arguments(argv[argv.index("run") + 1:])
        recorded.log_dir = str(log_dir)
        for name, command, need in plan(recorded):
            kind, key = name.split("--")[0], config_key(command[command.index("--config") + 1])
            family = Path(command[1]).stem.removesuffix("_edis")
            jobs.setdefault(name, (key, kind, family, need is None))
    seconds: Dict[str, float] = {}  # finished runs: wall-clock
    progress: Dict[str, float] = {}  # the others: share done
    for name in jobs:
        summary = log_dir / name / "summary.json"
        if summary.is_file():
            phases = json.loads(summary.read_text())
            seconds[name] = sum((phases.get(phase) or {}).get("wall_clock_s") or 0.0 for phase in ("offline", "online"))
        else:
            progress[name] = run_progress(log_dir / name)

    by_kind, by_family = defaultdict(list), defaultdict(list)  # finished runs' times
    for name, took in seconds.items():
        key, kind, family, pretraining = jobs[name]
        by_kind[(key, kind)].append(took)
        by_family[(key, family, pretraining)].append(took)
    rows, left, unknown = [], 0.0, 0
    for key, kind in sorted({job[:2] for job in jobs.values()}):
        names = [name for name, job in jobs.items() if job[:2] == (key, kind)]
        family, pretraining = jobs[names[0]][2:]
        own = float(np.mean(by_kind[(key, kind)])) if by_kind[(key, kind)] else None
        related = by_family[(key, family, pretraining)]
        each = own if own is not None else float(np.mean(related)) if related else None
        todo = [progress[name] for name in names if name in progress]
        if each is None:
            unknown += len(todo)
        else:
            left += each * sum(1.0 - done for done in todo)
        started = sum(done > 0 for done in todo)
        group_left = "-" if not todo else "?" if each is None else hours(each * sum(1.0 - done for done in todo))
        rows.append(f"| {key} | {kind} | {len(names) - len(todo)} | {started} | {len(todo) - started} | "
                    f"{hours(own) if own is not None else '-'} | {group_left} |")
    print(f"{log_dir}: {len(seconds)} of {len(jobs)} runs finished")
    print("\n| config | run | finished | started | not started | a finished run took (mean) | left, one core |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    workers = args.workers
    print(f"\nleft: about {hours(left)} of one core, {hours(left / workers)} at {workers} runs at a time"
          + (f"; {unknown} run(s) of kinds with no finished run to estimate from" if unknown else "")
          + " (wall-clock of the finished runs; a started run's share done is the last step it logged)")
    return 0


def read_run(folder: Path) -> Optional[Dict[str, Any]]:
    summary_path, metrics_path = folder / "summary.json", folder / "metrics.jsonl"
    if not summary_path.is_file() or not metrics_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    key = summary["score_metric"]
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    evaluations = {r["step"]: r[key] for r in records if key in r}
    refreshes = [r for r in records if "edis/generated" in r]
    loss_key, value_key = next((keys for keys in CRITIC_KEYS if any(keys[0] in r for r in records)), CRITIC_KEYS[0])
    critic = [(r["step"] - config["offline_iterations"], r[loss_key], r.get(value_key, float("nan")))
              for r in records if loss_key in r and r["step"] >= config["offline_iterations"]]
    return {"summary": summary, "evaluations": evaluations, "refreshes": refreshes, "critic": critic,
            "offline_iterations": config["offline_iterations"]}


def critic_window(run: Dict[str, Any], last: bool) -> tuple:
    """Mean TD loss and mean value over the first (or last) tenth of the online updates a run logged."""
    steps = sorted(step for step, _, _ in run["critic"])
    if not steps:
        return float("nan"), float("nan")
    cut = steps[0] + (steps[-1] - steps[0]) * (0.9 if last else 0.1)
    window = [(loss, value) for step, loss, value in run["critic"] if (step >= cut if last else step <= cut)]
    return float(np.mean([w[0] for w in window])), float(np.mean([w[1] for w in window]))


def per_seed(values: List[float]) -> str:
    return " / ".join(f"{v:.3g}" for v in values)


def mean_std(values: List[float], digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def mean_se(values: List[float], digits: int = 1) -> str:
    """Signed mean ± its standard error (the std over values / sqrt(n))."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.{digits}f}"
    return f"{np.mean(values):+.{digits}f} ± {np.std(values, ddof=1) / np.sqrt(len(values)):.{digits}f}"


# What each paired comparison isolates, as (variant suffix, the suffix it is paired with) within a family. The
# paper's loop puts generated rows where offline rows would go: against <family>_offline_rows its change is what the
# samples do, apart from the mix. Against simulator labels (the same kind of (s, a), the simulator's (r, s', done))
# it is what the model's dynamics errors cost. Against the same loop unguided it is what guidance does; with
# simulator labels on both sides, that is the paper's idea with the model's dynamics taken out.
COMPARISONS = [
    ("What the generated samples do, apart from the batch mix:", "change over offline rows at the same mix",
     [(suffix, "_offline_rows") for suffix in ("", "_unguided", "_terminals", "_simulator_labels",
                                               "_simulator_labels_unguided")]),
    ("What the model's (r, s', done) cost, against the simulator's for the same kind of samples:",
     "change over simulator labels", [("", "_simulator_labels"), ("_unguided", "_simulator_labels_unguided")]),
    ("What guidance does, against the same loop with every scale 0:", "guided - unguided",
     [("", "_unguided"), ("_simulator_labels", "_simulator_labels_unguided")]),
]
# Bootstrap samples for rliable's intervals (report --bootstrap-reps), a tenth of rliable's default to keep a report
# under a minute on 2 cores: an interval's ends then move by up to about 2 points (of 100) against 20,000 samples (the
# first sweep's Hopper unguided IQM: [23.7, 87.4] here, [23.7, 85.3] at 20,000), far less than the intervals' widths
# at 3-5 seeds.
BOOTSTRAP_REPS = 2_000


def counterpart(variant: str, pairs: List[tuple]) -> Optional[str]:
    family = VARIANTS[variant][1]
    return next((family + against for suffix, against in pairs if variant == family + suffix), None)


def interval_estimate(scores: Any, statistic: Callable[..., Any], reps: int) -> tuple:
    """rliable's point estimate and 95% stratified-bootstrap interval, with a fixed bootstrap seed (the same runs give
    the same report)."""
    from rliable import library

    # rliable draws its resampling indices from numpy's global generator (its random_state never reaches them): seed
    # that for the call and put it back, or each process draws other samples and the same runs give other intervals
    global_state = np.random.get_state()
    np.random.seed(0)
    try:
        estimate, interval = library.get_interval_estimates({"x": scores}, statistic, reps=reps)
    finally:
        np.random.set_state(global_state)
    low, high = np.ravel(interval["x"])
    return float(np.ravel(estimate["x"])[0]), float(low), float(high)


@functools.lru_cache(maxsize=None)
def iqm_interval(scores: tuple, reps: int) -> tuple:
    """The interquartile mean of the runs' scores and its 95% interval."""
    from rliable import metrics

    return interval_estimate(np.asarray(scores, dtype=float).reshape(-1, 1),
                             lambda x: np.array([metrics.aggregate_iqm(x)]), reps)


def improvement_interval(scores: List[float], against: List[float], reps: int) -> tuple:
    """rliable's probability of improvement P(X > Y) (Mann-Whitney U over all pairs of runs, ties count 1/2) and
    its 95% interval."""
    from rliable import metrics

    return interval_estimate((np.asarray(scores, dtype=float).reshape(-1, 1),
                              np.asarray(against, dtype=float).reshape(-1, 1)), metrics.probability_of_improvement,
                             reps)


def robust_statistics(runs: Dict[tuple, Dict[int, Dict[str, Any]]], score: Callable[[Dict[str, Any]], float],
                      reps: int) -> str:
    """The estimates that few seeds and bimodal outcomes call for (Agarwal et al., NeurIPS 2021, via rliable):
    IQM of the final score with its 95% stratified-bootstrap interval, and the probability that a variant's run
    beats its base's (or its counterpart's), with its interval."""
    lines = ["| config | variant | seeds | final score: IQM [95% CI] | mean ± std (ddof 0) | per seed |",
             "|---|---|---|---|---|---|"]
    for (key, variant), seeds in sorted(runs.items()):
        scores = [score(seeds[s]) for s in sorted(seeds)]
        iqm, low, high = iqm_interval(tuple(scores), reps)
        lines.append(f"| {key} | {variant} | {len(scores)} | {iqm:.1f} [{low:.1f}, {high:.1f}] | {mean_std(scores)} "
                     f"| {' / '.join(f'{v:.1f}' for v in scores)} |")
    comparisons = ["| config | X | Y | P(X > Y) [95% CI] | X - Y paired by seed, mean ± std (ddof 0) |",
                   "|---|---|---|---|---|"]
    for (key, variant), seeds in sorted(runs.items()):
        base = VARIANTS[variant][1].removesuffix("_edis")
        others = [base] + [counterpart(variant, pairs) for _, _, pairs in COMPARISONS]
        for other in dict.fromkeys(o for o in others if o and o != variant and (key, o) in runs):
            against = runs[(key, other)]
            probability, low, high = improvement_interval([score(run) for run in seeds.values()],
                                                          [score(run) for run in against.values()], reps)
            paired = [score(seeds[s]) - score(against[s]) for s in sorted(seeds) if s in against]
            comparisons.append(f"| {key} | {variant} | {other} | {probability:.2f} [{low:.2f}, {high:.2f}] | "
                               f"{mean_std(paired)} ({len(paired)} seed{'s' if len(paired) > 1 else ''}) |")
    text = ("Final scores (the last evaluation of each run), with rliable's interquartile mean and 95% stratified-"
            f"bootstrap confidence interval over runs ({reps:,} bootstrap samples):\n\n" + "\n".join(lines))
    if len(comparisons) > 2:
        text += ("\n\nProbability of improvement (rliable): the chance that a run of X ends above a run of Y, "
                 "over all pairs of runs, with its 95% bootstrap interval; 0.5 is no difference:\n\n"
                 + "\n".join(comparisons))
    return text


def report(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir)
    runs: Dict[tuple, Dict[int, Dict[str, Any]]] = defaultdict(dict)
    pretrained: Dict[tuple, Dict[int, Dict[str, Any]]] = defaultdict(dict)
    if not log_dir.is_dir():
        print(f"error: {log_dir} is not a folder of runs: make it with `python benchmarks/finetune.py run "
              f"--log-dir {log_dir} ...`, or give the --log-dir a sweep wrote to", file=sys.stderr)
        return 1
    for folder in sorted(p for p in log_dir.iterdir() if p.is_dir()):
        parts = folder.name.split("--")
        if len(parts) != 3 or not parts[2].startswith("seed"):
            continue
        loaded = read_run(folder)
        if loaded is None:
            print(f"skipped {folder.name}: no summary.json (unfinished or failed)")
            continue
        seed, key = int(parts[2][4:]), parts[1].replace("__", "/")
        if parts[0].startswith("pretrain-"):
            pretrained[(key, parts[0].removeprefix("pretrain-"))][seed] = loaded
        elif parts[0] in VARIANTS:
            runs[(key, parts[0])][seed] = loaded
    if not runs:
        print(f"error: no finished fine-tuning runs under {log_dir}", file=sys.stderr)
        return 1

    def final(run: Dict[str, Any]) -> float:
        return run["evaluations"][max(run["evaluations"])]

    def last3(run: Dict[str, Any]) -> float:  # less noisy than one evaluation of 10 episodes
        return float(np.mean([run["evaluations"][step] for step in sorted(run["evaluations"])[-3:]]))

    def changes(seeds: Dict[int, Dict[str, Any]], against: Dict[int, Dict[str, Any]]) -> List[str]:
        """Per seed, the score minus `against`'s from the same checkpoint: final, and mean of the last 3."""
        paired = [s for s in seeds if s in against]
        if not paired:
            return ["-", "-"]
        count = f"{len(paired)} paired seed" + ("s" if len(paired) > 1 else "")
        return [f"{mean_std([score(seeds[s]) - score(against[s]) for s in paired])} ({count})"
                for score in (final, last3)]

    lines = ["| config | variant | seeds | offline | online (final) | online (mean of last 3 evaluations) "
             "| change over base (final) | change over base (last 3) |", "|---|---|---|---|---|---|---|---|"]
    for (key, variant), seeds in sorted(runs.items()):
        base = VARIANTS[variant][1].removesuffix("_edis")
        offline = [final(pretrained[(key, base)][s]) for s in seeds if s in pretrained[(key, base)]]
        change = changes(seeds, runs[(key, base)]) if variant != base and (key, base) in runs else ["-", "-"]
        lines.append(f"| {key} | {variant} | {len(seeds)} | {mean_std(offline)} | "
                     f"{mean_std([final(run) for run in seeds.values()])} | "
                     f"{mean_std([last3(run) for run in seeds.values()])} | {change[0]} | {change[1]} |")
    table = "\n".join(lines)

    for heading, column, pairs in COMPARISONS:
        rows = [f"| config | variant | {column} (final) | (last 3) |", "|---|---|---|---|"]
        for (key, variant), seeds in sorted(runs.items()):
            against = counterpart(variant, pairs)
            if against and (key, against) in runs:
                change = changes(seeds, runs[(key, against)])
                rows.append(f"| {key} | {variant} | {change[0]} | {change[1]} |")
        if len(rows) > 2:
            table += f"\n\n{heading}\n\n" + "\n".join(rows)
    table = robust_statistics(runs, final, args.bootstrap_reps) + "\n\n" + table

    # A critic that diverges on generated rows shows here before it shows in the score.
    critic = ["| config | variant | seeds | TD loss, first tenth of online steps | TD loss, last tenth "
              "| value, last tenth |", "|---|---|---|---|---|---|"]
    for (key, variant), seeds in sorted(runs.items()):
        logged = [s for s in sorted(seeds) if seeds[s]["critic"]]
        ordered = [seeds[s] for s in logged]
        if ordered:
            first, last = [critic_window(r, False) for r in ordered], [critic_window(r, True) for r in ordered]
            critic.append(f"| {key} | {variant} | {' '.join(map(str, logged))} | {per_seed([f[0] for f in first])} | "
                          f"{per_seed([t[0] for t in last])} | {per_seed([t[1] for t in last])} |")
    if len(critic) > 2:
        table += ("\n\nThe critic during fine-tuning, per seed (TD loss: IQL's q_loss, Cal-QL's "
                  "qf1_loss; value: IQL's mean V(s), Cal-QL's mean Q1(s, a), over the batches it trained on):\n\n"
                  + "\n".join(critic))

    fidelity = ["| config | variant | refreshes | metric | guided | unguided | guided - unguided |",
                "|---|---|---|---|---|---|---|"]
    for (key, variant), seeds in sorted(runs.items()):
        refreshes = [r for run in seeds.values() for r in run["refreshes"] if "edis/state_mmd_guided" in r]
        for metric in FIDELITY:
            guided = [r[f"edis/{metric}_guided"] for r in refreshes if f"edis/{metric}_guided" in r]
            unguided = [r[f"edis/{metric}_unguided"] for r in refreshes if f"edis/{metric}_unguided" in r]
            # Both batches of a refresh come from the same model: their difference is free of the drift
            # between refreshes that dominates each column's std.
            differences = [r[f"edis/{metric}_guided"] - r[f"edis/{metric}_unguided"] for r in refreshes
                           if f"edis/{metric}_guided" in r and f"edis/{metric}_unguided" in r]
            if guided:
                fidelity.append(f"| {key} | {variant} | {len(guided)} | {metric} | {mean_std(guided, 3)} | "
                                f"{mean_std(unguided, 3)} | {mean_se(differences, 3)} |")
    note = ("Scores: D4RL-normalised x 100 (raw return where the data has no reference returns), mean ± std over "
            "seeds (numpy's std, ddof 0). Offline: the shared pretraining run's final evaluation. Change over base: "
            "per seed, the variant's final score (or mean of its last 3 evaluations) minus its base's (iql or calql) "
            "from the same checkpoint. "
            "Fidelity: the model's own samples (before any simulator labels), mean ± std over every "
            "refresh of every seed; guided: the batch the run trained on, unguided: a batch of the same model with "
            "every scale 0 (for an *_unguided variant both are unguided, so their difference is the metric's noise); "
            "guided - unguided: per refresh, mean ± standard error over refreshes; "
            "state_mmd lower is closer to the online states, policy_loglik higher is closer to the current policy, "
            "actions_out_of_bounds: share of action dimensions generated outside the bounds (clamped onto them), "
            "dynamics errors (in units of the data's std) lower is more faithful, "
            "dynamics_terminal_error: share of rows whose done flag is not the simulator's termination.")
    text = f"{table}\n\n{chr(10).join(fidelity)}\n\n{note}\n"
    print(text)
    outputs = [log_dir] + ([Path(args.out)] if args.out else [])
    for folder in outputs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "finetune.md").write_text(text)
        plot_curves(runs, pretrained, folder / "finetune.png", args.bootstrap_reps)
    print("wrote " + ", ".join(str(folder / "finetune.md") for folder in outputs) + " and finetune.png")
    return 0


def plot_curves(runs: Dict[tuple, Dict[int, Dict[str, Any]]], pretrained: Dict[tuple, Dict[int, Dict[str, Any]]],
                path: Path, reps: int = BOOTSTRAP_REPS) -> None:
    """Per config, one column: score against online step (mean ± std over the seeds present at each step), the
    critic's TD loss (median and range over seeds, log scale), and each seed's final score per variant with the
    IQM and its 95% interval (a strip plot: with 3-5 seeds the points say more than a mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({key for key, _ in runs})
    variants = sorted({variant for _, variant in runs})
    colors = {variant: plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")(i) for i, variant
              in enumerate(variants)}
    fig, axes = plt.subplots(3, len(keys), figsize=(5.5 * len(keys), 11), squeeze=False)
    for ax, loss_ax, strip_ax, key in zip(axes[0], axes[1], axes[2], keys, strict=True):
        present = [variant for variant in variants if (key, variant) in runs]
        for row, variant in enumerate(present):
            finals = [run["evaluations"][max(run["evaluations"])] for _, run in sorted(runs[(key, variant)].items())]
            jitter = np.linspace(-0.15, 0.15, len(finals)) if len(finals) > 1 else np.zeros(1)
            strip_ax.scatter(finals, row + jitter, color=colors[variant], s=18, zorder=3)
            iqm, low, high = iqm_interval(tuple(finals), reps)
            strip_ax.plot([low, high], [row, row], color=colors[variant], alpha=0.4, linewidth=6, zorder=2)
            strip_ax.plot([iqm, iqm], [row - 0.3, row + 0.3], color="black", linewidth=1.5, zorder=4)
        strip_ax.set_yticks(range(len(present)), present, fontsize=7)
        strip_ax.invert_yaxis()
        strip_ax.set_xlabel("final score per seed (dots), IQM (bar) and its 95% CI (band)", fontsize=8)
        for (run_key, variant), seeds in sorted(runs.items()):
            if run_key != key:
                continue
            base = VARIANTS[variant][1].removesuffix("_edis")
            by_step: Dict[int, List[float]] = defaultdict(list)
            for seed, run in seeds.items():
                pretrain = pretrained.get((key, base), {}).get(seed)
                if pretrain:  # online step 0: the checkpoint's own score
                    by_step[0].append(pretrain["evaluations"][max(pretrain["evaluations"])])
                for step, value in run["evaluations"].items():
                    by_step[step - run["offline_iterations"]].append(value)
            steps = sorted(by_step)
            mean = np.array([np.mean(by_step[s]) for s in steps])
            std = np.array([np.std(by_step[s]) for s in steps])
            count = f"{len(seeds)} seed" + ("s" if len(seeds) > 1 else "")
            ax.plot(steps, mean, label=f"{variant} ({count})", color=colors[variant])
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15, color=colors[variant])
            losses: Dict[int, List[float]] = defaultdict(list)
            for run in seeds.values():
                for step, loss, _ in run["critic"]:
                    losses[step].append(loss)
            if losses:  # median and range over seeds: one diverging seed should not hide the others
                steps = sorted(losses)
                loss_ax.plot(steps, [np.median(losses[s]) for s in steps], label=variant, color=colors[variant])
                loss_ax.fill_between(steps, [min(losses[s]) for s in steps], [max(losses[s]) for s in steps],
                                     alpha=0.15, color=colors[variant])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("online environment steps", fontsize=8)
        ax.legend(fontsize=7)
        loss_ax.set_yscale("log")
        loss_ax.set_xlabel("online environment steps", fontsize=8)
    axes[0][0].set_ylabel("evaluation score")
    axes[1][0].set_ylabel("critic TD loss (median, range over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_run_arguments(run_parser: argparse.ArgumentParser) -> None:
    run_parser.add_argument("--configs", nargs="+", required=True)
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    run_parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                            default=["iql", "iql_edis", "iql_edis_unguided", "iql_edis_reference",
                                     "iql_edis_offline_rows"])
    run_parser.add_argument("--log-dir", default="runs/finetune")
    run_parser.add_argument("--data-dir", default=None,
                            help="EDIS_DATA_DIR of every run: where collected: datasets are read (the data committed "
                                 "beside a result); default: the environment's")
    run_parser.add_argument("--threads-per-run", type=int, default=1,
                            help="torch threads of each run (its --threads, and OMP_NUM_THREADS)")
    run_parser.add_argument("--workers", type=int, default=None, help="runs at a time (default: cores // threads)")
    run_parser.add_argument("--retries", type=int, default=2,
                            help="attempts after a run is killed by a signal (it resumes from its snapshot)")
    run_parser.add_argument("--print-commands", action="store_true", help="print the commands, run nothing")
    run_parser.add_argument("--pretrain-only", action="store_true", help="stop after the pretraining runs")
    run_parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: options passed to every run")


def parse_run_arguments(argv: List[str]) -> argparse.Namespace:
    """`run`'s arguments as a recorded command gave them (what `status` re-plans from sweeps.jsonl)."""
    run_parser = argparse.ArgumentParser(prog="finetune.py run")
    add_run_arguments(run_parser)
    args = run_parser.parse_args(argv)
    args.extra = without_separator(args.extra)
    return args


def without_separator(extra: List[str]) -> List[str]:
    """The options after `--` (argparse keeps the `--` itself)."""
    return extra[1:] if extra[:1] == ["--"] else extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="pretrain once per config and seed, then fine-tune every variant"))
    report_parser = sub.add_parser("report", help="table and learning curves of finished runs")
    report_parser.add_argument("--log-dir", default="runs/finetune")
    report_parser.add_argument("--out", default="", help="also write finetune.md and finetune.png here")
    report_parser.add_argument("--bootstrap-reps", type=int, default=BOOTSTRAP_REPS,
                               help="bootstrap samples for each rliable interval (rliable's default: 20,000)")
    status_parser = sub.add_parser("status", help="what the sweep in --log-dir has finished, and the time left")
    status_parser.add_argument("--log-dir", default="runs/finetune")
    status_parser.add_argument("--workers", type=int, default=2, help="runs at a time, for the time left")
    args = parser.parse_args()
    if args.command == "report" and args.bootstrap_reps < 1:
        parser.error("--bootstrap-reps must be at least 1")
    if args.command == "run":
        if args.threads_per_run < 1 or (args.workers is not None and args.workers < 1):
            parser.error("--workers and --threads-per-run must be at least 1")
        args.workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads_per_run)
        args.extra = without_separator(args.extra)
        if args.data_dir:
            if not Path(args.data_dir).is_dir():
                parser.error(f"--data-dir {args.data_dir} is not a folder")
            os.environ["EDIS_DATA_DIR"] = str(Path(args.data_dir).resolve())
        try:
            return run(args)
        except Exception as error:  # a config that does not parse: the scripts' own one-line message
            if type(error).__name__ != "UserError":
                raise
            print(f"error: {error}", file=sys.stderr)
            return 2
    return status(args) if args.command == "status" else report(args)


if __name__ == "__main__":
    sys.exit(main())
