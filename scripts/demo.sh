#!/usr/bin/env bash
# kpt's main job: a random-weight model from a bundled config, patched with kpt, checked against
# HF eager and timed, on whatever device is present. Extra arguments go to `python -m kpt.demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$root/scripts/setup.sh"
python -m kpt.demo "$@"
