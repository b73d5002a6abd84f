#!/usr/bin/env bash
# Regenerate docs/report.png: the report of STORE (default: a store of FAKE results, joules.testing.report, no model
# runs), screenshotted by headless chromium. Usage: docs/screenshot.sh [STORE]  (default: fake)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
store=${1:-}
if [ -z "$store" ]; then
  store=$tmp/fake.db
  PYTHONPATH=src "$PY" -c "from joules.testing.report import write_fake_store; write_fake_store('$store')"
fi
PYTHONPATH=src "$PY" -c "from joules.report import render_report; render_report('$store', '$tmp/report.html')"
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$tmp/profile" \
  --virtual-time-budget=5000 --hide-scrollbars --window-size=1280,1800 \
  --screenshot="$PWD/docs/report.png" "file://$tmp/report.html" 2>/dev/null
rm -rf "$tmp"
echo "wrote docs/report.png"
