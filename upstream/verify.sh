#!/usr/bin/env bash
# Verify the upstream patch series against a clean laplace-torch 0.3 sdist.
#
#   bash upstream/verify.sh
#
# 1. the committed patches are up to date with the laplace_hfl source;
# 2. pip downloads the laplace-torch 0.3 sdist, which is unpacked and committed
#    into a throwaway git repository; each patch passes `git apply --check`
#    and is applied;
# 3. the patched source is installed (--no-deps) into a fresh virtual
#    environment that reuses $PYTHON's torch, curvlinops, ... (upstream/
#    make_venv.py: works when $PYTHON is a venv's interpreter too); the new
#    venv's laplace shadows the unpatched one;
# 4. in that venv: the registry check (HessianStructure.HFL, Laplace(...)
#    builds the HFL classes, every other key unchanged, laplace_hfl never
#    imported), tests/test_hfl.py, examples/hfl_example.py;
# 5. ruff check and ruff format --check with upstream's configuration on every
#    Python file the series adds or changes.
# Needs: python3 (>= 3.10) with the project's dependencies, git, ruff, and
# access to PyPI. Environment: PYTHON (default python3), RUFF (default ruff),
# KEEP_TMP=1 keeps the working directory.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
RUFF="${RUFF:-ruff}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
TMP="$(mktemp -d "${TMPDIR:-/tmp}/hfl-verify.XXXXXX")"
if [[ "${KEEP_TMP:-0}" != 1 ]]; then trap 'rm -rf "$TMP"' EXIT; fi
step() { printf '\n== %s\n' "$*"; }
START=$SECONDS

step "download laplace-torch 0.3 sdist"
"$PYTHON" -m pip download --no-deps --no-binary laplace-torch "laplace-torch==0.3" \
  -d "$TMP/dist" --quiet </dev/null
SDIST="$TMP/dist/laplace_torch-0.3.tar.gz"
ls -l "$SDIST"

step "patches up to date with laplace_hfl"
"$PYTHON" "$HERE/make_patch.py" --check --sdist "$SDIST" </dev/null

step "unpack and apply the series"
tar -xzf "$SDIST" -C "$TMP"
SRC="$TMP/laplace_torch-0.3"
git() { command git -C "$SRC" -c user.name=verify -c user.email=verify@localhost \
  -c core.autocrlf=false "$@"; }
git init -q
git add -A
git commit -q -m "laplace-torch 0.3 sdist"
for patch in "$HERE"/patches/*.patch; do
  git apply --check "$patch"
  git apply "$patch"
  echo "applied $(basename "$patch")"
done
git add -A
git diff --cached --stat HEAD

step "unpatched registry (system laplace)"
(cd "$TMP" && "$PYTHON" -W ignore "$HERE/check_registry.py" dump "$TMP/registry.json" </dev/null)

step "fresh venv with the patched laplace"
# make_venv.py: like `venv --system-site-packages`, but also sees the packages
# of $PYTHON when $PYTHON is itself a venv's interpreter.
VPY="$("$PYTHON" "$HERE/make_venv.py" "$TMP/venv" </dev/null | tail -n 1)"
"$VPY" -m pip install --no-deps --quiet "$SRC" </dev/null
(cd "$TMP" && "$VPY" -c 'import laplace; print("laplace imported from", laplace.__file__)')

step "registry check (no laplace_hfl)"
(cd "$TMP" && "$VPY" -W ignore "$HERE/check_registry.py" patched "$TMP/registry.json" </dev/null)

step "pytest tests/test_hfl.py"
# -P: do not put the source tree on sys.path, so the installed package is tested.
(cd "$SRC" && "$VPY" -P -m pytest tests/test_hfl.py -q -p no:cacheprovider </dev/null)

step "python examples/hfl_example.py"
(cd "$SRC" && "$VPY" -P -W ignore examples/hfl_example.py </dev/null)

step "ruff (upstream configuration) on added/changed files"
mapfile -t CHANGED < <(git diff --cached --name-only --diff-filter=AM HEAD -- '*.py')
printf '  %s\n' "${CHANGED[@]}"
(cd "$SRC" && "$RUFF" check "${CHANGED[@]}" && "$RUFF" format --check "${CHANGED[@]}")

step "upstream verification passed in $((SECONDS - START)) s"
