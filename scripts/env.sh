# Sourced by the scripts here: creates/updates .venv with everything rlp-dist needs, once.
# torch is pinned to 2.13.0 *first* so that pip takes the CPU build from this machine's disk
# instead of downloading a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.rlp-dist-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ]; then
  echo "rlp-dist: installing into $VENV (once; log in $VENV/install.log)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  if ! { "$VENV/bin/pip" install --upgrade pip &&
         "$VENV/bin/pip" install "torch==2.13.0" &&
         "$VENV/bin/pip" install -e "$ROOT[test]"; } > "$VENV/install.log" 2>&1; then
    tail -n 40 "$VENV/install.log" >&2
    echo "rlp-dist: installation failed; the full log is $VENV/install.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-builds its CPU shared-memory comm op once (~1-3 min); keep it in one cache.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/rlp-dist/torch_extensions}"
