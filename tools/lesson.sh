#!/usr/bin/env bash
# Rebuild lessons from their sources and execute them, in one go:
#   tools/lesson.sh 03_sparse_attention [05_data_parallelism ...]
# For each: notebooks/src/NN_x.py -> notebooks/NN_x.ipynb (tools/nb.py build), then its "Your turn"
# section (tools/add_exercises.py) and its glossary line (tools/link_glossary.py), then run top to bottom.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
for name in "$@"; do
  $PY tools/nb.py build "notebooks/src/$name.py" "notebooks/$name.ipynb"
done
$PY tools/add_exercises.py > /dev/null
$PY tools/link_glossary.py > /dev/null
for name in "$@"; do
  $PY tools/nb.py run "notebooks/$name.ipynb"
done
