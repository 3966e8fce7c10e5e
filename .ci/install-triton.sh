#!/usr/bin/env bash
# Install the third-party KServe V2 servers used by tests/backends/test_triton_real.py, each in its own
# venv (their pins conflict with the gateway's own dependencies and with each other):
#   .ci-venvs/pytriton  nvidia-pytriton (ships the Triton 2.51 server binary, CPU-capable) + numpy
#   .ci-venvs/mlserver  mlserver 1.7 (+ numpy), and tritonclient[http] for cross-checking our codec
# Idempotent: a venv whose marker file exists is left as it is. Set PYTHON to choose the interpreter
# (default: python3.11 / python3). Prints the time and size of each install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="${IMAGEGATE_CI_VENVS:-$ROOT/.ci-venvs}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
PYTRITON_SPEC="${PYTRITON_SPEC:-nvidia-pytriton==0.7.0}"
MLSERVER_SPEC="${MLSERVER_SPEC:-mlserver==1.7.1}"
TRITONCLIENT_SPEC="${TRITONCLIENT_SPEC:-tritonclient[http]==2.51.0}"

mkdir -p "$VENVS"

install_venv() {  # name, marker, packages...
    local name="$1" marker="$2"; shift 2
    local dir="$VENVS/$name"
    if [[ -f "$dir/.imagegate-installed" && "$(cat "$dir/.imagegate-installed")" == "$marker" ]]; then
        echo "install-triton: $name already installed ($marker)"
        return 0
    fi
    local start=$SECONDS
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
    echo "$marker" > "$dir/.imagegate-installed"
    echo "install-triton: $name installed in $((SECONDS - start))s, $(du -sh "$dir" | cut -f1)"
}

install_venv pytriton "$PYTRITON_SPEC numpy" "$PYTRITON_SPEC" "numpy<3"
install_venv mlserver "$MLSERVER_SPEC $TRITONCLIENT_SPEC" "$MLSERVER_SPEC" "$TRITONCLIENT_SPEC" "numpy<3"
