"""The pages' static files, answered before Flask (web/staticfiles.py), through the real gunicorn web:
what a browser gets (type, caching, gzip, 304), the headers Flask's answer had, and nothing outside the
folder."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import requests

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"


def _refs(sys_) -> list[str]:
    page = sys_.http.get(f"{sys_.web_url}/", timeout=5).text
    return sorted(set(re.findall(r"/static/[A-Za-z0-9_./-]+\?v=[0-9a-f]+", page)))


def test_the_checkout_scripts_come_whole_cached_for_an_hour_and_gzipped_when_accepted(sys_):
    refs = _refs(sys_)
    assert any("pdf.worker.min.mjs" in r for r in refs) and any("placement.mjs" in r for r in refs)
    for ref in refs:
        on_disk = (STATIC / ref.split("?")[0].removeprefix("/static/")).read_bytes()
        plain = requests.get(sys_.web_url + ref, headers={"Accept-Encoding": "identity"}, timeout=5)
        assert plain.status_code == 200 and plain.content == on_disk
        assert plain.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert plain.headers["Cache-Control"] == "public, max-age=3600"
        assert "Content-Encoding" not in plain.headers
        raw = requests.get(sys_.web_url + ref, headers={"Accept-Encoding": "gzip"}, timeout=5, stream=True)
        packed = raw.raw.read()
        assert raw.headers["Content-Encoding"] == "gzip" and raw.headers["Vary"] == "Accept-Encoding"
        assert gzip.decompress(packed) == on_disk and int(raw.headers["Content-Length"]) == len(packed)
        assert raw.headers["ETag"] != plain.headers["ETag"]
        for answer in (plain, raw):  # what Flask's hooks added to every answer
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
            assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'")
            assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["X-Request-Id"])
    worker = next(r for r in refs if "pdf.worker" in r)
    big = requests.get(sys_.web_url + worker, headers={"Accept-Encoding": "gzip, deflate, br"}, timeout=5,
                       stream=True)
    assert len(big.raw.read()) < 0.4 * (STATIC / "vendor/pdfjs/pdf.worker.min.mjs").stat().st_size


def test_a_cached_copy_is_confirmed_with_304_and_a_head_has_no_body(sys_):
    ref = next(r for r in _refs(sys_) if "orders.mjs" in r)
    first = requests.get(sys_.web_url + ref, headers={"Accept-Encoding": "gzip"}, timeout=5)
    again = requests.get(sys_.web_url + ref, timeout=5,
                         headers={"Accept-Encoding": "gzip", "If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    other = requests.get(sys_.web_url + ref, timeout=5, headers={"Accept-Encoding": "gzip", "If-None-Match": '"x"'})
    assert other.status_code == 200
    head = requests.head(sys_.web_url + ref, headers={"Accept-Encoding": "identity"}, timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == (STATIC / "js/orders.mjs").stat().st_size
    refused = requests.get(sys_.web_url + ref, headers={"Accept-Encoding": "gzip;q=0, br"}, timeout=5, stream=True)
    assert "Content-Encoding" not in refused.headers


@pytest.mark.parametrize("path", ["/static/../__init__.py", "/static/%2e%2e/__init__.py", "/static/js/",
                                  "/static/js", "/static/js/missing.mjs",
                                  "/static//etc/passwd", "/static/js/../../pages.py"])
def test_nothing_outside_the_folder_nor_a_folder_is_served(sys_, path):
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(sys_.web_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
    conn.request("GET", path)  # as sent: no client-side normalising of the dots
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    # Flask's own route answers what falls through: 404, or 308 to the path with its slashes merged.
    assert answer.status in (404, 308), (path, answer.status, body[:200])
    if answer.status == 308:
        assert answer.getheader("Location", "").endswith("/static/etc/passwd")
    assert b"import " not in body and b"root:" not in body


def _served(folder: Path, path: str, headers: dict | None = None):
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    from web.staticfiles import StaticFiles

    behind = []

    def flask_stand_in(environ, start_response):
        behind.append(environ["PATH_INFO"])
        return Response("not found", status=404)(environ, start_response)

    answer = Client(StaticFiles(flask_stand_in, folder)).get(path, headers=headers or {})
    return answer, behind


def test_a_link_out_of_the_folder_a_dotfile_and_a_folder_are_left_to_flask(tmp_path):
    folder, outside = tmp_path / "static", tmp_path / "secret.txt"
    folder.mkdir()
    outside.write_text("not for buyers")
    (folder / "escape.txt").symlink_to(outside)
    (folder / ".hidden.js").write_text("x")
    (folder / "js").mkdir()
    (folder / "js" / "ok.js").write_text("export const ok = 1;\n" * 100)
    for path in ("/static/escape.txt", "/static/.hidden.js", "/static/js", "/static/js/", "/static/../secret.txt"):
        answer, behind = _served(folder, path)
        assert answer.status_code == 404 and behind, path
        assert b"not for buyers" not in answer.data
    answer, behind = _served(folder, "/static/js/ok.js")
    assert answer.status_code == 200 and not behind and answer.data == (folder / "js" / "ok.js").read_bytes()


@pytest.mark.parametrize("accept, gzipped", [
    ("gzip", True), ("GZIP;Q=1", True), ("br, gzip;q=0.5", True), ("*", True), ("*;q=0, gzip", True),
    ("gzip;q=0", False), ("gzip;Q=0.000", False), ("identity", False), ("", False), ("*;q=0", False),
    ("gzip;q=0, *", False),
])
def test_gzip_only_when_the_browser_accepts_it(tmp_path, accept, gzipped):
    (tmp_path / "a.js").write_text("export const a = 1;\n" * 200)
    answer, _ = _served(tmp_path, "/static/a.js", {"Accept-Encoding": accept})
    assert (answer.headers.get("Content-Encoding") == "gzip") is gzipped
    body = gzip.decompress(answer.data) if gzipped else answer.data
    assert body == (tmp_path / "a.js").read_bytes()
    star, _ = _served(tmp_path, "/static/a.js", {"If-None-Match": "*"})
    assert star.status_code == 304
