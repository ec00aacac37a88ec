"""AcceleratorConfig: validation with clear messages, presets, derived figures, fit checks."""

import json

import pytest
import torch

from bitdet.core.bundle import Bundle
from bitdet.core.config import PRESETS_DIR, AcceleratorConfig, ConfigError, load_config
from bitdet.core.golden import BinaryConvLayer


@pytest.mark.parametrize("preset", ["icebreaker", "ulx3s", "tiny"])
def test_presets_load_and_are_consistent(preset):
    config = load_config(preset)
    assert config.name == preset
    assert config.acc_width == config.max_k.bit_length()
    assert config.simd % 8 == 0
    constants = config.host_constants()
    json.dumps(constants)                       # the driver reads them as JSON
    assert constants["config_hash"] == config.config_hash()
    assert load_config(PRESETS_DIR / f"{preset}.yaml") == config


def test_simd_multiple_of_cols_accepted():
    for cols in (1, 2, 3, 4, 6, 8, 12, 24):
        assert AcceleratorConfig(simd=24, cols=cols).cols == cols


@pytest.mark.parametrize("preset", ["icebreaker", "ulx3s"])
def test_board_presets_fit_the_default_detector(preset):
    from bitdet.sw.models import BinaryDetector
    requirements = BinaryDetector().export_bundle().requirements()
    assert requirements.max_k >= 1152 and requirements.max_pixels >= 32 * 32
    assert load_config(preset).fit_problems(requirements) == []


def test_derived_figures():
    config = AcceleratorConfig(rows=8, cols=8, simd=64, clock_hz=100_000_000, baud=1_000_000)
    assert config.pes == 64
    assert config.xnor_bits_per_cycle == 4096
    assert config.peak_gops == pytest.approx(819.2)
    assert config.memory_bits()["weights"] == 8 * config.weight_depth * 64
    assert config.max_k == min(config.max_channels * 9, config.weight_depth * 64)


def test_hash_changes_with_any_field():
    a = AcceleratorConfig()
    assert a.config_hash() == AcceleratorConfig().config_hash()
    assert a.config_hash() != AcceleratorConfig(cols=8).config_hash()


@pytest.mark.parametrize(("fields", "message"), [
    ({"rows": 0}, "rows must be at least 1, not 0"),
    ({"cols": 2.5}, "cols must be an integer, not 2.5"),
    ({"simd": True}, "simd must be an integer"),
    ({"simd": 12}, "simd must be a multiple of 8"),
    ({"simd": 8, "cols": 3}, r"needs simd \(8\) to be a multiple of cols \(3\)"),
    ({"simd": 32, "cols": 64}, r"needs simd \(32\) to be a multiple of cols \(64\)"),
    ({"acc_width": 8}, "acc_width 8 cannot hold the accumulator up to"),
    ({"max_stride": 5, "max_kernel": 3}, "max_stride"),
    ({"baud": 3_000_000, "clock_hz": 12_000_000}, "needs a clock of at least 16×"),
    ({"output_bits": 5}, "output_bits must be at most 4"),
    ({"name": 3}, "name must be a string"),
])
def test_impossible_configs_fail_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        AcceleratorConfig(**fields)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("colz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown field\(s\) colz"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file or preset"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"presets: .*icebreaker"):
        load_config("no-such-preset")


def _bundle(cin, cout, kernel=3, size=8):
    w = torch.ones(cout, cin, kernel, kernel)
    t = torch.full((cout, 1), 3)
    return Bundle([BinaryConvLayer(w, t, padding=kernel // 2)], (cin, size, size))


def test_fit_problems():
    config = AcceleratorConfig(rows=2, cols=2, simd=8, weight_depth=128, threshold_depth=8,
                               activation_depth=128, max_channels=16)
    assert config.fit_problems(_bundle(8, 16).requirements()) == []
    problems = config.fit_problems(_bundle(17, 4).requirements())
    assert any("max_channels is 16" in p for p in problems)
    # 16 outputs over 2 columns = 8 tiles of 9 taps × 2 words = 144 words > 128
    problems = config.fit_problems(_bundle(16, 16).requirements())
    assert any("resident weights need 144 words per column" in p for p in problems)
    problems = config.fit_problems(_bundle(8, 4, size=12).requirements())
    assert any("largest feature map needs 144 words" in p for p in problems)
    problems = config.fit_problems(_bundle(8, 4, kernel=5).requirements())
    assert any("max_kernel is 3" in p for p in problems)


# -- YAML loading and bounds ("Nothing lost, nothing silent") ------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    (b"1: 2\n", r"field names must be strings, not 1"),
    (b"rows: 2\nrows: 4\n", r"not valid YAML \(line 2: duplicate key 'rows' \(first on line 1\)"),
    (b"", r"empty config"),
    (b"# only a comment\n", r"empty config"),
    (b"rows: \xff\n", r"not UTF-8 text \(byte 6"),
    (b"activation_depth: 1000000000000\n", r"activation_depth must be at most 4194304, not "
                                           r"1000000000000"),
    (b"weight_depth: 4194304\ncols: 256\nsimd: 1024\n", r"more than the limit of 4294967296 "
                                                        r"bits \(MAX_MEMORY_BITS\)"),
], ids=["int key", "duplicate key", "empty", "comment only", "not utf-8", "huge depth",
        "total memory"])
def test_yaml_config_problems_are_one_line_errors(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("field", ["rows", "cols", "weight_depth", "threshold_depth",
                                   "activation_depth", "max_channels", "clock_hz", "baud"])
def test_every_bounded_field_names_its_bound(field):
    from bitdet.core.config import FIELD_MAX
    with pytest.raises(ConfigError, match=rf"{field} must be at most {FIELD_MAX[field]}, not "):
        AcceleratorConfig(**{field: FIELD_MAX[field] + 1})
