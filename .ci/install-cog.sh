#!/usr/bin/env bash
# Install cog's Python HTTP server (the self-hosted Replicate container protocol) into its own venv,
# .ci-venvs/cog, so the cog tests can start a real server. A separate venv because cog pins its own
# server stack (coglet, pydantic ranges) and its worker spawns a bare `python`, which must be that venv's.
#
# Usage: bash .ci/install-cog.sh [PYTHON]   (PYTHON defaults to python3; the venv is reused if it works)
# The tests find the interpreter via IMAGEGATE_COG_PYTHON or .ci-venvs/cog/bin/python.
set -euo pipefail

COG_VERSION="0.23.1"
PILLOW_SPEC="pillow>=10,<13"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.ci-venvs/cog"
PY="${1:-python3}"

if [ -x "${VENV}/bin/python" ] && "${VENV}/bin/python" - <<PYEOF 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version("cog") == "${COG_VERSION}" else 1)
PYEOF
then
    echo "cog ${COG_VERSION} already installed in ${VENV}"
    exit 0
fi

rm -rf "${VENV}"
"${PY}" -m venv "${VENV}"
"${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check "cog==${COG_VERSION}" "${PILLOW_SPEC}"
"${VENV}/bin/python" -c "import cog, PIL; print('cog', cog.__version__, 'installed in ${VENV}')"
