"""The set-up promises of the README: one test command, matching dependency lists, executed lessons."""
import json
import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CONDA_NAMES = {"pytorch": "torch"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower()


def _pyproject_deps() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_name(d): d.replace(" ", "")[len(_name(d)):] for d in deps}


def _conda_deps() -> dict[str, str]:
    out = {}
    text = (ROOT / "environment.yml").read_text()
    for line in text[text.index("dependencies:"):].splitlines():
        m = re.match(r"^  - ([A-Za-z0-9_.-]+)(.*)$", line)  # top-level conda entries only
        if m and m.group(1) not in ("python", "pip"):
            out[CONDA_NAMES.get(m.group(1).lower(), m.group(1).lower())] = m.group(2).replace(" ", "")
    return out


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    assert _conda_deps() == _pyproject_deps()


def test_torch_requirement_cannot_pull_a_newer_release():
    spec = _pyproject_deps()["torch"]
    assert "<=2.13.0" in spec or "==2.13.0" in spec, spec


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^make \w+", readme, flags=re.M)
    assert "make test" in commands and "make lab" in commands
    assert re.search(r"^make test$", ci, flags=re.M)


def test_every_lesson_is_committed_executed_in_order():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        counts = [c.get("execution_count") for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name}: execution counts {counts}"
        for cell in code:
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            assert not errors, f"{path.name}: a committed cell raised {errors[0].get('ename')}"


def test_lessons_are_numbered_and_titled():
    for path in NOTEBOOKS:
        assert re.match(r"^\d\d_[a-z0-9_]+\.ipynb$", path.name), path.name
        first = json.loads(path.read_text())["cells"][0]
        assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ")


def test_python_dash_m_course_lists_chapters_and_device():
    out = subprocess.run([sys.executable, "-m", "course"], capture_output=True, text=True, check=True).stdout
    assert "Device:" in out and "Profile:" in out
    for path in NOTEBOOKS:
        assert path.name[:2] in out


def test_make_runs_everything_with_passive_openmp_threads(tmp_path):
    """Spinning OpenMP threads made lessons 2x slower beside one busy process (README, 'A busy machine')."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    probe = tmp_path / "probe.mk"
    probe.write_text("probe:\n\t@echo $$OMP_WAIT_POLICY\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "-f", str(probe), "probe"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "PASSIVE"
    assert "OMP_WAIT_POLICY: PASSIVE" in (ROOT / "environment.yml").read_text()
