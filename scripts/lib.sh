# shellcheck shell=bash disable=SC2034
# Shared by scripts/*.sh and .ci/run (sourced, not run).

# Guests built for wasm32-wasip2. One list, so that building, linting and excluding them
# from the native test run cannot drift apart when a guest is added.
GUESTS=(kvstore diskstorage faulty notfsm)
WASM_TARGET=wasm32-wasip2
WASM_OUT=target/$WASM_TARGET/release

# `-p a -p b ...` for cargo.
guest_package_args() {
  local g
  for g in "${GUESTS[@]}"; do
    printf -- '-p\n%s\n' "$g"
  done
}

# `--exclude a --exclude b ...` for cargo with --workspace.
guest_exclude_args() {
  local g
  for g in "${GUESTS[@]}"; do
    printf -- '--exclude\n%s\n' "$g"
  done
}

ensure_wasm_target() {
  if ! rustup target list --installed | grep -qx "$WASM_TARGET"; then
    rustup target add "$WASM_TARGET"
  fi
}
