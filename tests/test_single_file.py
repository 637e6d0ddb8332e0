"""The algorithm files are single files: shared sections identical, no imports of project files."""

import ast
import re
from collections import defaultdict

import pytest
from conftest import ROOT

SECTION = re.compile(r"^# ==== BEGIN SHARED: (.+?) ====\n(.*?)^# ==== END SHARED: \1 ====$", re.M | re.S)
# Every algorithm file carries these sections; EDIS files add their own shared sections.
CORE_SECTIONS = {"command line and config files", "datasets", "environment", "replay buffer", "evaluation",
                 "logging and checkpoints", "entry point"}
FILES = sorted((ROOT / "algorithms").glob("*.py"))


def sections(path):
    text = path.read_text()
    found = {name: body for name, body in SECTION.findall(text)}
    begins = re.findall(r"^# ==== BEGIN SHARED: (.+?) ====$", text, re.M)
    assert sorted(begins) == sorted(found), f"{path.name}: a BEGIN marker has no matching END"
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_holds_every_core_section(path):
    missing = CORE_SECTIONS - set(sections(path))
    assert not missing, f"{path.name} lacks shared sections {sorted(missing)}"


def test_shared_sections_are_identical_across_files():
    copies = defaultdict(dict)
    for path in FILES:
        for name, body in sections(path).items():
            copies[name][path.name] = body
    for name, bodies in copies.items():
        reference_file, reference = next(iter(bodies.items()))
        for file_name, body in bodies.items():
            assert body == reference, (
                f"section '{name}' differs between {reference_file} and {file_name}: after editing it in one file, "
                f"copy it into the others with python tools/sync_shared.py algorithms/<the edited file>")


def test_sync_script_copies_one_files_sections_into_the_others(tmp_path):
    """tools/sync_shared.py: an edited section reaches every other file that holds it, and nothing else moves."""
    import subprocess
    import sys

    for path in FILES:
        (tmp_path / path.name).write_text(path.read_text())
    edited = tmp_path / "iql.py"
    edited.write_text(edited.read_text().replace("# ==== BEGIN SHARED: replay buffer ====\n",
                                                 "# ==== BEGIN SHARED: replay buffer ====\n# an edit\n"))
    script = [sys.executable, str(ROOT / "tools" / "sync_shared.py"), str(edited), "--folder", str(tmp_path)]
    check = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and check.stdout.count("differs: ") == 3 and "replay buffer" in check.stdout
    assert subprocess.run(script, capture_output=True, text=True).returncode == 0
    for path in FILES:
        synced = (tmp_path / path.name).read_text()
        assert "# ==== BEGIN SHARED: replay buffer ====\n# an edit\n" in synced
        assert synced.replace("# an edit\n", "", 1) == path.read_text()  # the rest of the file is untouched
    again = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert again.returncode == 0 and "every shared section matches" in again.stdout


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_imports_of_project_files(path):
    project_modules = {p.stem for p in FILES} | {"tests", "benchmarks", "algorithms", "conftest"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        assert not set(names) & project_modules, f"{path.name} imports {names}"


def line_of(text: str, pattern: str) -> int:
    match = re.search(pattern, text, re.M)
    assert match, pattern
    return text[:match.start()].count("\n") + 1


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_algorithm_first_machinery_last(path):
    """A reader meets the method first: the agent's update early, train() before the machinery."""
    text = path.read_text()
    agent = "IQL agent" if path.stem.startswith("iql") else "Cal-QL agent"
    update = line_of(text, r"^    def update\(self, batch")
    agent_end = line_of(text, rf"^# ==== END SHARED: {agent} ====")
    if path.stem.endswith("_edis"):
        assert agent_end <= 1000, f"{path.name}: EDIS sections and agent end at line {agent_end}"
        assert line_of(text, r"^# ==== END SHARED: EDIS refresh ====") < agent_end
    else:
        assert update <= 400, f"{path.name}: the agent update starts at line {update}"
    assert update < line_of(text, r"^def train\(") < line_of(text, r"^# Machinery") < line_of(
        text, r"^# ==== BEGIN SHARED: command line and config files ====")
    assert line_of(text, r"^# ==== BEGIN SHARED: entry point ====") > line_of(text, r"^# ==== END SHARED: logging")


@pytest.mark.parametrize("path", [p for p in FILES if not p.stem.endswith("_edis")], ids=lambda p: p.name)
def test_base_files_carry_nothing_only_edis_uses(path):
    text = path.read_text()
    for name in ("sample_actions", "sample_policy_actions", "policy_log_prob", "def recent", "recent_rows",
                 "check_finite_values"):
        assert name not in text, f"{path.name} holds {name}, which only EDIS uses"


# What counts as machinery in train(): a line that touches the run's records (the Run helper and what it hides:
# logs, progress bar, timing, checkpoints, --load_model, snapshots and --resume, summary, error handling), the
# device and thread setup, printing, or the EDIS files' fidelity measurements (their simulator env and
# measure_refresh). The names of the machinery before it went behind Run are here too, so that the count
# of the old train() (56-61%) can be checked.
MACHINERY = re.compile(
    r"\brun\b|\bRun\(|setup_device|note_cpu_scale|set_threads|rebuilt_rows|load_model|load_checkpoint|checkpoint|"
    r"\bstart\b|print\(|logger|snapshot|guard|progress|postfix|seconds|clock|summary|score_key|UserError|\btry\b|"
    r"\bexcept\b|\bfinally\b|fidelity_env|Simulator|simulator\.env|measure_refresh")


def train_lines(path):
    """(machinery lines, all lines) of train(), counting code only: a simple statement's lines (all of a
    statement spread over several), a compound statement's header; no blank or comment-only lines."""
    source = path.read_text()
    lines = source.splitlines()
    train = next(node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == "train")
    counted = {}
    for node in ast.walk(train):
        if not isinstance(node, ast.stmt) or node is train:
            continue
        if hasattr(node, "body"):  # if / for / with / while: the header only
            header_end = node.body[0].lineno - 1
            span = range(node.lineno, max(header_end, node.lineno) + 1)
        else:
            span = range(node.lineno, node.end_lineno + 1)
        text = "\n".join(lines[number - 1] for number in span)
        for number in span:
            if lines[number - 1].strip() and not lines[number - 1].strip().startswith("#"):
                counted[number] = counted.get(number, False) or bool(MACHINERY.search(text))
    return sum(counted.values()), len(counted)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_train_is_mostly_the_algorithm(path):
    """train() reads as the algorithm's loop: at most a quarter of its lines are the run's machinery."""
    machinery, total = train_lines(path)
    assert machinery <= total / 4, f"{path.name}: train() has {machinery} machinery lines of {total}"
