#!/usr/bin/env bash
# Install Debian's chromium for the real-browser test, when it is missing and we may use apt.
# Never fails the build: without chromium that one test is skipped with a reason.
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser test (apt-get) ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the browser test will be skipped"
else
  echo "note: chromium not found and apt-get unavailable (or not root); the browser test will be skipped"
fi
exit 0
