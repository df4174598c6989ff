#!/usr/bin/env bash
# Prepares a Python environment with fusellm built in release mode, from nothing but the package
# registries. Idempotent and cached: the virtual environment is reused while the dependency lists
# in pyproject.toml are unchanged, and the Rust build reuses its target directory.
#
#   scripts/setup.sh [EXTRA ...]     e.g. scripts/setup.sh tokenizers   or   scripts/setup.sh test
#
# Environment: FUSELLM_VENV (default ~/.cache/fusellm/venv), CARGO_TARGET_DIR (default ./target),
# PYTHON (default python3). Prints the venv's bin directory as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${FUSELLM_VENV:-$HOME/.cache/fusellm/venv}
EXTRAS=("$@")

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
        --component clippy,rustfmt >&2
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi

# The dependency lists of the requested extras, resolved through self-references
# ("fusellm[a,b]"), from pyproject.toml alone (no build needed).
deps=$("$PYTHON" - "${EXTRAS[@]}" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project.get("optional-dependencies", {})
out, seen = list(project.get("dependencies", [])), set()
todo = ["build"] + sys.argv[1:]
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    if name == "build":
        out += ["maturin>=1.9,<2"]
        continue
    for dep in extras.get(name, []):
        m = re.fullmatch(r"fusellm\[([^\]]+)\]", dep.strip())
        if m:
            todo += [e.strip() for e in m.group(1).split(",")]
        else:
            out.append(dep)
print("\n".join(sorted(set(out))))
PY
)
key=$(printf '%s\n%s\n' "$("$PYTHON" --version 2>&1)" "$deps" | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
if [ "$(cat "$VENV/.fusellm-deps-$key" 2>/dev/null || true)" != "ok" ]; then
    echo "setup: installing dependencies ($key)" >&2
    mapfile -t dep_list <<<"$deps"
    "$VENV/bin/python" -m pip install -q "${dep_list[@]}" >&2
    echo ok >"$VENV/.fusellm-deps-$key"
fi

# A stale extension inside the source tree would shadow the installed wheel.
rm -f python/fusellm/_native*.so python/fusellm/_native*.pyd
rm -rf dist
echo "setup: building the release wheel" >&2
"$VENV/bin/maturin" build --release --out dist >&2
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall dist/fusellm-*.whl >&2
echo "$VENV/bin"
