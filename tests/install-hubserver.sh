#!/usr/bin/env bash
# Installs olah, the self-hosted Hugging Face Hub server that tests/hubserver.py runs, into its own virtual
# environment (.venv/hubserver, ignored with .venv/), apart from the project's, so its web stack (fastapi, uvicorn,
# ...) never mixes with the huggingface_hub client under test. Idempotent: does nothing when it is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OLAH_VERSION=0.5.4
VENV="${AMDET_HUBSERVER_VENV:-.venv/hubserver}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$OLAH_VERSION" <<'PY' 2>/dev/null; then
import importlib.metadata, sys
sys.exit(importlib.metadata.version("olah") != sys.argv[1])
PY
  echo "hub server: olah $OLAH_VERSION already in $VENV"
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "olah==$OLAH_VERSION"
"$VENV/bin/python" -c "import olah.server" >/dev/null
echo "hub server: installed olah $OLAH_VERSION in $VENV"
