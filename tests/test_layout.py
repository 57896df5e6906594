"""The repository layout of DESIGN.md: namespace portions that never shadow the stdlib."""

import subprocess
import sys

from conftest import REPO

PORTIONS = ("platform", "model", "pipelines")


def test_portions_have_no_init_file():
    offenders = [p for p in PORTIONS if (REPO / p / "__init__.py").exists()]
    assert not offenders, (
        f"{offenders} gained an __init__.py: with the repository root on sys.path it shadows "
        "the standard library (platform) and breaks torch and Ray. Remove it."
    )


def test_stdlib_platform_wins_with_repo_on_path():
    code = (
        "import platform, torch, raytron.platform.config;"
        "assert hasattr(platform, 'system'), platform.__file__; print(platform.system())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
