"""``pip install .`` (not editable) ships what a run needs: the default model and the experiment files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_non_editable_install_loads_the_default_model_from_another_directory(tmp_path):
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = venv / "bin" / "python"
    torch_pin = next(line for line in (ROOT / "research" / "constraints.txt").read_text().splitlines()
                     if line.startswith("torch=="))

    def pip(*arguments: str) -> None:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *arguments], check=True, cwd=elsewhere)

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip(torch_pin)
    pip("-c", str(ROOT / "research" / "constraints.txt"), str(ROOT))
    check = textwrap.dedent("""\
        import research, research.config
        from research.models import load_model
        adapter, processor = load_model("shapes")
        print(research.__file__)
        print(adapter.num_layers, research.config.experiment_names())
        """)
    result = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert result.returncode == 0, result.stderr
    location, shape = result.stdout.strip().splitlines()[-2:]
    assert location.startswith(str(venv)), location  # the installed copy, not the clone
    assert "ablation_locations" in shape and "main_table" in shape
