# Sourced by the other scripts: creates .venv with the pinned dependencies when it is missing.
# The stamp file records the hash of the dependency files so an edit to them re-installs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
stamp_want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp_want" ]; then
  echo "Setting up $VENV (pinned torch/torchvision pair from constraints.txt)..."
  python3 -m venv "$VENV"
  # this platform's pip configuration warns once per package about its local index; keep the rest visible
  "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev]" 2>&1 \
    | { grep -v "^WARNING: Location 'file:" || true; }
  echo "$stamp_want" > "$VENV/.installed"
fi
export PATH="$VENV/bin:$PATH"
export WANDB_MODE="${WANDB_MODE:-offline}"
cd "$ROOT"
