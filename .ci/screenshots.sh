#!/bin/sh
# Screenshot every page of the built book in headless Chromium (no kernel, no network), to check
# that figures and animations show. Usage: .ci/screenshots.sh [out_dir] [site_dir]   (after
# `make book`; site_dir _build/html by default, _build/html/zh for the Chinese edition)
# Needs Debian's chromium (apt-get install chromium); not part of `make test`.
set -eu
cd "$(dirname "$0")/.."
out="${1:-_build/screenshots}"
site="${2:-_build/html}"
mkdir -p "$out"
for page in "$site"/book/*.html; do
    name=$(basename "$page" .html)
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d)" --hide-scrollbars --window-size=1280,${SCREENSHOT_HEIGHT:-2400} \
        --virtual-time-budget=4000 --screenshot="$out/$name.png" "file://$PWD/$page" 2>/dev/null
    echo "$out/$name.png"
done
