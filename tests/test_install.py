"""bitdet installed like a library: a (non-editable) wheel carries the presets and the
shipped detector, and works from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_carries_the_presets_and_runs_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path,
                   timeout=600)
    wheel = next((tmp_path / "dist").glob("bitdet-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in sorted(p.name for p in (ROOT / "configs").glob("*.yaml")):
        assert f"bitdet/configs/{preset}" in names
    assert "bitdet/sw/assets/default.bitdet" in names
    assert {"bitdet/core/descriptor.py", "bitdet/hw/top.py", "bitdet/sim/link.py",
            "bitdet/sw/driver/device.py", "bitdet/sw/cli.py"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import sys, bitdet.core.config as c; from bitdet.sw.cli import console_main; "
            "print(c.__file__); sys.argv = ['bitdet', 'hw', 'info', '--config', 'icebreaker',"
            f" '--bundle', {str(site / 'bitdet/sw/assets/default.bitdet')!r}]; console_main()")
    run = subprocess.run([sys.executable, "-c", code], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    first, rest = run.stdout.split("\n", 1)
    assert Path(first).is_relative_to(site)          # the wheel's code, not the checkout's
    assert "icebreaker" in rest
