#!/usr/bin/env bash
# Every GPU figure of scbd-cells in one command, in at most 8 minutes on one GPU, set-up
# included: the CUDA-only tests, a short train + embed on CUDA (bf16, channels_last) and
# with --compile, the training ratio at 32 and 64 px (and with the store larger than its
# cache), the embed rate, the loader on a store larger than its cache, and one
# learning-curve point at GPU scale. The figures replace the section between
# <!-- gpu-suite:start --> and <!-- gpu-suite:end --> of docs/performance.md.
# benchmarks/gpu_suite.py says what each stage runs; its options pass through.
#
# On the GPU machine (Python 3.12, torch 2.11; no zarr, anndata, pydantic, scanpy until
# the wheels are installed): fetch the wheels here once, from the project root,
#   bash ../shared/device/fetch-wheels.sh          # writes ./.whl (git-ignored)
# then run the suite there with ".whl" carried:
#   bash benchmarks/gpu_suite.sh                    # results also copied to $OUT
# This script installs the carried wheels into ./.site first, as fetch-wheels.sh says.
#
# The check that runs in CI (tests/test_gpu_suite.py), on the CPU at tiny sizes:
#   bash benchmarks/gpu_suite.sh --dry-run --device cpu --work-dir /tmp/suite
set -euo pipefail
export GPU_SUITE_STARTED="${GPU_SUITE_STARTED:-$(date +%s.%N)}"  # the budget counts set-up
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [[ -x .venv/bin/python && "${PYTHON}" == python3 && -z "${VIRTUAL_ENV:-}" ]]; then
  PYTHON=.venv/bin/python  # a development checkout
fi
NEEDED="import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
('zarr', 'anndata', 'pydantic', 'scanpy', 'numcodecs', 'torch')))"
if ! "${PYTHON}" -c "${NEEDED}" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_suite: installing the carried wheels (.whl) into .site"
    "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target .site .whl/*.whl
    export PYTHONPATH="${PWD}/.site${PYTHONPATH:+:${PYTHONPATH}}"
  else
    echo "gpu_suite: zarr, anndata, pydantic or scanpy is missing and there is no .whl folder." >&2
    echo "Fetch the wheels with: bash ../shared/device/fetch-wheels.sh (and carry .whl)." >&2
    exit 2
  fi
fi
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"  # scbd_cells from this checkout
exec "${PYTHON}" benchmarks/gpu_suite.py "$@"
