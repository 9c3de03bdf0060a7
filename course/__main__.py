"""`python -m course`: the chapters, the detected device and size profile.
`python -m course run 03`: execute lesson 03 headless (a copy goes to runs/, the lesson is untouched).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def chapters() -> dict[str, Path]:
    """Lesson number ('00', '01', ...) -> notebook path, from the notebooks/ folder."""
    return {p.name[:2]: p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))}


def _title(path: Path) -> str:
    cells = json.loads(path.read_text()).get("cells", [])
    for cell in cells:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("#"):
                    return line.lstrip("# ").strip()
    return path.stem


def run_notebook(number: str, out_dir: Path = Path("runs"), timeout: int = 1800) -> Path:
    import nbformat
    from nbconvert.preprocessors import ExecutePreprocessor
    found = chapters()
    if number not in found:
        raise SystemExit(f"unknown chapter {number!r}; available: {', '.join(found)}")
    src = found[number]
    nb = nbformat.read(src, as_version=4)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the kernel's threads sleep, not spin (README)
    start = time.time()
    ExecutePreprocessor(timeout=timeout, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(src.parent)}})
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / src.name
    nbformat.write(nb, out)
    print(f"{src.name}: ran top to bottom in {time.time() - start:.0f} s -> {out}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="execute a lesson notebook headless")
    run.add_argument("chapter", help="lesson number, e.g. 00")
    run.add_argument("--out", default="runs", help="folder for the executed copy (default: runs/)")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run_notebook(args.chapter, Path(args.out))
        return 0

    from .device import machine_info, profile
    print("course: how GPT-3-scale transformers are trained, built and measured\n\nChapters:")
    for number, path in chapters().items():
        print(f"  {number}  {_title(path)}   ({path.relative_to(NOTEBOOKS.parent)})")
    info = machine_info()
    print(f"\nDevice:  {info['device']} ({info['device_name']}), {info['cores']} cores, torch {info['torch']}")
    print(f"Profile: {profile()!r}")
    print("\nRun one headless:  python -m course run 00")
    return 0


if __name__ == "__main__":
    sys.exit(main())
