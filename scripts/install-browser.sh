#!/bin/sh
# The headless browser the report test opens `orch report`'s HTML in: Debian's chromium, driven
# by playwright (whose own browser download is not used). Installs only when it is missing.
set -eu
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    echo "install-browser: chromium is already at $CHROMIUM"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser: $CHROMIUM is missing; as root: apt-get install --no-install-recommends chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "install-browser: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
