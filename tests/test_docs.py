"""The documentation stays true: the API reference matches the docstrings, and CI runs the README's commands."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_api_reference_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "make_api.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = next(line for line in readme.splitlines() if "pytest" in line and not line.startswith("#"))
    assert test_command.endswith("python -m pytest -q")
    assert "\npython -m pytest -q\n" in (ROOT / ".ci" / "run").read_text()


def test_readme_main_job_is_the_demo():
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 && pip install -e \".[test]\" && packcollate demo" in readme
