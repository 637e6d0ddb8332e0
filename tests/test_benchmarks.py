"""Benchmark scripts: the table report reads finished runs; the speed script prints its table."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from conftest import ROOT, write_pendulum_dataset

TABLE = ROOT / "benchmarks" / "table.py"


def tiny_config(tmp_path: Path, name: str, dataset: str, offline_iterations: int = 1500) -> Path:
    """A config of a few seconds of IQL on data the test makes (offline only, one evaluation episode)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"dataset: {dataset}\noffline_iterations: {offline_iterations}\nonline_iterations: 0\n"
                    "eval_freq: 100000\nn_episodes: 1\nbatch_size: 128\ndevice: cpu\nwandb_mode: disabled\n")
    return path


def table_run(*args: str) -> tuple:
    started = time.time()
    result = subprocess.run([sys.executable, str(TABLE), "run", "--algorithms", "iql", *args], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    return result, time.time() - started


def write_run(folder: Path, algorithm: str, dataset: str, seed: int, online_scores: List[float],
              offline: float = 50.0, metric: str = "eval/normalized_score") -> None:
    """A finished run as the algorithm files leave it: summary.json and the evaluations in metrics.jsonl."""
    folder.mkdir()
    records = [{"step": 10, "phase": "offline", metric: offline}]
    records += [{"step": 10 + 5 * (i + 1), "phase": "online", metric: s} for i, s in enumerate(online_scores)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    key = "normalized_score" if metric == "eval/normalized_score" else "return"
    (folder / "summary.json").write_text(json.dumps({
        "algorithm": algorithm, "dataset": dataset, "seed": seed, "score_metric": metric,
        "offline": {f"final_{key}": offline}, "online": {f"final_{key}": online_scores[-1],
                                                         f"best_{key}": max(online_scores)}}))


def table_report(log_dir: Path) -> str:
    result = subprocess.run([sys.executable, str(TABLE), "report", "--log-dir", str(log_dir), "--last", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_table_report_reads_runs_by_their_summary_and_puts_published_numbers_beside(tmp_path):
    # Folder names say nothing: the summary identifies the run.
    write_run(tmp_path / "a", "iql", "d4rl:pen-cloned-v1", 0, [60.0, 100.0, 80.0], offline=80.0)
    write_run(tmp_path / "b", "iql", "d4rl:pen-cloned-v1", 1, [70.0, 90.0, 130.0], offline=90.0)
    write_run(tmp_path / "c", "iql", "random:Hopper-v5:100", 0, [5.0, 7.0], metric="eval/return")
    write_run(tmp_path / "d", "calql", "d4rl:pen-cloned-v1", 1, [1.0, 2.0])
    (tmp_path / "e").mkdir()  # a run that never finished
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "summary.json").write_text("{}")
    write_run(tmp_path / "g", "iql", "d4rl:pen-cloned-v1", 1, [0.0])  # the same run twice
    out = table_report(tmp_path)
    # final 80/130, best 100/130, mean of the last 2: 90/110; CORL's IQL on pen-cloned: 84.19 -> 102.02.
    assert ("| d4rl:pen-cloned-v1 | iql | 2 | 85.0 ± 5.0 | 105.0 ± 25.0 | 115.0 ± 15.0 | 100.0 ± 10.0 "
            "| 84.2 → 102.0 | - |") in out
    assert "| d4rl:pen-cloned-v1 | calql | 1 (missing: 0) | 50.0 | 2.0 | 2.0 | 1.5 |" in out
    assert "| random:Hopper-v5:100 (raw return) | iql | 1 |" in out
    assert "skipped e: no summary.json" in out and "skipped f: summary.json unreadable" in out
    assert "skipped g: same algorithm, dataset and seed as b" in out
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.png").stat().st_size > 0


def test_published_numbers_are_looked_up_by_dataset_in_one_place():
    table = load_table()
    assert table.published("iql_edis", "d4rl:hopper-medium-replay-v2")["edis"] == 103.5
    assert table.published("iql", "d4rl:hopper-medium-replay-v2")["edis"] is None
    assert table.published("calql_edis", "d4rl:antmaze-umaze-v2")["corl_online"] is not None
    assert table.published("iql", "collected:Hopper-v5:medium") == {"corl_offline": None, "corl_online": None,
                                                                     "edis": None}


def test_table_prints_one_command_per_run():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table.py"), "run", "--configs",
                             "configs/adroit/pen-cloned.yaml", "--seeds", "0", "1", "--print-commands", "--",
                             "--device", "cuda"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 8  # 4 algorithms x 2 seeds
    assert lines[0] == ("python algorithms/iql.py --config configs/adroit/pen-cloned.yaml --seed 0 "
                        "--threads 1 --name iql--adroit__pen-cloned--seed0 --log_dir runs/table --device cuda")


@pytest.mark.slow
def test_speed_costs_and_report_give_every_file_the_refresh_split_and_ratios(tmp_path):
    speed = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--results", str(tmp_path)]
    result = subprocess.run([*speed, "costs", "--sizes", "Hopper", "--updates", "2", "--repeats", "1", "--rows", "64",
                             "--fit-steps", "1", "--episodes", "3", "--denoiser", "32x1", "--name", "test"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    costs = json.loads((tmp_path / "speed-costs-test.json").read_text())["sizes"]["Hopper"]
    assert set(costs["updates"]) == {"iql", "calql", "iql_edis", "calql_edis"}
    assert all(rate > 0 for rates in costs["updates"].values() for rate in rates.values())
    for precision in ("fp32", "bf16"):
        model = costs[precision]["refresh_s"]
        assert set(model["reference"]) == set(model["ours"]) == {"diffusion training", "energy training",
                                                                 "negative sampling", "guided sampling"}
        assert all(value > 0 for setting in model.values() for value in setting.values())
    assert set(costs["evaluation_s"]) == {"1", "10", "3"}
    result = subprocess.run([*speed, "estimate", "--costs", str(tmp_path / "speed-costs-test.json"), "--name", "test"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    estimate = json.loads((tmp_path / "speed-estimate-test.json").read_text())["estimate"]
    # Counts x measured costs: 1M offline IQL-EDIS updates at the measured rate; 20 refreshes of each setting.
    hours = estimate["iql_edis"]["settings"]["ours"]
    assert hours["offline updates"] == pytest.approx(1_000_000 / costs["updates"]["iql_edis"]["offline"] / 3600)
    per_refresh = costs["fp32"]["refresh_s"]["reference"]
    assert estimate["iql_edis"]["settings"]["reference"]["refresh: guided sampling"] == pytest.approx(
        20 * per_refresh["guided sampling"] / 3600)
    fit_step = costs["fp32"]["per_call"]["fit_step"]
    assert estimate["calql_edis"]["settings"]["reference"]["refresh: diffusion training"] == pytest.approx(
        20 * 10_000 * fit_step / 3600)
    assert hours["refresh: diffusion training"] == pytest.approx((20 * 10_000 + 30_000) * fit_step / 3600)
    result = subprocess.run([*speed, "report"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "speed.md").read_text()
    assert report.index("## Ratios") < report.index("## Costs")
    assert "reference settings / ours" in report and "one env at a time / vector env" in report
    assert "## A paper-scale run, estimated (speed-estimate-test.json)" in report
    header = next(line for line in report.splitlines() if line.startswith("| sizes | file |"))
    assert len(header.split("|")) == len(set(header.split("|"))) + 1  # no column twice (the outer '' pair)


def test_refresh_cost_model_counts_the_calls_of_each_setting():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    config = speed.load("iql_edis").EDISConfig(sample_steps=32, refresh_fit_steps=1000, num_samples=100,
                                               negative_pool=10, transition_pool=20, energy_epochs=2,
                                               positive_buffer_size=512, energy_batch_size=256, energy_negatives=10)
    unit = {"fit_step": 1.0, "denoise_row": 1.0, "guidance_joint_row": 1.0, "guidance_separate_row": 3.0,
            "energy_update": 1.0}
    model = speed.refresh_model(unit, config)
    assert model["ours"] == {"diffusion training": 1000, "energy training": 3 * 2 * 2,
                             "negative sampling": 30 * 63, "guided sampling": 100 * 63 * 2}
    reference = model["reference"]
    assert reference["diffusion training"] == 30_000 and reference["energy training"] == 3 * 20
    assert reference["negative sampling"] == 3 * 20 * 2560 * 128  # (255 + 1) / 2 calls per fresh negative
    assert reference["guided sampling"] == 100_000 * 255 * 4


def load_table():
    spec = importlib.util.spec_from_file_location("table", TABLE)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table


def test_table_curves_use_every_step_any_seed_has(tmp_path):
    write_run(tmp_path / "a", "iql_edis", "d4rl:hopper-medium-v2", 0, [1.0, 2.0, 3.0])
    write_run(tmp_path / "b", "iql_edis", "d4rl:hopper-medium-v2", 1, [3.0], offline=40.0)  # fewer evaluations
    runs, _ = load_table().read_runs(tmp_path)
    curve = load_table().mean_curves(runs)["d4rl:hopper-medium-v2"]["iql_edis"]
    assert curve["steps"] == [10, 15, 20, 25] and curve["seeds"] == 2 and curve["boundary"] == 10
    assert curve["mean"] == [45.0, 2.0, 2.0, 3.0] and curve["std"] == [5.0, 1.0, 0.0, 0.0]  # 20, 25: seed 0 alone
    result = subprocess.run([sys.executable, str(TABLE), "curves", "--log-dir", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curves.png").stat().st_size > 0


def side_by_side_ratio() -> float:
    """Wall-clock of two fixed CPU-bound processes run together over the same two run in turn, here and now."""
    work = [sys.executable, "-c", "sum(i * i for i in range(6_000_000))"]
    started = time.time()
    for _ in range(2):
        subprocess.run(work, check=True)
    serial = time.time() - started
    started = time.time()
    processes = [subprocess.Popen(work) for _ in range(2)]
    for process in processes:
        process.wait()
    return (time.time() - started) / serial


@pytest.mark.slow
def test_table_workers_run_side_by_side(tmp_path):
    """Two runs with --workers 2 take clearly less wall-clock than the same two runs one after the other."""
    ratio = side_by_side_ratio()
    if ratio > 0.7:  # e.g. another job holds a core: the runner cannot be judged
        pytest.skip(f"this machine has no two free cores now (two busy processes side by side: {ratio:.2f} of serial)")
    data = tmp_path / "pendulum.hdf5"
    write_pendulum_dataset(data, episodes=20)
    config = tiny_config(tmp_path, "tiny", f"hdf5:{data}", offline_iterations=450)
    serial, serial_seconds = table_run("--configs", str(config), "--seeds", "0", "1", "--workers", "1",
                                       "--log-dir", str(tmp_path / "serial"))
    parallel, parallel_seconds = table_run("--configs", str(config), "--seeds", "0", "1", "--workers", "2",
                                           "--log-dir", str(tmp_path / "parallel"))
    assert serial.returncode == 0 and parallel.returncode == 0, serial.stdout + parallel.stdout
    for log_dir in ("serial", "parallel"):
        assert len(list((tmp_path / log_dir).glob("*/summary.json"))) == 2
    assert parallel_seconds < 0.8 * serial_seconds, (serial_seconds, parallel_seconds)
    again, _ = table_run("--configs", str(config), "--seeds", "0", "1", "--log-dir", str(tmp_path / "parallel"))
    assert again.stdout.count("done before, skipped") == 2


@pytest.mark.slow
def test_table_run_reports_a_failing_run_and_goes_on(tmp_path):
    data = tmp_path / "pendulum.hdf5"
    write_pendulum_dataset(data, episodes=10)
    broken = tiny_config(tmp_path, "broken", f"hdf5:{tmp_path / 'missing.hdf5'}")
    working = tiny_config(tmp_path, "working", f"hdf5:{data}", offline_iterations=200)
    result, _ = table_run("--configs", str(broken), str(working), "--seeds", "0", "--workers", "1",
                          "--log-dir", str(tmp_path / "runs"))
    assert result.returncode == 1
    assert (tmp_path / "runs" / "iql--working--seed0" / "summary.json").is_file()
    failed = [line for line in result.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith("failed: iql--broken--seed0 (exit 2): error: dataset file not "
                                                     f"found: {tmp_path / 'missing.hdf5'}")
    assert result.stdout.splitlines()[-1] == failed[0]  # reported at the end, after the run that went on


def test_slurm_script_runs_line_of_its_array_task(tmp_path):
    """Runs the written script with bash, a stand-in `python` on PATH recording what it was asked to run."""
    printed = subprocess.run([sys.executable, str(TABLE), "run", "--configs", "configs/adroit/pen-cloned.yaml",
                              "--seeds", "0", "1", "--print-commands", "--threads-per-run", "4"], capture_output=True,
                             text=True, cwd=ROOT)
    expected = printed.stdout.strip().splitlines()
    assert all("--threads 4" in line for line in expected)  # each run's own torch threads
    script = tmp_path / "jobs.sbatch"
    subprocess.run([sys.executable, str(TABLE), "run", "--configs", "configs/adroit/pen-cloned.yaml", "--seeds", "0",
                    "1", "--slurm", str(script), "--threads-per-run", "4"], check=True, capture_output=True, cwd=ROOT)
    text = script.read_text()
    assert f"#SBATCH --array=1-{len(expected)}" in text and "#SBATCH --cpus-per-task=4" in text
    assert (tmp_path / "jobs.jobs").read_text().splitlines() == expected
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text(f'#!/bin/sh\necho "python $*" > {tmp_path / "ran.txt"}\n'
                                     f'echo "$OMP_NUM_THREADS" >> {tmp_path / "ran.txt"}\n')
    (fake_bin / "python").chmod(0o755)
    for task in (1, len(expected)):
        environment = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task), PATH=f"{fake_bin}:{os.environ['PATH']}")
        subprocess.run(["bash", str(script)], check=True, env=environment)
        ran = (tmp_path / "ran.txt").read_text().splitlines()
        assert shlex.split(ran[0]) == shlex.split(expected[task - 1]) and ran[1] == "4"


@pytest.mark.slow
def test_a_run_that_died_starts_over_without_its_partial_logs(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from table import run_jobs

    stale = tmp_path / "job"
    stale.mkdir()
    (stale / "metrics.jsonl").write_text('{"step": 1, "stale": true}\n')
    write = f"import pathlib; pathlib.Path({str(stale)!r}).mkdir(exist_ok=True); " \
            f"(pathlib.Path({str(stale)!r}) / 'summary.json').write_text('{{}}')"
    assert run_jobs([("job", ["python", "-c", write])], tmp_path, workers=1, threads_per_run=1) == 0
    assert (stale / "summary.json").is_file() and not (stale / "metrics.jsonl").exists()
    # Finished now: a second sweep skips it.
    assert run_jobs([("job", ["python", "-c", "raise SystemExit(3)"])], tmp_path, workers=1, threads_per_run=1) == 0


@pytest.mark.slow
def test_a_job_waits_for_the_job_it_needs_and_is_not_started_when_that_failed(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from table import run_jobs

    order = tmp_path / "order.txt"

    def job(name: str, code: int = 0, seconds: float = 0.0) -> tuple:
        script = (f"import time, pathlib; time.sleep({seconds}); "
                  f"open({str(order)!r}, 'a').write({name!r} + '\\n'); "
                  f"pathlib.Path({str(tmp_path / name)!r}).mkdir(); "
                  f"(pathlib.Path({str(tmp_path / name)!r}) / 'summary.json').write_text('{{}}'); "
                  f"raise SystemExit({code})")
        return name, ["python", "-c", script]

    jobs = [job("pretrain", seconds=1.0), job("finetune"), job("broken", code=2), job("after_broken"),
            job("independent")]
    needs = {"finetune": "pretrain", "after_broken": "broken"}
    assert run_jobs(jobs, tmp_path, workers=2, threads_per_run=1, needs=needs) == 1
    ran = order.read_text().split()
    # "finetune" waited for "pretrain" while the jobs after it went ahead; "after_broken" never ran.
    assert ran.index("finetune") > ran.index("pretrain") and "after_broken" not in ran
    assert sorted(ran) == ["broken", "finetune", "independent", "pretrain"]


@pytest.mark.slow
def test_a_run_killed_by_the_system_is_tried_again_and_a_failing_one_is_not(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from table import run_jobs

    marker, attempts = tmp_path / "killed_once", tmp_path / "attempts.txt"
    dies_once = (f"import os, pathlib, signal; open({str(attempts)!r}, 'a').write('x'); "
                 f"m = pathlib.Path({str(marker)!r})\n"
                 "if not m.exists(): m.touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
                 f"pathlib.Path({str(tmp_path / 'once')!r}).mkdir(); "
                 f"(pathlib.Path({str(tmp_path / 'once')!r}) / 'summary.json').write_text('{{}}')")
    failing = f"open({str(tmp_path / 'failing.txt')!r}, 'a').write('x'); raise SystemExit(3)"
    code = run_jobs([("once", ["python", "-c", dies_once]), ("failing", ["python", "-c", failing])], tmp_path,
                    workers=1, threads_per_run=1, retries=2)
    assert code == 1  # the failing run fails the sweep
    assert attempts.read_text() == "xx" and (tmp_path / "once" / "summary.json").is_file()
    assert (tmp_path / "failing.txt").read_text() == "x"  # its own error: not retried


def test_a_dead_run_with_a_snapshot_is_resumed_not_restarted(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from table import attempt_command

    command = ["python", "algorithms/iql.py", "--config", "c.yaml", "--name", "run", "--log_dir", str(tmp_path)]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "snapshot.pt").write_bytes(b"x")
    assert attempt_command("run", command, tmp_path) == ["python", "algorithms/iql.py", "--resume",
                                                         str(tmp_path / "run")]
    (tmp_path / "run" / "snapshot.pt").unlink()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}")
    assert attempt_command("run", command, tmp_path) == command and not (tmp_path / "run").exists()


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="pause finds runs through Linux /proc")
def test_pause_stops_only_the_runs_of_its_log_dir_and_logs_them(tmp_path):
    (tmp_path / "algorithms").mkdir()
    (tmp_path / "algorithms" / "sleeper.py").write_text("import time\nwhile True:\n    time.sleep(0.05)\n")
    (tmp_path / "runs").mkdir()
    started = [subprocess.Popen([sys.executable, "algorithms/sleeper.py", *options], cwd=tmp_path) for options in
               (["--log_dir", "runs", "--name", "a"], ["--resume", str(tmp_path / "runs" / "b")],
                ["--log_dir", "elsewhere", "--name", "c"])]
    table = [sys.executable, str(TABLE)]
    try:
        time.sleep(0.5)
        stop = subprocess.run([*table, "pause", "--log-dir", str(tmp_path / "runs")], capture_output=True, text=True)
        assert stop.returncode == 0 and "stopped 2 run(s): a, b" in stop.stdout, stop.stdout + stop.stderr
        time.sleep(0.2)
        states = [process_state(process.pid) for process in started]
        # The run of another log dir is not stopped: sleeping or, caught between two sleeps, running.
        assert states[:2] == ["T", "T"] and states[2] in ("S", "R"), states
        subprocess.run([*table, "continue", "--log-dir", str(tmp_path / "runs")], check=True, capture_output=True)
        time.sleep(0.2)
        assert "T" not in [process_state(process.pid) for process in started]
    finally:
        for process in started:
            process.kill()
            process.wait()
    lines = (tmp_path / "runs" / "pauses.log").read_text().splitlines()
    assert [line.split()[1:] for line in lines] == [["stop", "a", "b"], ["cont", "a", "b"]]


def test_online_ratios_take_stopped_time_off_and_leave_resumed_runs_out(tmp_path):
    """Pauses count only inside a run's last attempt (config.yaml .. summary.json); resumed runs are left out."""
    def finished_run(name: str, start: float, end: float, wall: float, resumed: bool = False) -> None:
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("online_iterations: 20000\n")
        (run_dir / "summary.json").write_text(json.dumps({"online": {"wall_clock_s": wall},
                                                          "machine": {"torch_threads": 1}}))
        os.utime(run_dir / "config.yaml", (start, start))
        os.utime(run_dir / "summary.json", (end, end))
        (tmp_path / f"{name}.log").write_text("resumed here at step 5\n" if resumed else "")

    day = 1_800_000_000  # 2027-01-15T08:00:00Z
    finished_run("iql--k--seed0", day, day + 1_000, 1_000)
    finished_run("iql_edis--k--seed0", day, day + 2_600, 2_600)
    finished_run("iql--k--seed1", day, day + 1_000, 1_000)
    finished_run("iql_edis--k--seed1", day, day + 1_500, 1_500, resumed=True)

    def stamp(seconds: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(day + seconds))

    (tmp_path / "pauses.log").write_text(
        f"{stamp(-500)} stop iql--k--seed0\n{stamp(-100)} cont iql--k--seed0\n"  # before its start: not counted
        f"{stamp(1_000)} stop iql_edis--k--seed0 other\n{stamp(1_400)} cont iql_edis--k--seed0 other\n"
        f"{stamp(2_500)} stop iql_edis--k--seed0\n{stamp(2_800)} cont iql_edis--k--seed0\n")  # 100 s inside
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--results", str(tmp_path),
                             "online", "--log-dir", str(tmp_path), "--name", "short", "--note", "Timing runs."],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    online = json.loads((tmp_path / "speed-online-short.json").read_text())
    assert online["pairs"] == {"iql_edis / iql (k)": [{
        "seed": "seed0", "variant_s": 2_100.0, "base_s": 1_000.0, "ratio": 2.1, "online_steps": 20_000,
        "threads": {"variant": 1, "base": 1}, "paused_s": {"variant": 500.0, "base": 0}}]}
    assert online["left_out"] == ["iql_edis / iql (k) seed1: resumed from a snapshot"]
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--results", str(tmp_path),
                             "report"], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "speed.md").read_text()
    assert "torch threads per run, as the runs recorded them: 1" in text
    assert "stopped (`table.py pause`). Ratio: median over seeds of the per-seed ratio. Timing runs." in text
    assert "| iql_edis / iql (k) | 1 | 20,000 | 2,100 | 1,000 | 2.10 | 2.10 |\n\n- left out: iql_edis / iql (k) seed1" \
        in text
    assert "- Online phase, iql_edis / iql (k): **2.10x** its base (median of 1 seed(s), 20,000 online steps; " \
        "speed-online-short.json)" in text


def test_speed_report_plots_fidelity_against_sampler_steps(tmp_path):
    def metrics(value: float) -> dict:
        return {key: [value, 0.1 * value] for key in ("state_mmd", "policy_loglik", "dynamics_state_mse",
                                                     "dynamics_reward_mae")}

    settings = {f"ours, {steps} steps": {"sample_steps": steps, "bf16": False, "fit_s": 1.0, "energies_s": 1.0,
                                         "guided": metrics(1 / steps), "unguided": metrics(2 / steps)}
                for steps in (16, 32, 64, 128)}
    settings["reference (from scratch, 128 steps)"] = {"sample_steps": 128, "bf16": False, "fit_s": 2.0,
                                                       "energies_s": 1.0, "guided": metrics(0.01),
                                                       "unguided": metrics(0.02)}
    (tmp_path / "speed-fidelity-test.json").write_text(json.dumps({
        "machine": "m", "command": "c", "width": 8, "blocks": 1, "ours_fit": {"initial": 10, "refresh": 5},
        "reference_fit": 10, "scales": {}, "repeats": 2, "rows": 10, "settings": settings}))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--results", str(tmp_path),
                             "report"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "speed.md").read_text()
    assert "![fidelity against sampler steps](speed-sampler-steps.png)" in report
    assert (tmp_path / "speed-sampler-steps.png").stat().st_size > 10_000
    # 16 steps, guided, against the reference's guided: 1/16 against 0.01.
    assert "ours, 16 steps against the reference settings (speed-fidelity-test.json): state_mmd +525%" in report


@pytest.mark.parametrize("command", [["table.py", "report"], ["table.py", "curves"], ["finetune.py", "report"],
                                     ["speed.py", "online"]], ids=" ".join)
def test_a_missing_log_folder_is_one_line(command, tmp_path):
    """The README's own example, before any sweep has run: one line, no traceback."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / command[0]), command[1], "--log-dir",
                             str(tmp_path / "runs" / "table")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_speed_threads_times_each_thread_count_idle_and_beside_a_busy_neighbour(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--results", str(tmp_path), "threads",
               "--algorithms", "iql", "--threads", "1", "--updates", "20", "--steps", "20", "--dataset",
               "random:Hopper-v5:500"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "speed-threads.json").read_text())["rows"]
    assert [(row["threads"], row["neighbour"]) for row in rows] == [(1, False), (1, True)]
    assert all(row["updates_per_s"] > 0 and row["online_steps_per_s"] > 0 for row in rows)
