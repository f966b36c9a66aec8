#!/usr/bin/env bash
# Build build/oncolake.zip, the package as spark-submit --py-files ships it.
# TensorFlow, Horovod and the rest stay in the environment, not in the zip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$root/build"
out="$root/build/oncolake.zip"
# A temporary name of this process's own: two submits at once each build a
# whole zip, and the rename puts one complete file in place.
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
(cd "$root/lib" && "$root/.venv/bin/python" - "$tmp" <<'PY'
import pathlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as zf:
    for path in sorted(pathlib.Path("oncolake").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            zf.write(path)
PY
)
mv "$tmp" "$out"
echo "$out"
