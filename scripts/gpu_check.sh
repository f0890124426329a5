#!/usr/bin/env bash
# GPU check for the backend's vitals: run from the repo root on a machine with an
# NVIDIA GPU.  Prints nvidia-smi, `python -m inferno_backend.gpureport` over 3 s
# (inventory, NVML samples, PyTorch matmul throughput when torch is importable),
# one GPUSampler snapshot as JSON (what /metrics reports) and one SystemSampler
# reading.  Usually under a minute; per-step timeouts cap it near 3 minutes.
#
# Needs: python3 (3.10+) with `anyio>=4.1` and `nvidia-ml-py` (module pynvml).
# Nothing is installed from the network.  The workplace's GPU image already has
# both in its python3 (with PyTorch), so usually nothing needs preparing.  For a
# machine without them, prepare a wheelhouse here (all pure-Python wheels) and
# send it along with the repo:
#
#   echo /.gpu-wheels/ >> .git/info/exclude      # keep it out of commits
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .gpu-wheels \
#       'anyio>=4.4' 'nvidia-ml-py>=12.535' idna 'typing_extensions>=4.10' exceptiongroup
#
# and name `.gpu-wheels` in the device tool's `carry`.  The script installs them
# with `pip --target` into a scratch directory only if the imports fail.
#
# Usage:   bash scripts/gpu_check.sh          (PYTHON=/path/to/python3 to choose)
# Output is also written to $OUT/gpu_check.log when $OUT is set.
# Exit status: 0 when every step ran; 1 when a step failed (the log says which).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    exec > >(tee "${OUT}/gpu_check.log") 2>&1
fi

PY="${PYTHON:-python3}"
export PYTHONPATH="${PWD}:${PWD}/plugins${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
WHEELS="${PWD}/.gpu-wheels"
SITE="${TMPDIR:-/tmp}/inferno-gpu-site"
failed=0

step() { printf '\n==== %s\n' "$*"; }

# anyio 4.1 added abandon_on_cancel, which the sampler uses.
deps_ok() {
    "${PY}" - <<'EOF'
import sys
import anyio, pynvml  # noqa: F401
from importlib.metadata import version
major, minor = (int(p) for p in version("anyio").split(".")[:2])
sys.exit(0 if (major, minor) >= (4, 1) else 1)
EOF
}

step "host"
uname -a
"${PY}" --version || { echo "no ${PY}: set PYTHON=/path/to/python3"; exit 1; }

step "nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi || { echo "nvidia-smi failed (status $?)"; failed=1; }
else
    echo "nvidia-smi not on PATH"
fi

step "python packages"
if ! deps_ok 2>/dev/null; then
    if compgen -G "${WHEELS}/*.whl" >/dev/null; then
        echo "installing from ${WHEELS} into ${SITE}"
        "${PY}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "${SITE}" "${WHEELS}"/*.whl || exit 1
        export PYTHONPATH="${SITE}:${PYTHONPATH}"
    fi
    if ! deps_ok; then
        echo "python3 lacks anyio>=4.1 or nvidia-ml-py and no usable ${WHEELS}: see this script's header"
        exit 1
    fi
fi
"${PY}" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for name in ("anyio", "nvidia-ml-py", "torch"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name} not installed")
EOF

step "gpu report (python -m inferno_backend.gpureport --window 3)"
timeout 120 "${PY}" -m inferno_backend.gpureport --window 3 --samples 5 \
    || { echo "gpu report failed (status $?)"; failed=1; }

step "GPUSampler snapshot (python -m inferno_backend.gpu)"
timeout 30 "${PY}" -m inferno_backend.gpu || { echo "GPU snapshot failed (status $?)"; failed=1; }

step "SystemSampler reading over 1 s"
timeout 15 "${PY}" - <<'EOF' || { echo "system reading failed (status $?)"; failed=1; }
import json
import time

from inferno_backend.system import SystemSampler

sampler = SystemSampler()
time.sleep(1.0)
print(json.dumps(sampler.sample().as_dict(), indent=2))
EOF

step "done: $([ "${failed}" = 0 ] && echo "every step ran" || echo "a step FAILED")"
exit "${failed}"
