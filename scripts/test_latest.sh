#!/usr/bin/env bash
# Run the test suite against the newest release of every dependency: what CI would install without
# constraints.txt. Tells you when an upstream release breaks scaletrain, without turning CI red.
#
#   bash scripts/test_latest.sh                 # fresh venv (.venv-latest), newest packages, whole suite
#   bash scripts/test_latest.sh --update        # ... and, if it passes, rewrite constraints.txt
#   bash scripts/test_latest.sh -k packaging    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
update=0
if [ "${1:-}" = "--update" ]; then
  update=1
  shift
fi

rm -rf .venv-latest
python3 -m venv .venv-latest
# shellcheck disable=SC1091
. .venv-latest/bin/activate
pip install -q torch==2.13.0 -e '.[dev]'
echo "== newest versions vs constraints.txt"
python scripts/constraints.py diff
echo "== the suite on the newest versions"
pytest "$@"
if [ "$update" = 1 ]; then
  python scripts/constraints.py write
fi
