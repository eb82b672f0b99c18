"""The web process is light: it renders nothing, so it loads no PDF, drawing, QR or signing library.

Checked in a fresh interpreter each time (the test process itself imports everything): what
``import web; web.create_app()`` leaves in ``sys.modules``, and what is there after the web process has
answered a verification by upload, whose parsing runs in a sandbox child that loads pyHanko by itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shared.config import load_settings
from shared.devtools.pki import ensure_dev_pki
from tests.conftest import ROOT

HEAVY = ("pypdf", "reportlab", "segno", "pyhanko", "pyhanko_certvalidator", "pikepdf")

LOADED_BY_CREATE_APP = f"""
import json, sys
import web
web.create_app()
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))))
"""

LOADED_AFTER_A_VERIFICATION = f"""
import io, json, sys
import web
app = web.create_app()
with open(sys.argv[1], "rb") as document:
    answer = app.test_client().post("/api/v1/verify", data={{"document": (document, "surat.pdf")}},
                                    content_type="multipart/form-data")
print(json.dumps({{"status": answer.status_code, "body": answer.get_json(),
                  "heavy": sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))}}))
"""


def run_web(script: str, *arguments: str, **env: str) -> str:
    environment = {**os.environ, "DEVELOPMENT": "1", "PYTHONPATH": str(ROOT), **env}
    result = subprocess.run([sys.executable, "-c", script, *arguments], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_creating_the_web_app_loads_no_pdf_drawing_qr_or_signing_library() -> None:
    assert json.loads(run_web(LOADED_BY_CREATE_APP)) == []


def test_a_verification_by_upload_leaves_the_web_process_light(tmp_path: Path) -> None:
    """The upload is parsed and its signature validated in a sandbox child; the web process reads the
    root certificate's bytes and the child's answer."""
    from tests.conftest import make_pdf

    data_dir = tmp_path / "data"
    ensure_dev_pki(load_settings({}, data_dir=str(data_dir)))
    letter = tmp_path / "surat.pdf"
    letter.write_bytes(make_pdf(pages=1))

    # No Redis answers on port 9: the rate limit fails open, as it does when Redis blips.
    outcome = json.loads(run_web(LOADED_AFTER_A_VERIFICATION, str(letter), DATA_DIR=str(data_dir),
                                 REDIS_URL="redis://127.0.0.1:9/0"))

    assert outcome["status"] == 200 and outcome["body"]["reason"] == "not_signed", outcome
    assert outcome["heavy"] == []
