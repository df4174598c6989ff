#!/usr/bin/env bash
# The whole test suite, from a fresh machine: environment (cached), release wheel, then Rust
# tests, lints, the stub check and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/setup.sh test | tail -n 1)
export PATH="$bin:$PATH"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}

echo "== cargo fmt"; cargo fmt --all --check
echo "== cargo clippy"; cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"; cargo test -p fusellm-core --quiet
echo "== ruff"; ruff check python tests benches; ruff format --check python tests benches
echo "== stubtest"; python -m mypy.stubtest fusellm._native --ignore-missing-stub
echo "== pytest"
# Run from outside the source tree so that the installed wheel, not python/, is imported.
python -m pytest -p no:cacheprovider --rootdir "$PWD" -c "$PWD/pyproject.toml" "$PWD/tests" "$@"
