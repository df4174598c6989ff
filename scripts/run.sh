#!/usr/bin/env bash
# The main job on its built-in default, from a fresh machine: environment (cached), release
# wheel, then `fusellm` with the given arguments (default: the alignment demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/setup.sh tokenizers | tail -n 1)
if [ $# -eq 0 ]; then
    set -- align-demo
fi
exec "$bin/fusellm" "$@"
