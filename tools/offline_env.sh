#!/usr/bin/env bash
# Run a command in this checkout on a machine with no package index and no corpus (a lent GPU
# box), from what tools/offline_wheels.py and tools/pack_prepared.py put beside it:
#
#   tools/offline_env.sh [--wheels DIR] [--prepared DIR RECIPE_DIR] COMMAND...
#   e.g. tools/offline_env.sh --wheels .whl --prepared .carry/an4 recipes/an4 recipes/an4/run_paper.sh
#
# Installs the wheels into a folder of their own (--no-index: nothing is fetched; the torch,
# numpy, ... of the machine stay), puts an `asrkd` command for this checkout on PATH, copies the
# prepared outputs into the recipe dir, then runs COMMAND.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
wheels= prepared= recipe_dir=
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --prepared) prepared=$2; recipe_dir=$3; shift 3 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--wheels DIR] [--prepared DIR RECIPE_DIR] COMMAND..." >&2; exit 1; }

site=${TMPDIR:-/tmp}/asrkd-site
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$site/bin"
printf '#!/bin/sh\nexec python3 -m asrkd.cli "$@"\n' > "$site/bin/asrkd"
chmod +x "$site/bin/asrkd"
export PATH=$site/bin:$PATH PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
if [ -n "$prepared" ]; then
  cp -a "$prepared/." "$recipe_dir/"
fi
exec "$@"
