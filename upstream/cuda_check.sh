#!/usr/bin/env bash
# The CUDA test of patches/1-curvlinops-full-device.patch, on the unpatched and
# on the patched laplace-torch 0.3 sdist. Needs a CUDA GPU; no network if the
# sdist is given.
#
#   bash upstream/cuda_check.sh [laplace_torch-0.3.tar.gz]
#
# Expected: unpatched, test_full_laplace_fits_on_cuda fails for FullLaplace and
# FullLLLaplace (the error is printed); patched, both pass. Exit 0 only then.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
PATCH="$HERE/patches/1-curvlinops-full-device.patch"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/hfl-cuda.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
SDIST="${1:-}"
if [[ -z "$SDIST" ]]; then
  "$PYTHON" -m pip download --no-deps --no-binary laplace-torch "laplace-torch==0.3" \
    -d "$TMP/dist" --quiet </dev/null
  SDIST="$TMP/dist/laplace_torch-0.3.tar.gz"
fi
"$PYTHON" -c 'import sys, torch; torch.cuda.is_available() or sys.exit("no CUDA device")'
declare -A RC
for variant in unpatched patched; do
  mkdir "$TMP/$variant"
  tar -xzf "$SDIST" -C "$TMP/$variant"
  tree="$TMP/$variant/laplace_torch-0.3"
  include=()
  [[ "$variant" == unpatched ]] && include=(--include='tests/*')  # the test only
  (cd "$tree" && git apply "${include[@]}" "$PATCH")
  echo "== $variant"
  set +e
  (cd "$tree" && PYTHONPATH="$tree" "$PYTHON" -W ignore -m pytest -q -p no:cacheprovider \
    -m cuda -rf --tb=line tests/test_curvlinops_full_device.py </dev/null)
  RC[$variant]=$?
  set -e
done
if [[ "${RC[unpatched]}" != 0 && "${RC[patched]}" == 0 ]]; then
  echo "OK: the CUDA test fails unpatched and passes patched"
else
  echo "UNEXPECTED: unpatched rc=${RC[unpatched]}, patched rc=${RC[patched]}"
  exit 1
fi
