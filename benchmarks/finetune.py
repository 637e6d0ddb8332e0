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
    calql, calql_edis, calql_edis_unguided, calql_edis_offline_rows, calql_edis_terminals,
    calql_edis_simulator_labels   the same for Cal-QL

    python benchmarks/finetune.py run --configs configs/cpu/hopper-medium-replay.yaml --seeds 0 1 2 3 4 \\
        --variants iql iql_edis iql_edis_unguided iql_edis_reference -- --wandb_mode disabled
    python benchmarks/finetune.py report --log-dir runs/finetune --out benchmarks/results

`run` pretrains first (all pending pretraining runs, --workers at a time), then fine-tunes; finished
runs (summary.json) are skipped, so the same command resumes a dead sweep. `report` writes a table
(offline -> online score, each EDIS variant's change over its base, guided and unguided fidelity
metrics at the refreshes) and the learning curves.
"""

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import ROOT, config_key, run_jobs  # noqa: E402

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
    "calql": ("calql", "calql_edis", []),
    "calql_edis": ("calql_edis", "calql_edis", []),
    "calql_edis_unguided": ("calql_edis", "calql_edis", UNGUIDED),
    "calql_edis_offline_rows": ("calql_edis", "calql_edis", OFFLINE_ROWS),
    "calql_edis_terminals": ("calql_edis", "calql_edis", TERMINALS),
    "calql_edis_simulator_labels": ("calql_edis", "calql_edis", SIMULATOR_LABELS),
}
# Fields that name or place a run rather than define the algorithm.
NOT_SETTINGS = {"seed", "name", "group", "project", "log_dir", "checkpoints_path", "load_model", "wandb_mode", "edis"}
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
                           "--name", pretraining, "--log_dir", args.log_dir,
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
                                        "--name", name, "--log_dir", args.log_dir, *own, *extra,
                                        "--load_model", str(checkpoint)], pretraining))
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


class Fingerprints:
    """log_dir/checkpoint-fingerprints.json: the weights every fine-tuning run of a seed started from.

    The run records (summary.json, metrics.jsonl) are small and worth keeping, the checkpoints are not: on a
    fresh machine a sweep finds pretraining runs that finished but left no checkpoint. Such a run is made
    again (one thread is deterministic on a given machine and library version), and its new checkpoint must
    have the fingerprint that the seed's earlier fine-tuning runs started from, or nothing is fine-tuned on it.
    """

    def __init__(self, log_dir: Path):
        self.path = log_dir / "checkpoint-fingerprints.json"
        self.recorded: Dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def check(self, name: str, checkpoint: Path) -> Optional[str]:
        """Records a new checkpoint's fingerprint; an error if it differs from the recorded one."""
        fingerprint = weights_fingerprint(checkpoint)
        recorded = self.recorded.setdefault(name, fingerprint)
        if recorded != fingerprint:
            return (f"its checkpoint {checkpoint} is not the one that this seed's earlier fine-tuning runs started "
                    f"from (weights {fingerprint[:12]}, recorded {recorded[:12]} in {self.path}); fine-tuning it "
                    f"would mix two checkpoints in one seed: move that seed's runs elsewhere to start it afresh")
        partial = self.path.with_name(self.path.name + ".part")
        partial.write_text(json.dumps(self.recorded, indent=1, sort_keys=True) + "\n")
        os.replace(partial, self.path)
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
    fingerprints = Fingerprints(log_dir)
    for name, checkpoint in checkpoints.items():
        finished = (log_dir / name / "summary.json").is_file()
        if finished and checkpoint.is_file():
            problem = fingerprints.check(name, checkpoint)
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
        return fingerprints.check(name, checkpoints[name]) if name in checkpoints else None

    pretraining = sum(need is None for _, _, need in jobs)
    print(f"pretraining: {pretraining} run(s), fine-tuning: {len(jobs) - pretraining} run(s)")
    # One queue: each fine-tuning run starts as soon as its own pretraining run has finished.
    needs = {name: need for name, _, need in jobs if need is not None}
    return run_jobs([(name, command) for name, command, _ in jobs], log_dir, args.workers,
                    args.threads_per_run, needs, retries=args.retries, check=check)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
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


def report(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir)
    runs: Dict[tuple, Dict[int, Dict[str, Any]]] = defaultdict(dict)
    pretrained: Dict[tuple, Dict[int, Dict[str, Any]]] = defaultdict(dict)
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

    # The paper's loop replaces offline rows by generated ones at the same share of each batch: against
    # <family>_offline_rows, a paper-loop variant's change is what its samples do, apart from the mix. Against
    # <family>_simulator_labels (the same samples' (s, a) with the simulator's (r, s', done)), the change is what
    # the model's dynamics errors cost.
    paired_tables = [
        ("offline_rows", ("", "_unguided", "_terminals", "_simulator_labels"),
         "What the generated samples do, apart from the batch mix:", "change over offline rows at the same mix"),
        ("simulator_labels", ("",), "What the model's (r, s', done) cost, against the simulator's for the same "
         "kind of samples:", "change over simulator labels"),
    ]
    for against, suffixes, heading, column in paired_tables:
        rows = [f"| config | variant | {column} (final) | (last 3) |", "|---|---|---|---|"]
        for (key, variant), seeds in sorted(runs.items()):
            family = VARIANTS[variant][1]
            if variant in [family + suffix for suffix in suffixes] and (key, f"{family}_{against}") in runs:
                change = changes(seeds, runs[(key, f"{family}_{against}")])
                rows.append(f"| {key} | {variant} | {change[0]} | {change[1]} |")
        if len(rows) > 2:
            table += f"\n\n{heading}\n\n" + "\n".join(rows)

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
            "seeds. Offline: the shared pretraining run's final evaluation. Change over base: per seed, the variant's "
            "final score (or mean of its last 3 evaluations) minus its base's (iql or calql) from the same checkpoint. "
            "Fidelity: the model's own samples (before any simulator labels), mean ± std over every "
            "refresh of every seed; guided - unguided: per refresh, mean ± standard error over refreshes; "
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
        plot_curves(runs, pretrained, folder / "finetune.png")
    print("wrote " + ", ".join(str(folder / "finetune.md") for folder in outputs) + " and finetune.png")
    return 0


def plot_curves(runs: Dict[tuple, Dict[int, Dict[str, Any]]], pretrained: Dict[tuple, Dict[int, Dict[str, Any]]],
                path: Path) -> None:
    """Per config: score against online step (mean ± std over the seeds present at each step) above, the
    critic's TD loss (median and range over seeds, log scale) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({key for key, _ in runs})
    fig, axes = plt.subplots(2, len(keys), figsize=(5 * len(keys), 7), squeeze=False)
    for ax, loss_ax, key in zip(axes[0], axes[1], keys, strict=True):
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
            ax.plot(steps, mean, label=f"{variant} ({len(seeds)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
            losses: Dict[int, List[float]] = defaultdict(list)
            for run in seeds.values():
                for step, loss, _ in run["critic"]:
                    losses[step].append(loss)
            if losses:  # median and range over seeds: one diverging seed should not hide the others
                steps = sorted(losses)
                loss_ax.plot(steps, [np.median(losses[s]) for s in steps], label=variant)
                loss_ax.fill_between(steps, [min(losses[s]) for s in steps], [max(losses[s]) for s in steps],
                                     alpha=0.15)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="pretrain once per config and seed, then fine-tune every variant")
    run_parser.add_argument("--configs", nargs="+", required=True)
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    run_parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                            default=["iql", "iql_edis", "iql_edis_unguided", "iql_edis_reference",
                                     "iql_edis_offline_rows"])
    run_parser.add_argument("--log-dir", default="runs/finetune")
    run_parser.add_argument("--threads-per-run", type=int, default=1, help="OMP_NUM_THREADS of each run")
    run_parser.add_argument("--workers", type=int, default=None, help="runs at a time (default: cores // threads)")
    run_parser.add_argument("--retries", type=int, default=2,
                            help="attempts after a run is killed by a signal (it resumes from its snapshot)")
    run_parser.add_argument("--print-commands", action="store_true", help="print the commands, run nothing")
    run_parser.add_argument("--pretrain-only", action="store_true", help="stop after the pretraining runs")
    run_parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: options passed to every run")
    report_parser = sub.add_parser("report", help="table and learning curves of finished runs")
    report_parser.add_argument("--log-dir", default="runs/finetune")
    report_parser.add_argument("--out", default="", help="also write finetune.md and finetune.png here")
    args = parser.parse_args()
    if args.command == "run":
        if args.threads_per_run < 1 or (args.workers is not None and args.workers < 1):
            parser.error("--workers and --threads-per-run must be at least 1")
        args.workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads_per_run)
        args.extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
        try:
            return run(args)
        except Exception as error:  # a config that does not parse: the scripts' own one-line message
            if type(error).__name__ != "UserError":
                raise
            print(f"error: {error}", file=sys.stderr)
            return 2
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
