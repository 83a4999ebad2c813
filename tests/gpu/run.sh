#!/usr/bin/env bash
# `make gpu-smoke`: install what this machine lacks from tests/gpu/wheels (offline), then run
# tests/gpu/smoke.py. Meant for the single-GPU check machine (Python 3.12 + CUDA torch, no
# network, no megatron-core); works anywhere the imports already resolve.
#
#   bash tests/gpu/run.sh [smoke.py options]      e.g. --cpu, --only parity dapo
#
# Environment: PYTHON (default python3), GPU_WHEELS (default tests/gpu/wheels, made by
# `make gpu-wheels` on a machine with network), GPU_SMOKE_TIMEOUT (hard limit, default 480 s; 1900 s with --cpu),
# OUT (if set, the result lines and the worker logs are written there).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-tests/gpu/wheels}
REQS=tests/gpu/requirements.txt

missing=$("$PYTHON" - "$REQS" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            bad.append(line)
    except PackageNotFoundError:
        bad.append(line)
print(" ".join(bad))
PY
) || missing="(packaging not importable)"

if [ -n "$missing" ]; then
    echo "gpu-smoke: installing from $WHEELS (offline): $missing"
    if [ ! -d "$WHEELS" ]; then
        echo "gpu-smoke: $WHEELS does not exist; run 'make gpu-wheels' on a machine with network" \
             "and bring the directory along (device tool: carry tests/gpu/wheels)" >&2
        exit 2
    fi
    # Resolve against what is installed (torch stays), take the rest from the wheel directory.
    if ! PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -q --no-index \
            --find-links "$WHEELS" -r "$REQS"; then
        echo "gpu-smoke: pip install from $WHEELS failed (see above)" >&2
        exit 2
    fi
fi

extra=()
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    extra=(--out "$OUT/gpu-smoke.txt" --log-dir "$OUT/gpu-smoke-logs")
fi
limit=480  # the GPU run's bound (8 minutes); a --cpu dry run on a small machine needs more
for a in "$@"; do [ "$a" = "--cpu" ] && limit=1900; done
limit=${GPU_SMOKE_TIMEOUT:-$limit}
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 15 "$limit" \
    "$PYTHON" tests/gpu/smoke.py "${extra[@]}" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu-smoke: FAIL: the whole run passed $limit s" >&2
exit $rc
