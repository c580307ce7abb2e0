#!/usr/bin/env bash
# A screenshot of a report.html as a new user first sees it (1280x800, headless Chromium), e.g.
# the README's picture of the main job's report:
#     bash scripts/report_screenshot.sh outputs/main/report/report.html docs/img/main_report.png
set -euo pipefail
page=${1:?usage: report_screenshot.sh REPORT.html OUT.png [WIDTH HEIGHT]}
out=${2:?usage: report_screenshot.sh REPORT.html OUT.png [WIDTH HEIGHT]}
width=${3:-1280}
height=${4:-800}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "no Chromium found (Debian: apt-get install chromium)" >&2
    exit 2
fi
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$width,$height" \
    --virtual-time-budget=10000 --screenshot="$out" "$url" 2>/dev/null
echo "$out"
