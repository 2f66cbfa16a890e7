#!/usr/bin/env bash
# Regenerate constraints.txt: resolve requirements*.txt afresh in a new virtual environment
# and record every version pip picked. Run the tests with the new lock before committing it.
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r requirements.txt -r requirements-dev.txt
{
    echo "# Tested versions: the lock that scripts/test.sh, .ci/run and the README's commands install with"
    echo "# (pip install -r requirements.txt -c constraints.txt). Regenerate with scripts/lock.sh."
    "$venv/bin/python" -m pip freeze --exclude-editable | grep -vE '^(pip|setuptools|wheel)=='
} >constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pinned packages"
