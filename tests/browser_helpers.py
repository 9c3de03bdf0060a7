"""Helpers for tests/test_browser.py: what a saved notebook should show, which cells an explorer
needs, and a JupyterLab server started from this environment on a free port.

Nothing here needs a browser, so the notebook-reading parts are tested without one.
"""
import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
CONTROLS = ("DropdownModel", "IntSliderModel", "FloatSliderModel", "SelectionSliderModel",
            "ToggleButtonsModel", "RadioButtonsModel", "SelectModel", "CheckboxModel", "IntTextModel")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# ---------------------------------------------------------------- what the saved file promises

@dataclass
class Expected:
    """What a trusted, kernel-less JupyterLab should draw for one saved notebook."""
    code_cells: int
    images: int                       # PNG outputs of cells + PNGs inside saved Output widgets shown
    widget_outputs: list[tuple[int, str]] = field(default_factory=list)  # (cell index, model id)
    explorers: list[int] = field(default_factory=list)                   # cell indices


def _models_under(state: dict, model_id: str) -> list[dict]:
    seen, todo, found = set(), [model_id], []
    while todo:
        mid = todo.pop()
        if mid in seen or mid not in state:
            continue
        seen.add(mid)
        found.append(state[mid])
        text = json.dumps(state[mid].get("state", {}))
        todo += [part.split('"')[0] for part in text.split("IPY_MODEL_")[1:]]
    return found


def expected(nb: dict) -> Expected:
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    exp = Expected(code_cells=len(code), images=0)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW not in data:
                exp.images += "image/png" in data
                continue
            mid = data[WIDGET_VIEW]["model_id"]
            exp.widget_outputs.append((i, mid))
            models = _models_under(state, mid)
            exp.images += sum("image/png" in o.get("data", {}) for m in models
                              if m["model_name"] == "OutputModel" for o in m["state"].get("outputs", []))
            names = {m["model_name"] for m in models}
            is_interact = "".join(data.get("text/plain", "")).startswith("interactive(")  # ipywidgets.interactive
            if is_interact or (names & set(CONTROLS) and "OutputModel" in names):
                exp.explorers.append(i)
    return exp


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- which cells an explorer needs

def _bound_reads(stmt: ast.AST) -> tuple[set[str], set[str], set[str]]:
    """(names a statement binds, names it reads, names local to it: loop, comprehension, with/except
    targets, parameters and the bodies' own definitions, which its reads do not need from outside)."""
    bound, reads, local = set(), set(), set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name):
            (reads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            local.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            local.add(node.name)
        elif isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Store):
            base = node.value  # `x.a = ...`, `x[k] = ...` change x: the cell is needed for x
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name):
                bound.add(base.id)
                reads.add(base.id)
        if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            local |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            local |= {n.id for n in ast.walk(node.optional_vars) if isinstance(n, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = {n.id for body in ([node.body] if isinstance(node, ast.Lambda) else node.body)
                     for n in ast.walk(body) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
            local |= inner  # a function's own variables are neither read from, nor bound in, the cell
    bound -= local - {stmt.name} if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)) else local
    return bound, reads, local


def cell_names(source: str) -> tuple[set[str], set[str]]:
    """(names a cell binds, names it reads from before it: read by a statement before any earlier
    statement of the cell bound them, e.g. `x = f(x)` reads x)."""
    bound, free = set(), set()
    for stmt in ast.parse(source).body:
        b, r, local = _bound_reads(stmt)
        free |= r - bound - local
        bound |= b
    return bound, free


def cells_needed(sources: list[str], target: int) -> list[int]:
    """The cells to run, in order, so that cell `target` finds every name it reads: walking back,
    a cell is taken when it binds a name still needed (the latest binding wins, and changing an
    attribute or item of a name counts as binding it); the names it reads are then needed too.
    A cell that does not parse (an IPython magic) makes every earlier cell needed."""
    try:
        names = [cell_names(s) for s in sources[:target + 1]]
    except SyntaxError:
        return list(range(target + 1))
    needed, taken = set(names[target][1]), [target]
    for i in range(target - 1, -1, -1):
        bound, free = names[i]
        if bound & needed:
            taken.append(i)
            needed = (needed - bound) | free
    return sorted(taken)


# ---------------------------------------------------------------- browser and server

def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Settings for a test-only JupyterLab: every cell drawn at once (no lazy windowing, so images
# and widgets far down the notebook are in the page), no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}


class Lab:
    """`python -m jupyter lab` from this environment, on a free local port, with its own token,
    config, data (so its own trust database), settings and workspace folders under `root`. Its
    kernels run under COURSE_PROFILE=smoke (course.device): what an explorer is checked for is that
    it draws and redraws, and the cells before it train at tiny sizes instead of the lesson's."""

    def __init__(self, root: Path, repo: Path):
        self.root, self.port, self.token = root, free_port(), os.urandom(16).hex()
        for sub in ("config", "data", "runtime", "workspaces"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for name, value in LAB_SETTINGS.items():
            path = root / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        self.env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "config"),
                    "JUPYTER_DATA_DIR": str(root / "data"), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
                    "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"),
                    "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"),
                    "COURSE_PROFILE": "smoke",  # kernels run a lesson's code at tiny sizes: drawing, not learning
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        self.log = root / "lab.log"
        self.proc = None

    def trust(self, paths: list[Path]) -> None:
        """What the Makefile's set-up does for the lessons: `jupyter trust notebooks/*.ipynb`."""
        subprocess.run([sys.executable, "-m", "jupyter", "trust", *map(str, paths)], env=self.env,
                       check=True, capture_output=True, timeout=120)

    def start(self, timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                self.api("status")
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?reset&token={self.token}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return json.loads(body) if body else None

    def shutdown_kernels(self, timeout: float = 60) -> None:
        """Shut down every kernel the pages started. On CI the kernel list once answered 500 right
        after a page closed (jupyter_server 2 gives a kernel its `last_activity` only once its start
        has returned, and a list in between fails); a kernel already gone answers 404. Both are
        retried until `timeout`, then the error says what the server answered, with its log."""
        deadline = time.time() + timeout
        while True:
            try:
                kernels = self.api("kernels")
                for k in kernels:
                    try:
                        self.api(f"kernels/{k['id']}", method="DELETE")
                    except urllib.error.HTTPError as e:
                        if e.code != 404:
                            raise
                if not kernels:
                    return
                problem = f"kernels still listed after their shutdown: {[k['id'] for k in kernels]}"
            except urllib.error.HTTPError as e:
                problem = f"the kernel list answered {e.code} {e.read()[:2000]!r}"
            if time.time() > deadline:
                raise RuntimeError(f"{problem}, for {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
