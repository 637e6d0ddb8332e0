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

To use a shared machine for something else without spoiling the runs' wall-clocks, stop them and
later continue them (Linux); each pause is logged to log_dir/pauses.log, which speed.py reads:

    python benchmarks/table.py pause --log-dir runs/table       # SIGSTOP every run writing under runs/table
    python benchmarks/table.py continue --log-dir runs/table

CPU scale (data made on this machine by benchmarks/collect.py): --configs configs/cpu/*.yaml.
Full-scale configs (1M updates) are GPU work: about 2 h (IQL) to a day (Cal-QL) per run on one GPU.
Anything after `--` is passed to every run, e.g. `-- --device cuda --wandb_mode online`.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((Path(__file__).with_name("reference_scores.json")).read_text())


def cpu_description() -> Dict[str, str]:
    """This machine's CPU: its model name and, since a virtual machine's name ("AMD EPYC") can hide the generation,
    its family, model and stepping (one-thread runs repeat exactly only on the same kind of CPU)."""
    info: Dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_id": " ".join(f"{key} {info[key]}" for key in ("cpu family", "model", "stepping") if key in info)}


def config_key(path: str) -> str:
    """configs/adroit/pen-cloned.yaml -> adroit/pen-cloned."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(ROOT / "configs").with_suffix(""))
    except ValueError:
        return resolved.stem


def run_name(algorithm: str, key: str, seed: int) -> str:
    return f"{algorithm}--{key.replace('/', '__')}--seed{seed}"


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
                           "--threads", str(args.threads_per_run), "--name", name, "--log_dir", args.log_dir,
                           *args.extra]
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
    return (run_dir / "snapshot.pt").is_file()


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
             needs: Optional[Dict[str, str]] = None, retries: int = 2,
             check: Optional[Callable[[str], Optional[str]]] = None) -> int:
    """Runs (name, command) jobs, `workers` at a time; a job whose log_dir/name/summary.json exists is skipped.

    A run that died in an earlier sweep resumes from its snapshot (`--resume`), or starts over where it left
    none. A run killed by a signal is tried again, resuming, up to `retries` times; a run that fails by its
    own error is not. `needs` maps a job to the job it waits for (a fine-tuning run on its pretraining
    run): it starts as soon as that one has finished, and fails without starting if that one failed.
    `check(name)` runs after a job exits 0 and before any job that needs it starts: an error it returns
    fails the job (so nothing that needs it starts).
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
                problem = check(name) if code == 0 and check is not None else None
                if code == 0 and problem is None:
                    print(f"[{done}/{total}] {name}: finished in {time.time() - started:.0f} s", flush=True)
                else:
                    error = problem or last_error_line(log_dir / f"{name}.log")
                    failures.append((name, code, error))
                    failed.add(name)
                    outcome = f"finished, but {problem}" if problem else f"failed (exit {code})"
                    print(f"[{done}/{total}] {name}: {outcome}", flush=True)
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


# ---------------------------------------------------------------------------------------------
# Report and curves: what the runs wrote, identified by their summary.json
# ---------------------------------------------------------------------------------------------
def runs_writing_under(log_dir: Path) -> Dict[int, str]:
    """Process id -> run name of every algorithm run (Linux /proc) whose run folder lies in log_dir:
    `--log_dir L --name N` or `--resume L/N` on its command line, relative paths read from its cwd."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:  # gone, or not ours to read
            continue
        if len(argv) < 2 or not (argv[1].startswith("algorithms/") or "/algorithms/" in argv[1]):
            continue
        options = dict(zip(argv[2:], argv[3:], strict=False))  # each argument -> the one after it
        if "--resume" in options:
            run_dir = cwd / options["--resume"]
        elif "--log_dir" in options and "--name" in options:
            run_dir = cwd / options["--log_dir"] / options["--name"]
        else:
            continue
        if run_dir.resolve().parent == log_dir.resolve():
            found[int(proc.name)] = run_dir.name
    return found


def pause(args: argparse.Namespace) -> int:
    """Stop (or continue) the runs writing under --log-dir, and log the time and their names to pauses.log."""
    log_dir, stop = Path(args.log_dir), args.command == "pause"
    if not log_dir.is_dir():
        sys.exit(f"error: --log-dir {log_dir} is not a folder")
    runs = runs_writing_under(log_dir)
    for pid in runs:
        os.kill(pid, signal.SIGSTOP if stop else signal.SIGCONT)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(log_dir / "pauses.log", "a") as log:
        log.write(f"{stamp} {'stop' if stop else 'cont'} {' '.join(sorted(runs.values()))}\n")
    print(f"{'stopped' if stop else 'continued'} {len(runs)} run(s): {', '.join(sorted(runs.values())) or '-'}")
    return 0


def published(algorithm: str, dataset: str) -> Dict[str, Optional[float]]:
    """The published numbers for a run, the one place they are looked up: CORL's base algorithm offline and
    online, the EDIS paper's after fine-tuning (EDIS algorithms only). Keys are D4RL dataset names."""
    name = dataset.removeprefix("d4rl:") if dataset.startswith("d4rl:") else None
    corl = REFERENCE["corl"].get(algorithm.removesuffix("_edis"), {}).get(name) if name else None
    edis = REFERENCE["edis"].get(name) if name and algorithm.endswith("_edis") else None
    return {"corl_offline": corl[0] if corl else None, "corl_online": corl[1] if corl else None, "edis": edis}


def read_runs(log_dir: Path) -> tuple:
    """Finished runs keyed by their summary's (algorithm, dataset, seed), and (folder, reason) for the others.

    Each run holds its summary and its evaluations [(step, phase, score)] of its summary's score metric.
    """
    if not log_dir.is_dir():
        sys.exit(f"error: {log_dir} is not a folder of runs: make it with `python benchmarks/table.py run "
                 f"--log-dir {log_dir}`, or give the --log-dir a sweep wrote to")
    runs: Dict[tuple, Dict] = {}
    skipped: List[tuple] = []
    for folder in sorted(path for path in log_dir.iterdir() if path.is_dir()):
        try:
            summary = json.loads((folder / "summary.json").read_text())
            identity = (summary["algorithm"], summary["dataset"], int(summary["seed"]))
        except FileNotFoundError:
            skipped.append((folder.name, "no summary.json (unfinished, failed, or not a run)"))
            continue
        except (ValueError, KeyError, TypeError) as error:
            skipped.append((folder.name, f"summary.json unreadable or without algorithm/dataset/seed ({error!r})"))
            continue
        if identity in runs:
            skipped.append((folder.name, f"same algorithm, dataset and seed as {runs[identity]['folder']}"))
            continue
        metric = summary.get("score_metric", "eval/normalized_score")
        evaluations = []
        if (folder / "metrics.jsonl").is_file():
            for line in (folder / "metrics.jsonl").read_text().splitlines():
                record = json.loads(line)
                if metric in record:
                    evaluations.append((record["step"], record.get("phase", "online"), record[metric]))
        runs[identity] = {"folder": folder.name, "summary": summary, "evaluations": evaluations,
                          "raw_returns": metric == "eval/return"}
    return runs, skipped


def final_score(phase: Dict) -> Optional[float]:
    value = phase.get("final_normalized_score")
    return phase.get("final_return") if value is None else value


def best_score(phase: Dict) -> Optional[float]:
    value = phase.get("best_normalized_score")
    return phase.get("best_return") if value is None else value


def mean_std(values: List[float]) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(args: argparse.Namespace) -> None:
    log_dir = Path(args.log_dir)
    runs, skipped = read_runs(log_dir)
    for folder, reason in skipped:
        print(f"skipped {folder}: {reason}")
    if not runs:
        sys.exit(f"error: no finished runs (summary.json) under {log_dir}")
    groups: Dict[tuple, List[Dict]] = defaultdict(list)
    seeds_of_dataset: Dict[str, set] = defaultdict(set)  # every seed any algorithm finished on that dataset
    for (algorithm, dataset, seed), run in sorted(runs.items()):
        groups[(dataset, algorithm)].append(dict(run, seed=seed))
        seeds_of_dataset[dataset].add(seed)
    k = args.last
    header = (f"| dataset | algorithm | seeds | offline final | online final | online best | online mean of last {k} "
              "| CORL offline → online | EDIS paper |\n|---|---|---|---|---|---|---|---|---|")
    rows, results = [], {}
    for (dataset, algorithm), group in sorted(groups.items()):
        offline = [final_score(run["summary"]["offline"]) for run in group]
        online = [final_score(run["summary"]["online"]) for run in group]
        best = [best_score(run["summary"]["online"]) for run in group]
        last = [float(np.mean(scores[-k:])) if scores else None
                for scores in ([s for _, phase, s in run["evaluations"] if phase == "online"] for run in group)]
        missing = sorted(seeds_of_dataset[dataset] - {run["seed"] for run in group})
        seeds = f"{len(group)}" + (f" (missing: {', '.join(map(str, missing))})" if missing else "")
        reference = published(algorithm, dataset)
        corl = (f"{reference['corl_offline']:.1f} → {reference['corl_online']:.1f}"
                if reference["corl_online"] is not None else "-")
        label = dataset + (" (raw return)" if any(run["raw_returns"] for run in group) else "")
        rows.append(f"| {label} | {algorithm} | {seeds} | {mean_std(offline)} | {mean_std(online)} | "
                    f"{mean_std(best)} | {mean_std(last)} | {corl} | {number(reference['edis'])} |")
        results[(dataset, algorithm)] = {"offline": [v for v in offline if v is not None],
                                         "online": [v for v in online if v is not None], **reference}
    table = "\n".join([header, *rows])
    note = (f"Scores: D4RL-normalised score x 100 (rows marked (raw return): the data has no reference returns), "
            f"mean ± std over seeds. Final: the last evaluation of each phase; best: the best online evaluation; "
            f"last {k}: the mean of the last {k} online evaluations. 'missing' lists seeds that another algorithm "
            f"finished on that dataset but this one has not. Runs are identified by their summary.json.")
    print(table + "\n\n" + note)
    (log_dir / "report.md").write_text(table + "\n\n" + note + "\n")
    plot(results, log_dir / "report.png")
    print(f"\nwrote {log_dir / 'report.md'} and report.png")


def plot(results: Dict[tuple, Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4))
    x = np.arange(len(keys))
    for offset, phase in ((-0.2, "offline"), (0.2, "online")):
        means = [np.mean(results[key][phase]) if results[key][phase] else np.nan for key in keys]
        stds = [np.std(results[key][phase]) if results[key][phase] else 0.0 for key in keys]
        ax.bar(x + offset, means, 0.4, yerr=stds, label=f"measured {phase}", capsize=3)
    for i, key in enumerate(keys):
        for name, marker, label in (("corl_online", "k_", "CORL online"), ("edis", "r*", "EDIS paper")):
            if results[key][name] is not None:
                ax.plot(i + 0.2, results[key][name], marker, markersize=14, label=label)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xticks(x, [f"{dataset}\n{algorithm}" for dataset, algorithm in keys], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("final score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def mean_curves(runs: Dict[tuple, Dict]) -> Dict[str, Dict[str, Dict]]:
    """Per dataset and algorithm: every step any seed evaluated at, the mean and std over the seeds that have
    that step, the number of seeds, and the last offline step (where fine-tuning starts)."""
    grouped: Dict[str, Dict[str, List]] = defaultdict(lambda: defaultdict(list))
    for (algorithm, dataset, _), run in sorted(runs.items()):
        if run["evaluations"]:
            grouped[dataset][algorithm].append(run["evaluations"])
    result: Dict[str, Dict[str, Dict]] = defaultdict(dict)
    for dataset, algorithms in grouped.items():
        for algorithm, seeds in algorithms.items():
            by_step: Dict[int, List[float]] = defaultdict(list)
            for evaluations in seeds:
                for step, _, value in evaluations:
                    by_step[step].append(value)
            offline_steps = [step for evaluations in seeds for step, phase, _ in evaluations if phase == "offline"]
            steps = sorted(by_step)
            result[dataset][algorithm] = {"steps": steps, "mean": [float(np.mean(by_step[s])) for s in steps],
                                          "std": [float(np.std(by_step[s])) for s in steps], "seeds": len(seeds),
                                          "boundary": max(offline_steps) if offline_steps else None}
    return result


def curves(args: argparse.Namespace) -> None:
    """curves.png: evaluation score against step, one panel per dataset, one line (± std band) per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_dir = Path(args.log_dir)
    runs, skipped = read_runs(log_dir)
    for folder, reason in skipped:
        print(f"skipped {folder}: {reason}")
    panels = mean_curves(runs)
    if not panels:
        sys.exit(f"error: no evaluations in finished runs under {log_dir}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (dataset, algorithms) in zip(axes[0], sorted(panels.items()), strict=True):
        for algorithm, curve in sorted(algorithms.items()):
            mean, std = np.array(curve["mean"]), np.array(curve["std"])
            ax.plot(curve["steps"], mean, label=f"{algorithm} ({curve['seeds']} seeds)")
            ax.fill_between(curve["steps"], mean - std, mean + std, alpha=0.2)
        boundaries = [curve["boundary"] for curve in algorithms.values() if curve["boundary"] is not None]
        if boundaries:
            ax.axvline(max(boundaries), color="gray", linestyle="--", linewidth=1)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("step (offline updates, then online steps)", fontsize=8)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("evaluation score")
    fig.tight_layout()
    path = log_dir / "curves.png"
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
                            help="torch threads of each run (its --threads, and OMP_NUM_THREADS)")
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
    report_parser.add_argument("--last", type=int, default=3, help="online evaluations averaged in 'mean of last k'")
    curves_parser = commands_parser.add_parser("curves", help="evaluation score over training, per config")
    curves_parser.add_argument("--log-dir", default="runs/table")
    for command, verb in (("pause", "stop (SIGSTOP)"), ("continue", "continue (SIGCONT)")):
        pause_parser = commands_parser.add_parser(command, help=f"{verb} the runs writing under --log-dir; "
                                                                 "logged to its pauses.log")
        pause_parser.add_argument("--log-dir", default="runs/table")
    args = parser.parse_args()
    if args.command == "run":
        args.extra = [a for a in args.extra if a != "--"]
        if args.threads_per_run < 1 or (args.workers is not None and args.workers < 1):
            sys.exit("error: --workers and --threads-per-run must be at least 1")
        if args.workers is None:
            args.workers = max(1, (os.cpu_count() or 1) // args.threads_per_run)
        return run(args)
    if args.command in ("pause", "continue"):
        return pause(args)
    if args.command == "report":
        report(args)
    else:
        curves(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
