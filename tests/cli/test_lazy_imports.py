"""`joules --help` stays fast: importing the CLI imports no heavy library.

Every command module imports torch, transformers and joules' torch layers inside its command
function; this keeps it so (a module-level import would pull ~2 s of imports into `--help`).
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "llama_cpp", "ray", "lm_eval", "plotly", "accelerate")


def test_importing_the_cli_imports_no_heavy_library():
    code = (
        "import json, sys\n"
        "import joules.cli\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == []
