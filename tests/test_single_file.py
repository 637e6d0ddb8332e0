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
            assert body == reference, f"section '{name}' differs between {reference_file} and {file_name}"


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
