"""Benchmark scripts: the table report reads finished runs; the speed script prints its table."""

import json
import subprocess
import sys

from conftest import ROOT


def test_table_report_puts_measured_beside_published(tmp_path):
    for seed, (offline, online) in enumerate([(80.0, 100.0), (90.0, 110.0)]):
        run_dir = tmp_path / f"iql--adroit__pen-cloned--seed{seed}"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({
            "offline": {"final_normalized_score": offline}, "online": {"final_normalized_score": online}}))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table.py"), "report", "--log-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| adroit/pen-cloned | iql | 2 | 85.0 ± 5.0 | 105.0 ± 5.0 | 84.2 → 102.0 | - |" in result.stdout
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.png").stat().st_size > 0


def test_table_prints_one_command_per_run():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table.py"), "run", "--configs",
                             "configs/adroit/pen-cloned.yaml", "--seeds", "0", "1", "--print-commands", "--",
                             "--device", "cuda"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 8  # 4 algorithms x 2 seeds
    assert lines[0] == ("python algorithms/iql.py --config configs/adroit/pen-cloned.yaml --seed 0 "
                        "--name iql--adroit__pen-cloned--seed0 --log_dir runs/table --device cuda")


def test_speed_script_measures_each_algorithm():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--updates", "4", "--repeats",
                             "1", "--batch-size", "16", "--envs", "--denoisers", "32x1"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| iql ", "| calql ", "| 32x1 "))]
    assert len(rows) == 4 and all(float(row.split("|")[-2]) > 0 for row in rows)  # 2 agents, fp32 and bf16


def test_table_curves_plot_evaluations(tmp_path):
    for seed in (0, 1):
        run_dir = tmp_path / f"iql_edis--mujoco__hopper-medium--seed{seed}"
        run_dir.mkdir()
        records = [{"step": step, "phase": "offline" if step <= 20 else "online", "eval/normalized_score": step + seed}
                   for step in (10, 20, 30, 40)]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table.py"), "curves", "--log-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curves.png").stat().st_size > 0
