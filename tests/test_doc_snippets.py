"""Every Python snippet of the README and docs/ runs as written (issue 12, item 7).

The snippets of one file run in order in one process (a guide builds on its earlier
snippets), in a temporary directory, with a non-interactive matplotlib backend. The
plugin guide assumes its example package is installed (``pip install -e
examples/symphase-example-plugin``, its section 3); here its source folder is put on the
path and its plugin module registered, which is what the entry point does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
PRELUDE = {
    "docs/plugins.md": (
        "import symphase_rmsnorm.plugin as _plugin\n"
        "from framework import register_plugin as _register\n"
        "_register(_plugin)\n"
    ),
}


def _snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_snippets_are_found():
    counts = {f: len(_snippets((ROOT / f).read_text())) for f in FILES}
    assert counts["README.md"] >= 3 and counts["docs/plugins.md"] >= 5, counts


@pytest.mark.parametrize("name", [f for f in FILES if _snippets((ROOT / f).read_text())])
def test_snippets_run_as_written(name, tmp_path):
    code = PRELUDE.get(name, "") + "\n\n".join(_snippets((ROOT / name).read_text()))
    script = tmp_path / "snippets.py"
    script.write_text(code)
    env = {**os.environ, "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "examples" /
                                         "symphase-example-plugin" / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
