"""Do the core-math tests catch a wrong formula? Each mutation below changes one line of an algorithm file in a
copy of the repository; tests/test_core_math.py must fail on every one of them.

    python tools/check_math_tests.py            # about 20 pytest runs of a few seconds each

Prints one line per mutation and exits 1 if any survived (the tests did not notice it).
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (file, the text of the line as it is, the same line with the formula broken)
MUTATIONS = [
    ("iql.py", "torch.abs(tau - (u < 0).float())", "torch.abs(tau - (u > 0).float())"),
    ("iql.py", "targets = rewards + (1.0 - dones)", "targets = rewards + (1.0 + dones)"),
    ("iql.py", "torch.exp(self.config.beta * advantage.detach())", "torch.exp(-self.config.beta * advantage.detach())"),
    ("iql.py", "advantage = target_q - value", "advantage = value - target_q"),
    ("iql.py", "list(source.parameters()), tau)", "list(source.parameters()), 1.0 - tau)"),
    ("calql.py", "list(source.parameters()), tau)", "list(source.parameters()), 1.0 - tau)"),
    ("calql.py", "td_target = rewards + (1.0 - dones)", "td_target = rewards + (1.0 + dones)"),
    ("calql.py", "target_q = target_q - alpha * next_log_pi", "target_q = target_q + alpha * next_log_pi"),
    ("calql.py", "qf1_diff = (qf1_ood - q1_predicted)", "qf1_diff = (q1_predicted - qf1_ood)"),
    ("calql.py", "torch.maximum(q1_current, lower_bounds)", "torch.minimum(q1_current, lower_bounds)"),
    ("calql.py", "torch.maximum(q1_next, lower_bounds)", "q1_next"),
    ("calql.py", "random_density = math.log(0.5**action_dim)", "random_density = 0.0"),
    ("calql.py", "future = rewards[i] + discount * future * (1.0 - terminals[i])",
     "future = rewards[i] + discount * future"),
    ("iql_edis.py", "c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)",
     "c_skip = sigma**2 / (sigma**2 + sigma_data**2)"),
    ("iql_edis.py", "c_in = 1.0 / (sigma**2 + sigma_data**2).sqrt()", "c_in = 1.0"),
    ("iql_edis.py", "return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2",
     "return (sigma**2 + sigma_data**2) / (sigma * sigma_data)"),
    ("iql_edis.py", "gradient = sigma[:, None] ** 2 * gradient", "gradient = sigma[:, None] * gradient"),
    ("iql_edis.py", "shift = shift + block * (self.config.guidance_clip",
     "shift = shift - block * (self.config.guidance_clip"),
    ("iql_edis.py", "total = total + self.scales[name] * self.networks[name]", "total = total + self.networks[name]"),
]


def main() -> int:
    survived = 0
    with tempfile.TemporaryDirectory(prefix="math-tests-") as folder:
        copy = Path(folder)
        for name in ("algorithms", "tests", "configs"):
            shutil.copytree(ROOT / name, copy / name)
        for file, line, broken in MUTATIONS:
            path = copy / "algorithms" / file
            original = path.read_text()
            if line not in original:
                print(f"error: {file} no longer holds {line!r}: update MUTATIONS", file=sys.stderr)
                return 2
            path.write_text(original.replace(line, broken, 1))
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                     "tests/test_core_math.py"], cwd=copy, capture_output=True, text=True)
            path.write_text(original)
            caught = result.returncode == 1
            survived += not caught
            print(f"{'caught  ' if caught else 'SURVIVED'} {file}: {line} -> {broken}", flush=True)
    print(f"{len(MUTATIONS) - survived} of {len(MUTATIONS)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
