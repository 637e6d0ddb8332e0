"""Config files and command line: --config, per-algorithm sections, overrides, unknown keys, --help."""

import inspect
import re
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest
from conftest import ALGORITHMS, ROOT, run_script

CONFIG = """\
dataset: random:Hopper-v5:300
offline_iterations: 7
eval_freq: 3
iql:
  beta: 10.0
  batch_size: 32
calql:
  cql_alpha: 2.5
  batch_size: 64
edis:
  anything_for_another_script: 1
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize("flag", ["--config", "--config_path"])
def test_config_flag_and_pyrallis_alias(iql, config_file, flag):
    config = iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, [flag, str(config_file)])
    assert config.dataset == "random:Hopper-v5:300" and config.offline_iterations == 7
    config = iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, [f"{flag}={config_file}"])
    assert config.eval_freq == 3


EDIS_LAYERS = """\
dataset: random:Hopper-v5:300
offline_iterations: 7
iql:
  beta: 5.0
  iql_tau: 0.6
calql:
  cql_alpha: 2.5
edis:
  width: 64
  mix_ratio: 0.4
iql_edis:
  iql_tau: 0.8
  edis:
    mix_ratio: 0.2
calql_edis:
  offline_iterations: 9
  edis:
    mix_ratio: 0.7
"""


def test_edis_scripts_layer_their_sections_and_skip_the_base_ones(iql_edis, calql_edis, tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(EDIS_LAYERS)
    iql_config = iql_edis.parse_config(iql_edis.TrainConfig, iql_edis.CONFIG_SECTIONS, ["--config", str(path)])
    calql_config = calql_edis.parse_config(calql_edis.TrainConfig, calql_edis.CONFIG_SECTIONS, ["--config", str(path)])
    # iql: is the base algorithm's: IQL-EDIS keeps its own default beta and takes iql_tau from iql_edis:.
    assert (iql_config.beta, iql_config.iql_tau, iql_config.offline_iterations) == (10.0, 0.8, 7)
    # edis: is shared; each EDIS section overrides it key by key.
    assert (iql_config.edis.width, iql_config.edis.mix_ratio) == (64, 0.2)
    assert (calql_config.cql_alpha, calql_config.offline_iterations) == (10.0, 9)
    assert (calql_config.edis.width, calql_config.edis.mix_ratio) == (64, 0.7)


def test_each_script_reads_its_own_section(iql, calql, config_file):
    iql_config = iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--config", str(config_file)])
    calql_config = calql.parse_config(calql.TrainConfig, calql.CONFIG_SECTIONS, ["--config", str(config_file)])
    assert (iql_config.beta, iql_config.batch_size) == (10.0, 32)
    assert (calql_config.cql_alpha, calql_config.batch_size) == (2.5, 64)


def test_command_line_overrides_file(iql, config_file):
    config = iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS,
                              ["--config", str(config_file), "--beta", "1.5", "--seed", "3", "--device", "cpu"])
    assert (config.beta, config.seed, config.device, config.batch_size) == (1.5, 3, "cpu", 32)


def test_string_values_stay_strings(iql):
    # A value is decoded from the text written: read as YAML, `off` would become False and `null` None.
    config = iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--name", "off", "--env=null"])
    assert (config.name, config.env) == ("off", "null")


@pytest.mark.parametrize("key, text, expected", [
    ("normalize", "'false'", False), ("normalize", "off", False), ("normalize", "Yes", True),
    ("name", "off", "off"), ("name", "'1.5'", "1.5"), ("env", "null", "null"),
    ("seed", "1_000", 1000), ("offline_iterations", "1e6", 1_000_000), ("beta", "3e-4", 3e-4), ("beta", "2", 2.0),
])
def test_a_value_means_the_same_in_a_file_and_on_the_command_line(iql, tmp_path, key, text, expected):
    path = tmp_path / "one.yaml"
    path.write_text(f"{key}: {text}\n")
    from_file = getattr(iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--config", str(path)]), key)
    typed = text.strip("'")  # what the shell passes on for the same value
    from_command_line = getattr(iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, [f"--{key}", typed]), key)
    assert from_file == from_command_line == expected and type(from_file) is type(expected)


@pytest.mark.parametrize("text, message", [
    ("normalize: 'perhaps'", "normalize = 'perhaps' is not true or false ('normalize' in"),
    ("seed: 1.7", "seed = '1.7' is not an integer ('seed' in"),
    ("iql:\n  batch_size: many", "batch_size = 'many' is not an integer ('iql.batch_size' in"),
    ("beta: .nan", "beta = '.nan' is not a number"),
    ("name: [a, b]", "name = ['a', 'b'] is not a single value"),
    ("normalize: true\nnormalize_rewrd: true", "unknown key 'normalize_rewrd' in"),
])
def test_bad_values_in_a_file_are_refused_like_on_the_command_line(iql, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(iql.UserError, match=re.escape(message)):
        iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--config", str(path)])


def test_a_bad_file_value_ends_main_with_one_line(iql, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: random:Hopper-v5:100\nseed: 1.7\n")
    assert iql.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: seed = '1.7' is not an integer ('seed' in {path})"]


def test_unknown_top_level_key_names_key_and_file(iql, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: random:Hopper-v5:100\nlearning_rate_typo: 3\n")
    with pytest.raises(iql.UserError, match=f"unknown key 'learning_rate_typo' in {re.escape(str(path))}"):
        iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--config", str(path)])


def test_unknown_key_in_own_section(calql, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("calql:\n  cql_alhpa: 3\niql:\n  whatever: 1\n")
    with pytest.raises(calql.UserError, match=f"unknown key 'calql.cql_alhpa' in {re.escape(str(path))}"):
        calql.parse_config(calql.TrainConfig, calql.CONFIG_SECTIONS, ["--config", str(path)])


def test_unreadable_config_file(iql, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset: [unclosed\n")
    with pytest.raises(iql.UserError, match="cannot read config file"):
        iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--config", str(path)])
    with pytest.raises(iql.UserError, match="config file not found"):
        iql.parse_config(iql.TrainConfig, iql.CONFIG_SECTIONS, ["--config", str(tmp_path / "none.yaml")])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses_for_every_algorithm(path, iql, calql, iql_edis, calql_edis):
    for module in (iql, calql, iql_edis, calql_edis):
        config = module.parse_config(module.TrainConfig, module.CONFIG_SECTIONS, ["--config", str(path)])
        module.validate_config(config)


def test_shipped_configs_cover_the_paper_and_corl_datasets():
    names = {str(p.relative_to(ROOT / "configs"))[:-5] for p in (ROOT / "configs").rglob("*.yaml")}
    expected = {f"mujoco/{env}-{kind}" for env in ("hopper", "halfcheetah", "walker2d")
                for kind in ("random", "medium", "medium-replay", "medium-expert")}
    expected |= {f"antmaze/{maze}" for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse",
                                               "large-play", "large-diverse")}
    expected |= {f"adroit/{task}-{kind}" for task in ("pen", "door", "hammer", "relocate")
                 for kind in ("cloned", "human")}
    expected.add("local/hopper-random")
    assert expected <= names


def documented_fields(cls, prefix=""):
    """(option, comment) of every field of a config dataclass, nested dataclasses as --section.field."""
    source = inspect.getsource(cls)
    for field in fields(cls):
        default = field.default_factory() if field.default_factory is not MISSING else field.default
        if is_dataclass(default):
            yield from documented_fields(type(default), f"{prefix}{field.name}.")
            continue
        comment = re.search(rf"^    {field.name}: [^#\n]*# (.+)$", source, re.M)
        assert comment, f"{prefix}{field.name} has no comment"
        yield f"--{prefix}{field.name}", " ".join(comment.group(1).split())


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "iql_edis", "calql_edis"])
def test_help_lists_every_field_with_its_comment(algorithm, request):
    module = request.getfixturevalue(algorithm)
    result = run_script(algorithm, "--help", timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "[--config FILE]" in text and "--config FILE, --config_path FILE YAML config file" in text
    for option, comment in documented_fields(module.TrainConfig):
        assert f"{option} " in text, option
        assert comment[:30] in text, option


def test_infinite_bounds_are_numbers(calql, tmp_path):
    path = tmp_path / "bounds.yaml"
    path.write_text("calql:\n  cql_clip_diff_min: -.inf\n  cql_clip_diff_max: inf\n")
    config = calql.parse_config(calql.TrainConfig, calql.CONFIG_SECTIONS, ["--config", str(path)])
    assert (config.cql_clip_diff_min, config.cql_clip_diff_max) == (float("-inf"), float("inf"))
    config = calql.parse_config(calql.TrainConfig, calql.CONFIG_SECTIONS, ["--cql_clip_diff_min=-inf"])
    assert config.cql_clip_diff_min == float("-inf")
