"""benchmarks/finetune.py: shared pretraining, variants that differ only online, the paired report."""

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script

FINETUNE = ROOT / "benchmarks" / "finetune.py"


def finetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FINETUNE), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def options(command: str) -> dict:
    words = shlex.split(command)
    return {words[i]: words[i + 1] for i in range(2, len(words) - 1) if words[i].startswith("--")}


def test_variants_share_one_checkpoint_and_the_edis_algorithms_settings(tmp_path):
    result = finetune("run", "--configs", "configs/cpu/hopper-medium-replay.yaml", "--seeds", "3", "--log-dir",
                      str(tmp_path), "--print-commands", "--variants", "iql", "iql_edis", "iql_edis_unguided",
                      "iql_edis_reference", "--", "--edis.num_samples", "77", "--n_episodes", "2",
                      "--online_iterations", "900")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5  # one pretraining run, four fine-tuning runs
    pretrain, base, edis, unguided, reference = (options(line) for line in lines)
    # The options after -- go to every run, but pretraining stays offline (the last --online_iterations wins).
    assert lines[0].startswith("python algorithms/iql.py")
    assert shlex.split(lines[0])[-2:] == ["--online_iterations", "0"]
    assert all(run["--online_iterations"] == "900" for run in (base, edis, unguided, reference))
    # The base script runs with IQL-EDIS's settings from the config (beta 10, no reward normalisation).
    for run in (pretrain, base):
        assert (run["--beta"], run["--normalize_reward"], run["--n_episodes"]) == ("10.0", "false", "2")
        assert "--edis.num_samples" not in run
    checkpoint = str(tmp_path / "checkpoints" / "pretrain-iql--cpu__hopper-medium-replay--seed3" /
                     "checkpoint_50000.pt")
    for run in (base, edis, unguided, reference):
        assert run["--load_model"] == checkpoint and run["--seed"] == "3"
    for run in (edis, unguided, reference):
        assert run["--edis.num_samples"] == "77" and "--beta" not in run  # the EDIS script reads its own section
    assert unguided["--edis.guidance_state"] == unguided["--edis.guidance_policy"] == "0"
    assert unguided["--edis.guidance_transition"] == "0"
    assert reference["--edis.replay"] == "reference" and "--edis.replay" not in edis


@pytest.mark.slow
def test_offline_rows_variant_replays_offline_rows_and_never_samples(tmp_path):
    """iql_edis_offline_rows is the paper's loop with no refresh: nothing is fitted or generated, ever."""
    printed = finetune("run", "--configs", "configs/cpu/hopper-medium-replay.yaml", "--seeds", "0", "--log-dir",
                       str(tmp_path), "--print-commands", "--variants", "iql_edis_offline_rows")
    assert printed.returncode == 0, printed.stderr
    command = shlex.split(printed.stdout.strip().splitlines()[-1])
    variant_options = command[command.index("--log_dir") + 2:command.index("--load_model")]
    result = run_script("iql_edis", "--dataset", "random:Hopper-v5:1000", "--offline_iterations", "20",
                        "--online_iterations", "600", "--edis.refresh_every", "200", "--edis.num_samples", "64",
                        "--batch_size", "32", "--n_episodes", "1", "--log_freq", "100", "--wandb_mode", "disabled",
                        "--device", "cpu", "--log_dir", str(tmp_path / "runs"), "--name", "rows", *variant_options)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "rows" / "metrics.jsonl").read_text().splitlines()]
    assert not any("edis/generated" in record or record.get("edis/diffusion_loss", 0) for record in records)
    assert any(record.get("phase") == "online" and "train/q_loss" in record for record in records)


def write_run(folder: Path, scores: dict, offline_iterations: int, refreshes: list = (), critic: dict = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"offline_iterations: {offline_iterations}\n")
    (folder / "summary.json").write_text(json.dumps({"score_metric": "eval/normalized_score"}))
    records = [{"step": step, "eval/normalized_score": score} for step, score in scores.items()]
    records += [{"step": 1, "edis/generated": 10, **refresh} for refresh in refreshes]
    records += [{"step": step, **losses} for step, losses in (critic or {}).items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def test_report_pairs_each_variant_with_its_base_per_seed(tmp_path):
    key = "cpu__hopper-medium-replay"
    for seed, (offline, base, edis) in enumerate([(40.0, 50.0, 58.0), (44.0, 70.0, 74.0)]):
        write_run(tmp_path / f"pretrain-iql--{key}--seed{seed}", {100: offline - 10, 200: offline}, 200)
        write_run(tmp_path / f"iql--{key}--seed{seed}", {250: 1.0, 300: base}, 200)
        write_run(tmp_path / f"iql_edis--{key}--seed{seed}", {250: 2.0, 300: edis}, 200,
                  [{"edis/state_mmd_guided": 0.1 + seed, "edis/state_mmd_unguided": 0.3}])
    (tmp_path / f"iql_edis_unguided--{key}--seed0").mkdir()  # unfinished: skipped and said so
    out = tmp_path / "results"
    result = finetune("report", "--bootstrap-reps", "200", "--log-dir", str(tmp_path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    score_table = next(part for part in result.stdout.split("\n\n")
                       if part.startswith("| config | variant | seeds | offline"))
    rows = {line.split(" | ")[1]: line for line in score_table.splitlines() if line.startswith("| cpu/")}
    assert "| 2 | 42.0 ± 2.0 | 60.0 ± 10.0 |" in rows["iql"]
    # Paired changes, final: 58 - 50 = 8 and 74 - 70 = 4; last 3: (2 + 58) / 2 - (1 + 50) / 2 = 4.5, and 2.5.
    assert rows["iql_edis"].endswith("| 6.0 ± 2.0 (2 paired seeds) | 3.5 ± 1.0 (2 paired seeds) |")
    # guided - unguided per refresh: -0.2 and +0.8, mean +0.3, standard error 0.7071 / sqrt(2) = 0.5
    assert "| state_mmd | 0.600 ± 0.500 | 0.300 ± 0.000 | +0.300 ± 0.500 |" in result.stdout
    assert "skipped iql_edis_unguided--cpu__hopper-medium-replay--seed0: no summary.json" in result.stdout
    for folder in (tmp_path, out):
        assert (folder / "finetune.md").is_file() and (folder / "finetune.png").stat().st_size > 0


def test_report_tells_the_samples_effect_from_the_batch_mix(tmp_path):
    """iql_edis and iql_edis_unguided are also paired with iql_edis_offline_rows (same loop, real rows), and
    iql_edis with iql_edis_simulator_labels (the same loop, the simulator's (r, s', done))."""
    key = "cpu__walker2d-medium-replay"
    for seed, (mix, edis, unguided) in enumerate([(30.0, 20.0, 25.0), (40.0, 36.0, 38.0)]):
        write_run(tmp_path / f"iql--{key}--seed{seed}", {300: 50.0}, 200)
        write_run(tmp_path / f"iql_edis_offline_rows--{key}--seed{seed}", {300: mix}, 200)
        write_run(tmp_path / f"iql_edis--{key}--seed{seed}", {300: edis}, 200)
        write_run(tmp_path / f"iql_edis_unguided--{key}--seed{seed}", {300: unguided}, 200)
    write_run(tmp_path / f"iql_edis_simulator_labels--{key}--seed1", {300: 46.0}, 200)
    write_run(tmp_path / f"iql_edis_reference--{key}--seed0", {300: 60.0}, 200)  # another loop: not paired
    result = finetune("report", "--bootstrap-reps", "200", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("What the generated samples do, apart from the batch mix:")[1].split("\n\n")[1]
    rows = [line for line in samples.splitlines() if line.startswith("| cpu/")]
    # iql_edis: 20 - 30 and 36 - 40; unguided: 25 - 30 and 38 - 40 (one evaluation: final = last 3)
    assert rows == ["| cpu/walker2d-medium-replay | iql_edis | -7.0 ± 3.0 (2 paired seeds) | "
                    "-7.0 ± 3.0 (2 paired seeds) |",
                    "| cpu/walker2d-medium-replay | iql_edis_simulator_labels | 6.0 (1 paired seed) | "
                    "6.0 (1 paired seed) |",
                    "| cpu/walker2d-medium-replay | iql_edis_unguided | -3.5 ± 1.5 (2 paired seeds) | "
                    "-3.5 ± 1.5 (2 paired seeds) |"]
    dynamics = result.stdout.split("What the model's (r, s', done) cost")[1].split("\n\n")[1]
    # iql_edis 36 against simulator labels 46 on seed 1, the one seed both have
    assert [line for line in dynamics.splitlines() if line.startswith("| cpu/")] == [
        "| cpu/walker2d-medium-replay | iql_edis | -10.0 (1 paired seed) | -10.0 (1 paired seed) |"]


def test_report_gives_rliable_estimates_and_pairs_guided_with_unguided_under_simulator_labels(tmp_path):
    """IQM with its interval and the probability of improvement (rliable), and guided (s, a) against unguided (s, a)
    when both get the simulator's labels: the paper's idea with the model's dynamics taken out."""
    key = "cpu__walker2d-medium-replay"
    scores = {"iql": [10.0, 20.0, 30.0, 40.0], "iql_edis_simulator_labels": [12.0, 22.0, 50.0, 60.0],
              "iql_edis_simulator_labels_unguided": [11.0, 21.0, 31.0, 41.0]}
    for variant, finals in scores.items():
        for seed, final in enumerate(finals):
            write_run(tmp_path / f"{variant}--{key}--seed{seed}", {300: final}, 200)
    result = finetune("report", "--bootstrap-reps", "200", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[1]: line for line in result.stdout.split("\n\n")[1].splitlines()
            if line.startswith("| cpu/")}
    # IQM of 10, 20, 30, 40: the middle half, (20 + 30) / 2; its interval lies within the runs' range.
    iqm, interval = rows["iql"].split(" | ")[3].split(" [")
    low, high = (float(v) for v in interval.rstrip("]").split(", "))
    assert iqm == "25.0" and 10.0 <= low < 25.0 < high <= 40.0
    comparisons = {tuple(line.split(" | ")[1:3]): line for line in result.stdout.split("Probability of improvement")
                   [1].split("\n\n")[1].splitlines() if line.startswith("| cpu/")}
    # Over the 16 pairs of runs, guided ends above unguided in 1 + 2 + 4 + 4 = 11: P = 11/16 = 0.6875
    guided = comparisons[("iql_edis_simulator_labels", "iql_edis_simulator_labels_unguided")]
    probability, interval = guided.split(" | ")[3].split(" [")
    low, high = (float(v) for v in interval.rstrip("]").split(", "))
    assert probability == "0.69" and 0.0 <= low < 0.6875 < high <= 1.0
    assert guided.endswith("| 10.0 ± 9.0 (4 seeds) |")  # paired: 1, 1, 19, 19
    # unguided against iql: 1 + 2 + 3 + 4 = 10 of 16 pairs
    assert comparisons[("iql_edis_simulator_labels_unguided", "iql")].split(" | ")[3].startswith("0.62 [")
    table = result.stdout.split("What guidance does")[1].split("\n\n")[1]
    assert [line for line in table.splitlines() if line.startswith("| cpu/")] == [
        "| cpu/walker2d-medium-replay | iql_edis_simulator_labels | 10.0 ± 9.0 (4 paired seeds) | "
        "10.0 ± 9.0 (4 paired seeds) |"]


def test_report_shows_a_diverging_critic_per_seed(tmp_path):
    """The critic table: mean TD loss over the first and last tenth of the online steps, and the value."""
    key = "cpu__walker2d-medium-replay"
    steady = {step: {"train/q_loss": 20.0, "train/mean_value": 100.0} for step in range(200, 301, 10)}
    # online steps 0..100: the first tenth is steps 200-210, the last 290-300
    diverging = {step: {"train/q_loss": 10.0 * 2 ** ((step - 200) // 10), "train/mean_value": 300.0 - step}
                 for step in range(200, 301, 10)}
    write_run(tmp_path / f"iql--{key}--seed0", {300: 50.0}, 200, critic=steady)
    write_run(tmp_path / f"iql_edis--{key}--seed0", {300: 10.0}, 200, critic=diverging)
    write_run(tmp_path / f"iql_edis--{key}--seed2", {300: 12.0}, 200, critic=steady)
    calql = {step: {"train/qf1_loss": 3.0, "train/qf2_loss": 9.0, "train/average_qf1": 7.0}
             for step in range(200, 301, 10)}
    write_run(tmp_path / f"calql--{key}--seed0", {300: 40.0}, 200, critic=calql)
    result = finetune("report", "--bootstrap-reps", "200", "--log-dir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[1]: line for line in result.stdout.split("The critic during fine-tuning")[1]
            .split("\n\n")[1].splitlines() if line.startswith("| cpu/")}
    # diverging seed 0: first tenth (10 + 20) / 2 = 15, last tenth (5120 + 10240) / 2 = 7680, value 5
    assert rows["iql_edis"] == "| cpu/walker2d-medium-replay | iql_edis | 0 2 | 15 / 20 | 7.68e+03 / 20 | 5 / 100 |"
    assert rows["iql"].endswith("| 0 | 20 | 20 | 100 |")
    assert rows["calql"].endswith("| 0 | 3 | 3 | 7 |")  # Cal-QL: its first critic's loss and Q
    assert (tmp_path / "out" / "finetune.png").stat().st_size > 0


@pytest.mark.slow
def test_a_sweep_on_a_fresh_machine_remakes_a_lost_checkpoint_and_refuses_a_different_one(iql, tmp_path):
    """A pretraining run whose checkpoint is gone is run again for the fine-tuning runs still to do, and must give
    the weights the earlier ones started from; a sweep continued on other data is refused. The config's
    collected:Hopper-v5:medium-replay is read from --data-dir, as a committed result's data are."""
    log_dir, data_dir = tmp_path / "sweep", tmp_path / "committed-data"
    data_file = data_dir / "collected" / "Hopper-v5-seed0" / "medium-replay.hdf5"
    iql.collect_random_dataset("Hopper-v5", 600, data_file, seed=0)
    tiny = ["--offline_iterations", "30", "--offline_eval_freq", "30",
            "--online_iterations", "20", "--eval_freq", "20", "--n_episodes", "1", "--batch_size", "16",
            "--log_freq", "10", "--wandb_mode", "disabled", "--device", "cpu"]
    sweep = ["run", "--configs", "configs/cpu/hopper-medium-replay.yaml", "--seeds", "0", "--variants", "iql",
             "--log-dir", str(log_dir), "--data-dir", str(data_dir), "--workers", "1", "--", *tiny]
    key = "cpu__hopper-medium-replay"
    pretraining, finetuning = log_dir / f"pretrain-iql--{key}--seed0", log_dir / f"iql--{key}--seed0"
    first = finetune(*sweep)
    assert first.returncode == 0, first.stdout + first.stderr
    recorded = json.loads((log_dir / "checkpoint-fingerprints.json").read_text())
    assert list(recorded) == [pretraining.name]
    assert json.loads((log_dir / "data-fingerprints.json").read_text()) == {
        "collected:Hopper-v5:medium-replay": hashlib.sha256(data_file.read_bytes()).hexdigest()}
    provenance = json.loads((log_dir / "sweeps.jsonl").read_text().splitlines()[0])
    assert len(provenance["commit"]) == 40 and "--data-dir" in provenance["command"]
    assert provenance["edis_data_dir"] == str(data_dir.resolve())
    cpu_id = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("cpu family")), None) if Path("/proc/cpuinfo").is_file() else None
    if cpu_id is not None:  # the CPU's generation, which a virtual machine's model name can hide
        assert provenance["cpu_id"].startswith(f"cpu family {cpu_id} model ")

    # A fresh machine: the records came back, the checkpoint did not, and one fine-tuning run is still to do.
    shutil.rmtree(log_dir / "checkpoints")
    shutil.rmtree(finetuning)
    result = finetune(*sweep)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "its checkpoint" in result.stdout and "is gone: pretraining it again" in result.stdout
    assert (finetuning / "summary.json").is_file() and (log_dir / "superseded" / pretraining.name).is_dir()
    assert json.loads((log_dir / "checkpoint-fingerprints.json").read_text()) == recorded  # the same weights

    # Weights that differ from the recorded ones: nothing is fine-tuned on them, and the next sweep says why.
    (log_dir / "checkpoint-fingerprints.json").write_text(json.dumps({pretraining.name: "0" * 64}))
    shutil.rmtree(log_dir / "checkpoints")
    shutil.rmtree(finetuning)
    result = finetune(*sweep)
    assert result.returncode == 1 and "is not the one that this seed's earlier fine-tuning runs" in result.stdout
    assert not finetuning.exists()
    again = finetune(*sweep)
    assert again.returncode == 2 and again.stderr.startswith(f"error: {pretraining.name}: its checkpoint")

    # Other data under the same name (a re-collection): refused before anything runs.
    iql.collect_random_dataset("Hopper-v5", 600, data_file, seed=1)
    other_data = finetune(*sweep)
    assert other_data.returncode == 2 and "not the file this sweep's runs used" in other_data.stderr
    assert len(other_data.stderr.strip().splitlines()) == 1


def test_status_lists_every_planned_run_and_estimates_the_time_left(tmp_path):
    """Re-plans the commands in sweeps.jsonl: finished runs give each kind's time, a started run counts by the
    share of its steps it logged, and a kind with no finished run borrows the config's other fine-tunings' time."""
    key = "cpu__hopper-medium-replay"
    command = ("python benchmarks/finetune.py run --log-dir elsewhere --configs configs/cpu/hopper-medium-replay.yaml "
               "--seeds 0 1 --variants iql iql_edis -- --wandb_mode disabled")
    (tmp_path / "sweeps.jsonl").write_text(json.dumps({"command": command}) + "\n")

    def finished(name: str, offline: float, online: float) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"offline": {"wall_clock_s": offline},
                                                                  "online": {"wall_clock_s": online}}))

    finished(f"pretrain-iql--{key}--seed0", 1200.0, 0.0)
    finished(f"iql--{key}--seed0", 0.0, 2400.0)
    started = tmp_path / f"iql_edis--{key}--seed0"  # a quarter of its online steps done
    started.mkdir()
    (started / "config.yaml").write_text("offline_iterations: 1000\nonline_iterations: 2000\nload_model: x.pt\n")
    (started / "metrics.jsonl").write_text(json.dumps({"step": 1200}) + "\n" + json.dumps({"step": 1500}) + "\n")
    result = finetune("status", "--log-dir", str(tmp_path), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{tmp_path}: 2 of 6 runs finished")
    rows = {line.split(" | ")[1]: line for line in result.stdout.splitlines() if line.startswith("| cpu/")}
    assert rows["pretrain-iql"].endswith("| 1 | 0 | 1 | 20 min | 20 min |")
    assert rows["iql"].endswith("| 1 | 0 | 1 | 40 min | 40 min |")
    assert rows["iql_edis"].endswith("| 0 | 1 | 1 | - | 1.2 h |")  # (0.75 + 1) x 40 min, from iql's time
    # left: 20 + 40 + 70 minutes = 2.2 h of one core
    assert "left: about 2.2 h of one core, 1.1 h at 2 runs at a time (" in result.stdout
    missing = finetune("status", "--log-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "sweeps.jsonl" in missing.stderr


def test_bootstrap_intervals_do_not_depend_on_numpys_global_generator():
    """rliable resamples with numpy's global generator: the report seeds it, so the same runs give the same intervals
    in every process (and leaves the caller's generator as it was)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import finetune as module

    scores = np.array([3.0, 11.0, 17.0, 26.0, 31.0, 45.0, 52.0, 68.0, 74.0, 90.0]).reshape(-1, 1)

    def iqm(x):
        return np.array([np.mean(np.sort(x.ravel())[len(x) // 4: len(x) - len(x) // 4])])

    intervals = []
    for seed in (1, 2):
        np.random.seed(seed)
        intervals.append(module.interval_estimate(scores, iqm, 200))
        assert np.random.get_state()[1][0] == np.random.RandomState(seed).get_state()[1][0]
    assert intervals[0] == intervals[1]
