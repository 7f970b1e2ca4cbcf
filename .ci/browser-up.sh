#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the web page's browser test (tests/test_serve.py).
# Installs them when missing and it can (root); otherwise says so and leaves the test to skip,
# unless RETINA_DIST_REQUIRE_BROWSER=1 (CI), which turns a missing browser into a failure.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
    echo "browser-up.sh: not root; install chromium and chromium-driver to run the browser test" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
chromium --version
