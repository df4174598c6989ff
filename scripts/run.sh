#!/usr/bin/env bash
# The main job on its built-in default, from a fresh machine: environment (cached), release
# wheel, then `fusellm` with the given arguments (default: `fusellm run`, the built-in FuseLLM
# miniature: corpus, three tiny models, every stage, the report in ./fusellm-run/).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/setup.sh tokenizers train | tail -n 1)
if [ $# -eq 0 ]; then
    set -- run
fi
exec "$bin/fusellm" "$@"
