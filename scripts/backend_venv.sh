#!/usr/bin/env bash
# Shared by setup_xla.sh and setup_xpu.sh: `backend_venv DIR PACKAGE...` creates DIR (a venv, if
# missing) in the repo root, installs the pinned PACKAGEs, pytest and kpt (editable) into it, and
# sets $py to its python. Idempotent.
backend_venv() {
    local venv=$1
    shift
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$root"
    if [ ! -x "$venv/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    py="$venv/bin/python"
    pip_install --upgrade pip >/dev/null
    pip_install "$@" "pytest>=8"
    # kpt's own dependencies (torch>=2.6, triton>=3.3, ...) are met by what is installed above;
    # pip keeps the pinned torch as it is.
    pip_install -e .
}

# pip -q still warns about every package one of the configured local indexes lacks: drop those.
pip_install() {
    "$py" -m pip install -q "$@" 2> >(grep -v "is neither a file nor a directory" >&2)
}
