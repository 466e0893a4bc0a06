# Source this to build by hand: `source scripts/env.sh && cargo build`.
# torch-sys finds libtorch through the venv's python (LIBTORCH_USE_PYTORCH in .cargo/config.toml).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$_root/.venv"
case ":$PATH:" in *":$VIRTUAL_ENV/bin:"*) ;; *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;; esac
unset _root
