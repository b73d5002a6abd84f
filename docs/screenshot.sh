#!/usr/bin/env bash
# Regenerate docs/assets/report.png: the report of STORE (default: a store of FAKE results shaped like a deploy
# sweep, joules.testing.report.write_fake_deploy_store, no model runs), with the answer for --max-kld MAX_KLD
# (default 0.1) and the least J/token, screenshotted by headless chromium (the answer and the candidate table).
# Usage: docs/screenshot.sh [STORE]   (MAX_KLD=0.05 docs/screenshot.sh joules.db)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
store=${1:-}
if [ -z "$store" ]; then
  store=$tmp/fake.db
  PYTHONPATH=src "$PY" -c "from joules.testing.report import write_fake_deploy_store as w; w('$store')"
fi
PYTHONPATH=src "$PY" -c "
from joules.report import render_report
from joules.sweep.analyze import Constraints
render_report('$store', '$tmp/report.html', Constraints(max_kld=${MAX_KLD:-0.1}), 'energy')"
mkdir -p docs/assets
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$tmp/profile" \
  --virtual-time-budget=5000 --hide-scrollbars --window-size=1280,1560 \
  --screenshot="$PWD/docs/assets/report.png" "file://$tmp/report.html" 2>/dev/null
rm -rf "$tmp"
echo "wrote docs/assets/report.png"
