"""The lessons as a learner sees them: JupyterLab 4, from this environment, in Chromium.

A JupyterLab server (free local port, its own token, config, trust database and settings) serves a
temporary copy of notebooks/*.ipynb, trusted the way `make setup` trusts them; Playwright drives
the system's Chromium (never a downloaded one). Checked:

- every lesson, before any cell runs: no error output, every saved figure drawn (as many loaded
  <img> as the file has PNG outputs, those inside saved widget outputs included), every widget
  output drawn from the saved widget state (no "Error displaying widget", no raw
  `interactive(children=...` text), no progress bar shown short of its end;
- trust is what makes the saved widgets show: an untrusted copy shows the raw text, and the same
  file shows the widget once `jupyter trust` signed it;
- every explorer (an ipywidgets output with a slider or dropdown and an Output), after running the
  cells it needs in the page: it draws, and a dropdown change and a slider change each redraw it
  (the figure's image changes; an explorer without a figure must change its text).

"The cells it needs" are the explorer's cell and the earlier cells that bind the names it reads
(tests/browser_helpers.cells_needed): running whole lessons would take minutes each, and the saved
widget state cannot show a redraw, which needs a kernel. The kernels run under
COURSE_PROFILE=smoke, so the models those cells train are tiny: nbval runs every lesson at its real
sizes, and this test is about what the page draws.

COURSE_BROWSER_NOTEBOOKS=<folder> checks another folder's notebooks (e.g. a re-executed copy).
Screenshots of failures go to the folder named in the failure message.
"""
import contextlib
import http.server
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from browser_helpers import Lab, cells_needed, expected, find_chromium, read, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(os.environ.get("COURSE_BROWSER_NOTEBOOKS", ROOT / "notebooks"))
LESSONS = sorted(SOURCE.glob("*.ipynb"))
EXPECT = {p.name: expected(read(p)) for p in LESSONS}
EXPLORERS = [(p.name, i) for p in LESSONS for i in EXPECT[p.name].explorers]
WIDGET_LESSON = next((p.name for p in LESSONS if EXPECT[p.name].explorers),  # else any widget output
                     next((p.name for p in LESSONS if EXPECT[p.name].widget_outputs), None))

CELLS = ".jp-Notebook .jp-Cell"
PROGRESS = re.compile(r"(\d+)/(\d+)[\s\u2007]*\[\d")  # tqdm's "n/total [elapsed<...", text or widget
OPEN_S, RUN_S, REDRAW_S = 90, 600, 120  # generous: a busy 2-core machine; lesson cells run minutes at most

# One JavaScript snapshot of what the page shows, per cell: top-level outputs with their MIME type,
# text and whether they hold a drawn widget; every <img> in outputs, with its natural size.
SNAPSHOT_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell')).map(cell => ({
    prompt: (cell.querySelector('.jp-InputPrompt') || {}).textContent || '',
    outputs: Array.from(cell.querySelectorAll('.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output'))
        .map(o => ({mime: o.getAttribute('data-mime-type'), text: o.textContent,
                    widget: !!o.querySelector('.jupyter-widgets, [class*="widget-"]')
                            && !o.textContent.includes('Error displaying widget')})),
    images: Array.from(cell.querySelectorAll('.jp-OutputArea-output img'))
        .map(i => ({src: i.src, w: i.complete ? i.naturalWidth : 0, h: i.complete ? i.naturalHeight : 0})),
}))"""


# ---------------------------------------------------------------------------- unit tests, no browser

def test_cells_needed_follows_the_names_back():
    cells = ["import math\nimport torch", "data = load()", "x = 1", "model = make(data)\nmodel.eval()",
             "fig, ax = plot(x)", "model.head = torch.nn.Identity()", "y = 2",
             "def show(layer):\n    out = math.sqrt(layer)\n    print(model, out)\n\nexplore(show)"]
    assert cells_needed(cells, 7) == [0, 1, 3, 5, 7]
    assert cells_needed(cells + ["x = f(x)"], 8) == [2, 8]
    assert cells_needed(["a = 1", "%time b = 2", "a"], 2) == [0, 1, 2]  # a magic: take everything


class _FakeKernelsAPI(http.server.BaseHTTPRequestHandler):
    """jupyter_server's /api/kernels as CI saw it: a 500 while a kernel starts (it has no model yet),
    then the kernel, which a DELETE removes."""
    script: list = []   # the answers to GET /api/kernels, in turn; the last one repeats
    deleted: list = []

    def do_GET(self):
        code, body = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if code == 200 and self.deleted:
            body = [k for k in body if k["id"] not in self.deleted]
        self._answer(code, body)

    def do_DELETE(self):
        self.deleted.append(self.path.rsplit("/", 1)[-1])
        self._answer(204, None)

    def _answer(self, code, body):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _fake_lab(tmp_path, script):
    _FakeKernelsAPI.script, _FakeKernelsAPI.deleted = list(script), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeKernelsAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lab = Lab(tmp_path, ROOT)
    lab.port = server.server_address[1]
    lab.log.write_text("(the fake server's log)")
    try:
        yield lab
    finally:
        server.shutdown()


def test_kernels_are_shut_down_through_a_starting_kernels_500(tmp_path):
    starting = (500, {"message": "Internal Server Error"})
    with _fake_lab(tmp_path, [starting, starting, (200, [{"id": "k1"}])]) as lab:
        lab.shutdown_kernels(timeout=30)
    assert _FakeKernelsAPI.deleted == ["k1"]


def test_a_kernel_list_that_keeps_failing_is_a_clear_error(tmp_path):
    with _fake_lab(tmp_path, [(500, {"message": "broken"})]) as lab:
        t0 = time.time()
        with pytest.raises(RuntimeError, match=r"the kernel list answered 500 .*broken.*for 1 s"):
            lab.shutdown_kernels(timeout=1)
        assert time.time() - t0 < 10


def test_explorers_are_found_in_the_lessons():
    found = {name for name, _ in EXPLORERS}
    assert len(found) >= 3, f"expected at least 3 lessons with an explorer, found {sorted(found)}"


# ---------------------------------------------------------------------------- the browser and the server

@pytest.fixture(scope="module")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test needs Playwright: `make setup` installs it where a Chromium is found, "
                    "or `.venv/bin/pip install -e '.[browser]'` (never `playwright install`)")
    exe = find_chromium()
    if exe is None:
        pytest.skip("browser test needs Chromium: `apt-get install chromium` (Debian/Ubuntu), "
                    "or CHROMIUM=/path/to/chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def lab(chromium, tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    for path in LESSONS:
        shutil.copy(path, root / "notebooks")
    server = Lab(root, ROOT)
    server.trust(sorted((root / "notebooks").glob("*.ipynb")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("COURSE_BROWSER_SHOTS") or tmp_path_factory.mktemp("browser-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def context(chromium, lab):
    ctx = chromium.new_context(viewport={"width": 1280, "height": 1000})  # one HTTP cache for all pages
    yield ctx
    ctx.close()


@pytest.fixture
def page(context, lab):
    pg = context.new_page()
    yield pg
    pg.close()
    lab.shutdown_kernels()


@contextlib.contextmanager
def screenshot_on_failure(page, shots: Path, name: str):
    try:
        yield
    except Exception as e:
        path = shots / f"{name}.png"
        try:
            page.screenshot(path=str(path))
            where = f"screenshot: {path}"
        except Exception as shot_error:  # the page itself may be gone
            where = f"no screenshot ({shot_error}); folder {shots}"
        raise AssertionError(f"{e}\n{where}") from e


def open_notebook(page, lab, rel: str, n_cells: int) -> None:
    """Open in JupyterLab, wait for every cell and for the kernel to be idle (widgets restore then)."""
    page.goto(lab.url(f"lab/tree/{rel}"))
    page.wait_for_function(f"n => document.querySelectorAll('{CELLS}').length === n", arg=n_cells,
                           timeout=OPEN_S * 1000)
    page.wait_for_function("() => (document.querySelector('.jp-Notebook-ExecutionIndicator') || {dataset: {}})"
                           ".dataset.status === 'idle'", timeout=OPEN_S * 1000)


def clear_all_outputs(page) -> None:
    """Edit > Clear Outputs of All Cells, as a learner would."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Edit").click()
    page.locator(".lm-Menu-itemLabel", has_text="Clear Outputs of All Cells").click()
    wait_for(page, f"() => Array.from(document.querySelectorAll('{CELLS} .jp-InputPrompt'))"
             ".every(p => !/\\d/.test(p.textContent))", None, OPEN_S, "prompts cleared")


PROMPT_JS = "([i, text]) => document.querySelectorAll('.jp-Notebook .jp-Cell')[i]" \
            ".querySelector('.jp-InputPrompt').textContent.trim()"


def run_cell(page, i: int, k: int, what: str) -> None:
    """Select cell i, press Ctrl+Enter (run it, stay on it), wait until a fresh kernel numbers it [k]."""
    cell = page.locator(CELLS).nth(i)
    for _ in range(3):  # a key press can land before the notebook takes focus: press again
        cell.locator(".jp-InputPrompt").first.click()
        page.keyboard.press("Control+Enter")
        try:
            page.wait_for_function(f"a => ['[*]:', `[${{a[1]}}]:`].includes(({PROMPT_JS})(a))", arg=[i, k],
                                   timeout=10_000)
            break
        except Exception:
            continue
    else:
        raise AssertionError(f"{what}: Ctrl+Enter did not start it")
    wait_for(page, f"a => ({PROMPT_JS})(a) === `[${{a[1]}}]:`", [i, k], RUN_S, f"{what} to run as [{k}]")


def wait_for(page, predicate_js: str, arg, timeout_s: float, what: str) -> None:
    try:
        page.wait_for_function(predicate_js, arg=arg, timeout=timeout_s * 1000)
    except Exception as e:
        raise AssertionError(f"{what}: not seen within {timeout_s:.0f} s") from e


def errors_shown(snapshot, cells=None) -> list[str]:
    return [f"cell {i}: {o['text'][:300]}" for i, c in enumerate(snapshot) if cells is None or i in cells
            for o in c["outputs"] if o["mime"] == "application/vnd.jupyter.stderr"
            and "Traceback (most recent call last)" in o["text"]]


# ---------------------------------------------------------------------------- saved lessons, no kernel run

WIDGETS_SETTLED_JS = """([cells, n]) => { const all = document.querySelectorAll('.jp-Notebook .jp-Cell');
    return cells.every(i => Array.from(all[i].querySelectorAll(
        '.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output')).some(o =>
        o.textContent.includes('Error displaying widget') || o.querySelector('.jupyter-widgets, [class*="widget-"]')))
      && Array.from(document.querySelectorAll('.jp-OutputArea-output img')).filter(
        i => i.complete && i.naturalWidth > 0).length >= n }"""


@pytest.mark.parametrize("name", [p.name for p in LESSONS])
def test_saved_lesson_renders(page, lab, shots, name):
    exp = EXPECT[name]
    nb = read(SOURCE / name)
    with screenshot_on_failure(page, shots, f"saved-{Path(name).stem}"):
        open_notebook(page, lab, f"notebooks/{name}", len(nb["cells"]))
        widget_cells = sorted({i for i, _ in exp.widget_outputs})
        try:
            page.wait_for_function(WIDGETS_SETTLED_JS, arg=[widget_cells, exp.images], timeout=OPEN_S * 1000)
        except Exception:
            pass  # the assertions below say what is missing
        snap = page.evaluate(SNAPSHOT_JS)
        assert not errors_shown(snap), f"{name}: error outputs shown: {errors_shown(snap)}"
        broken = [f"cell {i}: {o['text'][:120]!r}" for i, c in enumerate(snap) for o in c["outputs"]
                  if "Error displaying widget" in o["text"] or o["text"].startswith("interactive(children=")]
        assert not broken, f"{name}: widget outputs not drawn from the saved widget state: {broken}"
        drawn = [i for i, c in enumerate(snap) for o in c["outputs"] if o["widget"]]
        want = [i for i, _ in exp.widget_outputs]
        assert sorted(drawn) == sorted(want), f"{name}: widgets drawn in cells {drawn}, the file has them in {want}"
        frozen = [f"cell {i}: {m.group(0)}" for i, c in enumerate(snap) for o in c["outputs"]
                  for m in PROGRESS.finditer(o["text"]) if int(m.group(1)) < int(m.group(2))]
        assert not frozen, f"{name}: progress bars shown short of their end: {frozen}"
        images = [im for c in snap for im in c["images"]]
        blank = [im["src"][:60] for im in images if not (im["w"] > 0 and im["h"] > 0)]
        assert not blank, f"{name}: images that did not load: {blank}"
        assert len(images) == exp.images, (f"{name}: {len(images)} images drawn, the file holds {exp.images} "
                                           "PNG outputs (with those inside saved widget outputs)")


@pytest.mark.skipif(WIDGET_LESSON is None, reason="no lesson has a widget output")
def test_trust_is_what_shows_saved_widgets(page, lab, shots):
    """An untrusted lesson shows each widget as its text fallback; `jupyter trust` (the set-up's step)
    makes the same file show the widgets from its saved state."""
    nb = read(SOURCE / WIDGET_LESSON)
    folder = lab.root / "untrusted"
    folder.mkdir(exist_ok=True)
    copy = folder / WIDGET_LESSON
    # a different file from the trusted copy (trust is recorded per content), same cells and state
    copy.write_text(json.dumps({**nb, "metadata": {**nb["metadata"], "untrusted_copy": True}}, indent=1))
    widget_cells = sorted({i for i, _ in EXPECT[WIDGET_LESSON].widget_outputs})
    with screenshot_on_failure(page, shots, "untrusted"):
        open_notebook(page, lab, f"untrusted/{WIDGET_LESSON}", len(nb["cells"]))
        time.sleep(2)  # no widget is to come: give a wrongly drawn one the time to appear
        snap = page.evaluate(SNAPSHOT_JS)
        drawn = [i for i, c in enumerate(snap) for o in c["outputs"] if o["widget"]]
        assert drawn == [], f"untrusted {WIDGET_LESSON}: widgets drawn in cells {drawn}"
        for i, mid in EXPECT[WIDGET_LESSON].widget_outputs:
            fallback = next("".join(o["data"].get("text/plain", "")) for o in nb["cells"][i]["outputs"]
                            if o.get("data", {}).get("application/vnd.jupyter.widget-view+json", {}).get("model_id") == mid)
            assert any(o["text"].strip() == fallback.strip() for o in snap[i]["outputs"]), \
                f"untrusted {WIDGET_LESSON}: cell {i} does not show the text {fallback[:60]!r}: {snap[i]['outputs']}"
    lab.trust([copy])
    with screenshot_on_failure(page, shots, "trusted"):
        open_notebook(page, lab, f"untrusted/{WIDGET_LESSON}", len(nb["cells"]))
        wait_for(page, WIDGETS_SETTLED_JS, [widget_cells, 0], OPEN_S, f"widgets of trusted {WIDGET_LESSON}")
        snap = page.evaluate(SNAPSHOT_JS)
        drawn = sorted({i for i, c in enumerate(snap) for o in c["outputs"] if o["widget"]})
        assert drawn == widget_cells, f"trusted {WIDGET_LESSON}: widgets drawn in cells {drawn}, file: {widget_cells}"


# ---------------------------------------------------------------------------- explorers, live

def _explorer_view(page, cell: int) -> dict:
    """What the explorer in `cell` shows now: its images (src) and the text of its output."""
    return page.evaluate("""i => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
        const outs = Array.from(c.querySelectorAll('.widget-output, .jupyter-widgets-output-area'));
        return {images: Array.from(c.querySelectorAll('.jp-OutputArea-output img'))
                          .filter(im => im.complete && im.naturalWidth > 0).map(im => im.src),
                text: outs.map(o => o.textContent).join('|'),
                controls: c.querySelectorAll('select, .noUi-handle').length} }""", cell)


def _wait_for_change(page, cell: int, before: dict, what: str) -> dict:
    key = "images" if before["images"] else "text"
    wait_for(page, """([i, key, old]) => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
        if (key === 'images') { const ims = Array.from(c.querySelectorAll('.jp-OutputArea-output img'))
              .filter(im => im.complete && im.naturalWidth > 0).map(im => im.src);
            return ims.length > 0 && ims.join() !== old.join(); }
        const t = Array.from(c.querySelectorAll('.widget-output, .jupyter-widgets-output-area'))
              .map(o => o.textContent).join('|');
        return t.length > 0 && t !== old }""", [cell, key, before[key]], REDRAW_S,
             f"cell {cell}: {what} to redraw the explorer's {'figure' if key == 'images' else 'text'}")
    return _explorer_view(page, cell)


@pytest.mark.parametrize("name,cell", EXPLORERS, ids=[f"{n}-cell{c}" for n, c in EXPLORERS])
def test_explorer_redraws_after_running(page, lab, shots, name, cell):
    nb = read(SOURCE / name)
    sources = ["".join(c["source"]) if c["cell_type"] == "code" else "" for c in nb["cells"]]
    run = cells_needed(sources, cell)
    with screenshot_on_failure(page, shots, f"explorer-{Path(name).stem}-cell{cell}"):
        open_notebook(page, lab, f"notebooks/{name}", len(nb["cells"]))
        start = time.time()
        clear_all_outputs(page)  # prompts read "[ ]:" again, so a stale "[n]:" is never taken for a run
        for k, i in enumerate(run, start=1):
            run_cell(page, i, k, f"{name}: cell {i} (of cells {run})")
        ran_s = time.time() - start
        page.locator(CELLS).nth(cell).scroll_into_view_if_needed()
        wait_for(page, """i => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
            return c.querySelector('select, .noUi-handle') && (c.querySelector('.jp-OutputArea-output img')
                || Array.from(c.querySelectorAll('.widget-output')).some(o => o.textContent.trim())) }""",
                 cell, REDRAW_S, f"{name}: the explorer in cell {cell} (controls and a first drawing)")
        snap = page.evaluate(SNAPSHOT_JS)
        assert not errors_shown(snap, run), f"{name}: errors after running cells {run}: {errors_shown(snap, run)}"
        assert not any("Error displaying widget" in o["text"] or o["text"].startswith("interactive(children=")
                       for o in snap[cell]["outputs"]), f"{name}: cell {cell} output: {snap[cell]['outputs']}"
        view = _explorer_view(page, cell)
        explorer = page.locator(CELLS).nth(cell)
        changed = []
        selects = explorer.locator("select")
        if selects.count():
            options = selects.first.locator("option").count()
            index = selects.first.evaluate("s => s.selectedIndex")
            selects.first.select_option(index=(index + 1) % options)
            view = _wait_for_change(page, cell, view, "a dropdown change")
            changed.append("dropdown")
        handles = explorer.locator(".noUi-handle")
        if handles.count():
            handle = handles.first
            at_max = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
            handle.focus()
            page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
            view = _wait_for_change(page, cell, view, "a slider step")
            changed.append("slider")
        assert changed, f"{name}: the explorer in cell {cell} has no dropdown or slider"
        snap = page.evaluate(SNAPSHOT_JS)
        assert not errors_shown(snap, [cell]), f"{name}: errors after changing controls: {errors_shown(snap, [cell])}"
        print(f"{name} cell {cell}: ran cells {run} in {ran_s:.0f} s; {' and '.join(changed)} redrew it")
