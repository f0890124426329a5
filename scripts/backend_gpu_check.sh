#!/usr/bin/env bash
# Backend GPU check, for a machine with an NVIDIA GPU: start `inferno backend` on the
# sim engine, print its GPU vitals (/metrics JSON and the inferno_gpu_* telemetry
# series), then `inferno backend --gpu-report` and `inferno doctor`, then SIGTERM the
# backend and print its exit status.  Run from the repository root.
#
# The GPU machine may not reach PyPI: prepare a wheelhouse here first (pure Python)
#   echo /.backend-gpu/ >> .git/info/exclude
#   .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .backend-gpu/wheels \
#       anyio exceptiongroup h11 idna nvidia-ml-py pluggy tomlkit typing_extensions wsproto
# and send `.backend-gpu` along (the device tool's carry).  The log of the first run
# is in docs/device-logs/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
LOG="${OUT:-/tmp}/backend_gpu.log"
exec > >(tee "$LOG") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .backend-gpu/wheels/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/plugins"
export INFERNO_PLUGINS=inferno_backend.plugin
python3 --version; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 -m inferno backend --port 0 --ops-port 0 --log-format pretty --sim-speed 10 \
    2>/tmp/backend.err &
PID=$!
for i in $(seq 150); do grep -q "backend listening" /tmp/backend.err && break; sleep 0.2; done
cat /tmp/backend.err
python3 - <<'PY'
import json, re, time, urllib.request
text = open("/tmp/backend.err").read()
m = re.search(r"backend listening on ([\d.]+):(\d+) \(ops ([\d.]+):(\d+)\)", text)
svc, ops = f"http://127.0.0.1:{m.group(2)}", f"http://127.0.0.1:{m.group(4)}"
time.sleep(2.5)  # one GPU sample interval
body = json.dumps({"model": "sim-tiny", "prompt": "hi", "max_tokens": 8}).encode()
req = urllib.request.Request(svc + "/v1/completions", body, {"content-type": "application/json"})
print("completion:", urllib.request.urlopen(req, timeout=10).read().decode()[:200])
print("vitals:", urllib.request.urlopen(ops + "/metrics", timeout=10).read().decode())
tel = urllib.request.urlopen(ops + "/telemetry", timeout=10).read().decode()
print("\n".join(l for l in tel.splitlines() if l.startswith(("inferno_gpu_", "inferno_backend_gpu"))))
PY
echo "==== backend --gpu-report"
timeout 120 python3 -m inferno backend --gpu-report; echo "gpu-report exit=$?"
echo "==== doctor"
timeout 60 python3 -m inferno doctor --window 1s --samples 2 --no-matmul; echo "doctor exit=$?"
kill -TERM $PID; wait $PID; echo "backend exit=$?"
tail -4 /tmp/backend.err
