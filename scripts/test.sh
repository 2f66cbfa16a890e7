#!/usr/bin/env bash
# Install everything the test suite needs, then run it. Used by the README and by CI.
#   bash scripts/test.sh            # all tests, browser tests included
#   bash scripts/test.sh -k trace   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# The tested versions (constraints.txt) make every fresh install the one CI last saw.
python3 -m pip install --quiet --disable-pip-version-check \
    -r requirements.txt -r requirements-dev.txt -c constraints.txt

# Browser tests drive Debian's Chromium headless (Playwright cannot download browsers here).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "chromium is missing and cannot be installed without root: the browser tests will fail." >&2
        echo "Install it (apt-get install chromium) or set OVDIFF_CHROMIUM=/path/to/chromium." >&2
    fi
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec python3 -m pytest "$@"
