"""The README's commands as written: `bash scripts/test.sh` with the default VENV, from the root.

The real script runs against stub tools (a fake .venv whose ruff, mypy, jlpm and python only log
their arguments), so this checks the script's own plumbing in a second, not the suite.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_clone(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of scripts/ with install.sh stubbed, a stub .venv, and an empty labextension/."""
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "test.sh", clone / "scripts" / "test.sh")
    _stub(clone / "scripts" / "install.sh", 'echo "install VENV=$VENV"')
    (clone / "labextension").mkdir()
    log = tmp_path / "calls.log"
    venv_bin = clone / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for tool in ("ruff", "mypy", "jlpm", "python"):
        _stub(venv_bin / tool, f'echo "{tool} $* (cwd $PWD)" >> {log}')
    # Not root here, so the script does not try to apt-get chromium.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    _stub(fake_bin / "id", "echo 1000")
    return clone, log


def test_readme_test_command_with_the_default_venv_finds_jlpm_after_cd(tmp_path):
    clone, log = _fake_clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VENV", "APWA_REQUIRE_ALL")}
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    out = subprocess.run(
        ["bash", "scripts/test.sh"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    calls = log.read_text()
    assert f"jlpm test --silent (cwd {clone / 'labextension'})" in calls
    assert "python -m pytest -m  --junitxml=" in calls
    assert f"install VENV={clone / '.venv'}" in out.stdout  # absolute, for install.sh too


def test_a_skipped_test_fails_the_run_when_everything_is_required(tmp_path):
    clone, _ = _fake_clone(tmp_path)
    real_python = shutil.which("python3") or "/usr/bin/python3"
    # python: pytest "passes" with one skipped test in its junit report; the check is real python.
    _stub(
        clone / ".venv" / "bin" / "python",
        'if [ "$1" = "-m" ]; then\n'
        '  for a in "$@"; do case $a in --junitxml=*) report="${a#--junitxml=}";; esac; done\n'
        '  echo \'<testsuites><testsuite><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><skipped message="no chromium"/></testcase>'
        '</testsuite></testsuites>\' > "$report"\n'
        "  exit 0\n"
        "fi\n"
        f'exec {real_python} "$@"',
    )
    env = {k: v for k, v in os.environ.items() if k != "VENV"}
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    env["APWA_REQUIRE_ALL"] = "1"
    out = subprocess.run(
        ["bash", "scripts/test.sh"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "1 test(s) skipped" in out.stdout and "t::b" in out.stdout
    env.pop("APWA_REQUIRE_ALL")
    out = subprocess.run(
        ["bash", "scripts/test.sh"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
