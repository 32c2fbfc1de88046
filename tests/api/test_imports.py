"""The API server is the public data plane: it must start without torch (a small CPU box, no model)."""

from __future__ import annotations

import subprocess
import sys


def test_api_app_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import lmfleet.api.app as m\n"
        "m.create_app(m.ApiSettings()).openapi()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
