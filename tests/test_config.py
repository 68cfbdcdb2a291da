"""Config loading: defaults, _BASE_ chains, overrides, and one clear error per kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.config import ConfigError, cfg_from_dump, get_cfg, load_cfg, save_cfg
from retrieval.config.defaults import CHOICES

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_fresh_copies():
    cfg = get_cfg()
    cfg.MODEL.DEPTH = 101
    assert get_cfg().MODEL.DEPTH == 50


def test_every_default_has_a_comment():
    lines = (REPO / "retrieval/config/defaults.py").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.startswith(("_C.", "_choice(")) and "CN()" not in line:
            assert lines[index - 1].startswith("#"), f"no comment above: {line}"


def test_base_chain_relative_paths_and_overrides(tmp_path):
    _write(
        tmp_path / "a/base.yaml", "OPTIM:\n  LR: 1\n  WEIGHT_DECAY: 1e-5\nMODEL:\n  DEPTH: 101\n"
    )
    _write(tmp_path / "b/mid.yaml", "_BASE_: ../a/base.yaml\nMODEL:\n  SSM:\n    SIM: dot\n")
    leaf = _write(tmp_path / "b/c/leaf.yaml", "_BASE_: ../mid.yaml\nMODEL:\n  DEPTH: 18\n")
    cfg = load_cfg(leaf, ["TRAIN.EPOCHS", "3", "TEST.SCALES", "[1.0, 0.5]"])
    assert cfg.MODEL.DEPTH == 18  # child overrides base
    assert cfg.MODEL.SSM.SIM == "dot"  # from the middle file
    assert cfg.OPTIM.LR == 1.0 and isinstance(
        cfg.OPTIM.LR, float
    )  # int widened to the float default
    assert cfg.OPTIM.WEIGHT_DECAY == pytest.approx(1e-5)
    assert cfg.TRAIN.EPOCHS == 3 and cfg.TEST.SCALES == [1.0, 0.5]
    assert cfg.is_frozen()


def test_unknown_key_names_file_and_suggests(tmp_path):
    bad = _write(tmp_path / "typo.yaml", "MODEL:\n  SSM:\n    SIMM: dot\n")
    with pytest.raises(
        ConfigError, match=r"typo\.yaml.*'MODEL\.SSM\.SIMM'.*did you mean MODEL\.SSM\.SIM"
    ):
        load_cfg(bad)


def test_unknown_override_key_suggests():
    with pytest.raises(ConfigError, match=r"command line.*'OPTIM\.LRR'.*OPTIM\.LR"):
        load_cfg(None, ["OPTIM.LRR", "0.1"])


def test_wrong_type_names_key(tmp_path):
    bad = _write(tmp_path / "type.yaml", "TRAIN:\n  EPOCHS: abc\n")
    with pytest.raises(ConfigError, match=r"type\.yaml.*TRAIN\.EPOCHS"):
        load_cfg(bad)


def test_section_given_a_scalar(tmp_path):
    bad = _write(tmp_path / "sec.yaml", "MODEL: 3\n")
    with pytest.raises(ConfigError, match=r"'MODEL' is a section"):
        load_cfg(bad)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_value_outside_choices_lists_allowed(key):
    allowed = CHOICES[key]
    bogus = 7 if isinstance(allowed[0], int) else "bogus"
    with pytest.raises(ConfigError, match=r"not allowed; allowed values: \[.+\]") as err:
        load_cfg(None, [key, str(bogus) if isinstance(bogus, int) else bogus])
    assert key in str(err.value)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_value_is_accepted(key):
    for value in CHOICES[key]:
        cfg = load_cfg(None, [key, str(value)])
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value


def test_missing_base_names_it(tmp_path):
    leaf = _write(tmp_path / "leaf.yaml", "_BASE_: nowhere.yaml\n")
    with pytest.raises(
        ConfigError, match=r"leaf\.yaml: _BASE_ file .*nowhere\.yaml.* does not exist"
    ):
        load_cfg(leaf)


def test_base_cycle_detected(tmp_path):
    _write(tmp_path / "x.yaml", "_BASE_: y.yaml\n")
    _write(tmp_path / "y.yaml", "_BASE_: x.yaml\n")
    with pytest.raises(ConfigError, match=r"_BASE_ cycle: .*x\.yaml -> .*y\.yaml -> .*x\.yaml"):
        load_cfg(tmp_path / "x.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_cfg(tmp_path / "absent.yaml")
    broken = _write(tmp_path / "broken.yaml", "MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML"):
        load_cfg(broken)


def test_odd_override_list():
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        load_cfg(None, ["MODEL.DEPTH"])


def test_dump_round_trip(tmp_path):
    cfg = load_cfg(None, ["MODEL.DEPTH", "101", "TEST.RERANK_TOPK", "[100, 400]"])
    save_cfg(cfg, tmp_path / "out/config.yaml")
    again = cfg_from_dump((tmp_path / "out/config.yaml").read_text())
    assert again == cfg
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    for path in files:
        load_cfg(path)


def test_several_files_compose_in_order(tmp_path):
    row = _write(tmp_path / "row.yaml", "MODEL:\n  DEPTH: 101\n  SSM:\n    SIM: dot\n")
    shrink = _write(tmp_path / "shrink.yaml", "MODEL:\n  DEPTH: 18\n")
    cfg = load_cfg([row, shrink], ["TRAIN.EPOCHS", "1"])
    assert (cfg.MODEL.DEPTH, cfg.MODEL.SSM.SIM, cfg.TRAIN.EPOCHS) == (18, "dot", 1)


def test_config_reference_is_up_to_date():
    """docs/config_reference.md is generated from defaults.py; regenerate it when a key changes."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(REPO / "tools/config_reference.py"), "--check"], capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode()
