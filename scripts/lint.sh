#!/usr/bin/env bash
# Lint and type-check flowbus; the test command (scripts/dev.sh test) runs this before pytest.
#   bash scripts/lint.sh      (after bash scripts/dev.sh setup; exit 0 only when every check passed)
#
# 1. ruff check over the code folders (rules and the reason for each ignore: pyproject.toml).
# 2. mypy strict over the import package `flowbus`. Its subpackages live in top-level folders
#    (pyproject's [tool.setuptools.package-dir]), which mypy cannot map, so it reads a tree of
#    symlinks laid out as the installed package: .lint/tree/flowbus/{__init__.py,...,bus,schemas,...}.
# 3. mypy over tests/ and bench/, relaxed (docs/notes/style.md item 15). Their modules are top-level
#    (test files in folders without __init__, support/ and bench/_common: tests/ and bench/ are on sys.path), which a [[tool.mypy.overrides]]
#    section cannot select by folder, so the relaxation is given here as flags; flowbus is read but
#    not reported again (--follow-imports=silent).
# Everything it writes is under .lint/ (ignored): the tree and the caches.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
for tool in ruff mypy; do
  [ -x "$BIN/$tool" ] || { echo "lint.sh: $BIN/$tool missing: run bash scripts/dev.sh setup" >&2; exit 2; }
done

WORK=$ROOT/.lint
TREE=$WORK/tree
CODE=(flowbus schemas bus services actors tests bench)

# the symlink tree, and a sed script that maps its paths in mypy's output back to the repository's
rm -rf "$TREE"
mkdir -p "$TREE"
SED=$("$BIN/python" - "$ROOT" "$TREE" <<'EOF'
import os, sys, tomllib
root, tree = sys.argv[1:]
with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
pkg = os.path.join(tree, "flowbus")
os.makedirs(pkg)
for name in sorted(os.listdir(os.path.join(root, dirs["flowbus"]))):
    if name != "__pycache__":
        os.symlink(os.path.join(root, dirs["flowbus"], name), os.path.join(pkg, name))
sed = []
for dotted, folder in sorted(dirs.items()):
    parts = dotted.split(".")
    if parts == ["flowbus"]:
        continue
    assert parts[0] == "flowbus" and len(parts) == 2, f"lint.sh cannot map package-dir {dotted!r}"
    os.symlink(os.path.join(root, folder), os.path.join(pkg, parts[1]))
    sed.append(f"s#^flowbus/{parts[1]}/#{folder}/#")
for folder in ("tests", "bench"):
    os.symlink(os.path.join(root, folder), os.path.join(tree, folder))
print(";".join(sed))
EOF
)

failed=()
summary=()

echo "== ruff check ${CODE[*]}"
if "$BIN/ruff" check --no-fix --output-format concise "${CODE[@]}"; then
  summary+=("ruff: ok")
else
  failed+=(ruff); summary+=("ruff: FAILED")
fi

# mypy: run from the tree (its current directory is on mypy's search path: only `flowbus` is there)
run_mypy() {  # label, then mypy arguments
  local label=$1 out rc=0
  shift
  echo "== mypy $label"
  out=$(cd "$TREE" && "$BIN/mypy" --config-file "$ROOT/pyproject.toml" "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | sed -e "$SED"
  if [ "$rc" = 0 ]; then
    summary+=("mypy $label: ok")
  else
    failed+=("mypy $label"); summary+=("mypy $label: FAILED ($(printf '%s\n' "$out" | tail -n 1))")
  fi
}

run_mypy "flowbus (strict)" --cache-dir "$WORK/mypy-cache" -p flowbus

# shellcheck disable=SC2207  # file names without blanks
tests_bench=($(cd "$TREE" && find -L tests bench -name "*.py" -not -path "*/__pycache__/*" | sort))
run_mypy "tests and bench (relaxed)" --cache-dir "$WORK/mypy-cache-tests" --follow-imports=silent \
  --allow-untyped-defs --allow-incomplete-defs "${tests_bench[@]}"

echo "== lint summary"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "lint.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "lint.sh: all checks passed"
