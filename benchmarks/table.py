"""Reproduce the results table: run algorithms x configs x seeds, then report measured beside published.

Run locally, --workers runs at a time (default: the cores divided by --threads-per-run), each
limited to --threads-per-run threads. A run whose summary.json exists is skipped, so a dead sweep
resumes where it stopped; a run that fails is reported with its error line at the end, and the
others go on:

    python benchmarks/table.py run --algorithms iql iql_edis --configs configs/cpu/hopper-medium-replay.yaml --seeds 0 1

On a cluster, write the same runs as one command per line, or as a SLURM array job that runs
line $SLURM_ARRAY_TASK_ID of a jobs file:

    python benchmarks/table.py run --configs configs/antmaze/*.yaml --print-commands > jobs.txt
    python benchmarks/table.py run --configs configs/antmaze/*.yaml --slurm jobs.sbatch && sbatch jobs.sbatch

Then, wherever the run folders were gathered:

    python benchmarks/table.py report --log-dir runs/table    # table + bar plot beside published numbers
    python benchmarks/table.py curves --log-dir runs/table    # evaluation score over training, per config

CPU scale (data made on this machine by benchmarks/collect.py): --configs configs/cpu/*.yaml.
Full-scale configs (1M updates) are GPU work: about 2 h (IQL) to a day (Cal-QL) per run on one GPU.
Anything after `--` is passed to every run, e.g. `-- --device cuda --wandb_mode online`.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((Path(__file__).with_name("reference_scores.json")).read_text())


def config_key(path: str) -> str:
    """configs/adroit/pen-cloned.yaml -> adroit/pen-cloned."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(ROOT / "configs").with_suffix(""))
    except ValueError:
        return resolved.stem


def run_name(algorithm: str, key: str, seed: int) -> str:
    return f"{algorithm}--{key.replace('/', '__')}--seed{seed}"


def parse_run_name(name: str) -> Optional[tuple]:
    parts = name.split("--")
    if len(parts) != 3 or not parts[2].startswith("seed"):
        return None
    return parts[0], parts[1].replace("__", "/"), int(parts[2][4:])


def commands(args: argparse.Namespace) -> List[tuple]:
    jobs = []
    for config in args.configs:
        if not Path(config).is_file():
            sys.exit(f"error: config not found: {config}")
        key = config_key(config)
        for algorithm in args.algorithms:
            script = ROOT / "algorithms" / f"{algorithm}.py"
            if not script.is_file():
                sys.exit(f"error: no algorithm file {script}")
            for seed in args.seeds:
                name = run_name(algorithm, key, seed)
                command = ["python", str(script.relative_to(ROOT)), "--config", config, "--seed", str(seed),
                           "--name", name, "--log_dir", args.log_dir, *args.extra]
                jobs.append((name, command))
    return jobs


def write_slurm(path: Path, jobs: List[tuple], args: argparse.Namespace) -> Path:
    """A SLURM array script beside a jobs file: array task i runs line i of the jobs file."""
    jobs_file = path.with_suffix(".jobs")
    jobs_file.write_text("".join(shlex.join(command) + "\n" for _, command in jobs))
    path.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --array=1-{len(jobs)}\n#SBATCH --gres=gpu:1\n#SBATCH --cpus-per-task={args.threads_per_run}\n"
        f"#SBATCH --output={args.log_dir}/slurm-%A_%a.out\n"
        f"export OMP_NUM_THREADS={args.threads_per_run}\n"
        f"cd {shlex.quote(str(ROOT))}\n"
        f'eval "$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(jobs_file.resolve()))})"\n')
    return jobs_file


def last_error_line(log_path: Path) -> str:
    """The run's `error:` line, else the last line it printed (a traceback's last line)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else "(no output)")


def run(args: argparse.Namespace) -> int:
    jobs = commands(args)
    if args.print_commands:
        for _, command in jobs:
            print(shlex.join(command))
        return 0
    if args.slurm:
        jobs_file = write_slurm(Path(args.slurm), jobs, args)
        print(f"wrote {args.slurm} and {jobs_file}: {len(jobs)} runs (submit with: sbatch {args.slurm})")
        return 0
    return run_jobs(jobs, Path(args.log_dir), args.workers, args.threads_per_run, retries=args.retries)


def has_snapshot(run_dir: Path) -> bool:
    return (run_dir / "snapshot.pt").is_file() or (run_dir / "snapshot.prev.pt").is_file()


def attempt_command(name: str, command: List[str], log_dir: Path) -> List[str]:
    """The command for the next attempt of a run: `--resume` where a killed attempt left a snapshot,
    else the run from the start (after removing what a dead attempt left, so that no partial log mixes in)."""
    run_dir = log_dir / name
    if has_snapshot(run_dir) and command[1].startswith("algorithms/"):
        return [command[0], command[1], "--resume", str(run_dir)]
    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    return command


def killed_by_the_system(code: int) -> bool:
    """Ended by a signal (the OOM killer, a preemption, a node going down), not by the run's own error."""
    return code < 0 or code in (128 + 9, 128 + 15)


def run_jobs(jobs: List[tuple], log_dir: Path, workers: int, threads_per_run: int,
             needs: Optional[Dict[str, str]] = None, retries: int = 2) -> int:
    """Runs (name, command) jobs, `workers` at a time; a job whose log_dir/name/summary.json exists is skipped.

    A run that died in an earlier sweep resumes from its snapshot (`--resume`), or starts over where it left
    none. A run killed by a signal is tried again, resuming, up to `retries` times; a run that fails by its
    own error is not. `needs` maps a job to the job it waits for (a fine-tuning run on its pretraining
    run): it starts as soon as that one has finished, and fails without starting if that one failed.
    Each run's output goes to log_dir/name.log; failures are listed at the end. Returns the exit code.
    """
    needs = needs or {}
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = []
    for name, command in jobs:
        if (log_dir / name / "summary.json").is_file():
            print(f"{name}: done before, skipped")
        else:
            if has_snapshot(log_dir / name):
                print(f"{name}: an earlier attempt died; resuming it from its snapshot")
            elif (log_dir / name).is_dir():
                print(f"{name}: an earlier attempt died before its first snapshot; starting it over")
            pending.append((name, command))
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads_per_run), MKL_NUM_THREADS=str(threads_per_run))
    running: Dict[str, tuple] = {}
    attempts: Dict[str, int] = defaultdict(int)
    failures: List[tuple] = []
    failed: set = set()
    total, started_sweep = len(pending), time.time()
    print(f"{total} run(s) to do, {workers} at a time, {threads_per_run} thread(s) each", flush=True)
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                name, command = job
                need = needs.get(name)
                if need in failed:
                    pending.remove(job)
                    failed.add(name)
                    failures.append((name, None, f"not started: {need} failed"))
                    print(f"[{total - len(pending) - len(running)}/{total}] {name}: not started, {need} failed")
                    continue
                if need in running or any(need == other for other, _ in pending):
                    continue  # waits for the job it needs; a later job may start instead
                pending.remove(job)
                log = open(log_dir / f"{name}.log", "a" if attempts[name] else "w")
                attempts[name] += 1
                actual = attempt_command(name, command, log_dir)
                process = subprocess.Popen([sys.executable, *actual[1:]], stdout=log, stderr=subprocess.STDOUT,
                                           cwd=ROOT, env=environment)
                running[name] = (process, log, time.time(), command)
                print(f"[started] {name}" + (" (resuming)" if "--resume" in actual else ""), flush=True)
            time.sleep(0.2)
            for name, (process, log, started, command) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[name]
                code = process.returncode
                if code != 0 and killed_by_the_system(code) and attempts[name] <= retries:
                    print(f"{name}: killed (exit {code}); attempt {attempts[name] + 1} of {retries + 1}", flush=True)
                    pending.insert(0, (name, command))
                    continue
                done = total - len(pending) - len(running)
                if code == 0:
                    print(f"[{done}/{total}] {name}: finished in {time.time() - started:.0f} s", flush=True)
                else:
                    error = last_error_line(log_dir / f"{name}.log")
                    failures.append((name, code, error))
                    failed.add(name)
                    print(f"[{done}/{total}] {name}: failed (exit {code})", flush=True)
    except KeyboardInterrupt:
        for process, log, _, _ in running.values():
            process.kill()
            log.close()
        print("interrupted: finished runs are kept, the same command resumes the rest", file=sys.stderr)
        return 130
    print(f"{total - len(failures)} of {total} run(s) finished in {time.time() - started_sweep:.0f} s")
    for name, code, error in failures:
        if code is None:
            print(f"failed: {name}: {error}")
        else:
            print(f"failed: {name} (exit {code}): {error}  [log: {log_dir / (name + '.log')}]")
    return 1 if failures else 0


def score(phase: Dict) -> Optional[float]:
    value = phase.get("final_normalized_score")
    return phase.get("final_return") if value is None else value


def mean_std(values: List[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def reference_columns(algorithm: str, key: str) -> tuple:
    base = algorithm.replace("_edis", "")
    corl = REFERENCE["corl"].get(base, {}).get(key)
    edis = REFERENCE["edis"].get(key) if algorithm.endswith("_edis") else None
    return (f"{corl[0]:.1f} → {corl[1]:.1f}" if corl else "-"), (f"{edis:.1f}" if edis is not None else "-")


def report(args: argparse.Namespace) -> None:
    results: Dict[tuple, Dict[str, List[float]]] = defaultdict(lambda: {"offline": [], "online": []})
    seeds_started: Dict[str, set] = defaultdict(set)  # per config: every seed any run of it was started with
    seeds_finished: Dict[tuple, set] = defaultdict(set)
    for run_dir in sorted(path for path in Path(args.log_dir).iterdir() if path.is_dir()):
        parsed = parse_run_name(run_dir.name)
        if parsed is None:
            continue
        algorithm, key, seed = parsed
        seeds_started[key].add(seed)
        if not (run_dir / "summary.json").is_file():
            continue
        seeds_finished[(key, algorithm)].add(seed)
        summary = json.loads((run_dir / "summary.json").read_text())
        for phase in ("offline", "online"):
            value = score(summary[phase])
            if value is not None:
                results[(key, algorithm)][phase].append(value)
    if not results:
        sys.exit(f"error: no finished runs (summary.json) under {args.log_dir}")
    header = ("| config | algorithm | seeds | measured offline | measured online | CORL offline → online "
              "| EDIS paper |\n|---|---|---|---|---|---|---|")
    rows = []
    for (key, algorithm), phases in sorted(results.items()):
        corl, edis = reference_columns(algorithm, key)
        missing = sorted(seeds_started[key] - seeds_finished[(key, algorithm)])
        seeds = str(len(seeds_finished[(key, algorithm)])) + (
            f" (missing: {', '.join(map(str, missing))})" if missing else "")
        rows.append(f"| {key} | {algorithm} | {seeds} | "
                    f"{mean_std(phases['offline'])} | {mean_std(phases['online'])} | {corl} | {edis} |")
    table = "\n".join([header, *rows])
    note = ("Scores: final D4RL-normalised score x 100 of each phase (raw return where the data has no "
            "reference returns), mean ± std over seeds. 'missing' lists seeds that some run of that config was "
            "started with but this algorithm has not finished.")
    print(table + "\n\n" + note)
    (Path(args.log_dir) / "report.md").write_text(table + "\n\n" + note + "\n")
    plot(results, Path(args.log_dir) / "report.png")
    print(f"\nwrote {Path(args.log_dir) / 'report.md'} and report.png")


def plot(results: Dict[tuple, Dict[str, List[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4))
    x = np.arange(len(keys))
    for offset, phase in ((-0.2, "offline"), (0.2, "online")):
        means = [np.mean(results[k][phase]) if results[k][phase] else np.nan for k in keys]
        stds = [np.std(results[k][phase]) if results[k][phase] else 0.0 for k in keys]
        ax.bar(x + offset, means, 0.4, yerr=stds, label=f"measured {phase}", capsize=3)
    for i, (key, algorithm) in enumerate(keys):
        corl = REFERENCE["corl"].get(algorithm.replace("_edis", ""), {}).get(key)
        edis = REFERENCE["edis"].get(key) if algorithm.endswith("_edis") else None
        for value, marker, label in ((corl[1] if corl else None, "k_", "CORL online"), (edis, "r*", "EDIS paper")):
            if value is not None:
                ax.plot(i + 0.2, value, marker, markersize=14, label=label)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xticks(x, [f"{key}\n{algorithm}" for key, algorithm in keys], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("final score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def curves(args: argparse.Namespace) -> None:
    """curves.png: mean evaluation score against step, one panel per config, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: Dict[str, Dict[str, List[Dict[int, float]]]] = defaultdict(lambda: defaultdict(list))
    boundary: Dict[str, int] = {}
    for metrics_path in sorted(Path(args.log_dir).glob("*/metrics.jsonl")):
        parsed = parse_run_name(metrics_path.parent.name)
        if parsed is None:
            continue
        algorithm, key, _ = parsed
        scores = {}
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            value = record.get("eval/normalized_score", record.get("eval/return"))
            if value is not None:
                scores[record["step"]] = value
                if record["phase"] == "offline":
                    boundary[key] = max(boundary.get(key, 0), record["step"])
        if scores:
            runs[key][algorithm].append(scores)
    if not runs:
        sys.exit(f"error: no evaluations (metrics.jsonl) under {args.log_dir}")
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.5), squeeze=False)
    for ax, (key, algorithms) in zip(axes[0], sorted(runs.items()), strict=True):
        for algorithm, seeds in sorted(algorithms.items()):
            steps = sorted(set.intersection(*(set(scores) for scores in seeds)))
            values = np.array([[scores[step] for step in steps] for scores in seeds])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, label=f"{algorithm} ({len(seeds)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        if key in boundary:
            ax.axvline(boundary[key], color="gray", linestyle="--", linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step (offline updates, then online steps)", fontsize=8)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("evaluation score")
    fig.tight_layout()
    path = Path(args.log_dir) / "curves.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands_parser = parser.add_subparsers(dest="command", required=True)
    run_parser = commands_parser.add_parser("run", help="run (or print) algorithms x configs x seeds")
    run_parser.add_argument("--algorithms", nargs="+", default=["iql", "calql", "iql_edis", "calql_edis"])
    run_parser.add_argument("--configs", nargs="+", default=["configs/local/hopper-random.yaml"])
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    run_parser.add_argument("--log-dir", default="runs/table")
    run_parser.add_argument("--threads-per-run", type=int, default=1,
                            help="torch/OpenMP threads of each run (OMP_NUM_THREADS)")
    run_parser.add_argument("--workers", type=int, default=None,
                            help="runs at a time (default: the machine's cores // --threads-per-run)")
    run_parser.add_argument("--retries", type=int, default=2,
                            help="attempts after a run is killed by a signal (it resumes from its snapshot)")
    run_parser.add_argument("--print-commands", action="store_true", help="print one command per run, run nothing")
    run_parser.add_argument("--slurm", metavar="FILE",
                            help="write a SLURM array script and its jobs file (FILE with suffix .jobs), run nothing")
    run_parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: options passed to every run")
    report_parser = commands_parser.add_parser("report", help="table and plot of finished runs")
    report_parser.add_argument("--log-dir", default="runs/table")
    curves_parser = commands_parser.add_parser("curves", help="evaluation score over training, per config")
    curves_parser.add_argument("--log-dir", default="runs/table")
    args = parser.parse_args()
    if args.command == "run":
        args.extra = [a for a in args.extra if a != "--"]
        if args.threads_per_run < 1 or (args.workers is not None and args.workers < 1):
            sys.exit("error: --workers and --threads-per-run must be at least 1")
        if args.workers is None:
            args.workers = max(1, (os.cpu_count() or 1) // args.threads_per_run)
        return run(args)
    if args.command == "report":
        report(args)
    else:
        curves(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
