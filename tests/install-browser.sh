#!/bin/sh
# Install Debian's Chromium for the HTML-report browser test (tests/test_html_report.py), if it is missing.
# Idempotent: does nothing when `chromium` is already on PATH. Uses sudo only when not running as root.
set -eu

# Debian's chromium, or the Google Chrome that GitHub's Ubuntu runners ship (their apt chromium is a snap stub).
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "browser already installed: $(command -v "$name")"
        exit 0
    fi
done

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-browser.sh: not root and no sudo; install Debian's chromium package by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# Without recommends (no systemd, udev, ...); a font so that screenshots show text.
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
command -v chromium
