"""Third-party browser code the pages serve from our own origin, fetched from the npm registry.

Why: the checkout page shows the buyer's PDF with pdf.js (Mozilla's renderer, npm package
``pdfjs-dist``) so they can place the stamp on the page itself. Pages load nothing from a CDN (the
content security policy allows our origin only, and a CDN down on deadline night must not take the
preview with it), so the renderer is copied into ``web/static/vendor/pdfjs/`` by this script, which
``./dev`` runs before ``up`` and ``test`` and a production build runs once (docs/deploy.md). The files are
not committed: the pinned version and the registry's integrity hash below are what is reviewed, and a
tarball that doesn't match the hash is refused.

Run ``python -m shared.devtools.vendor`` (``--check`` only says whether the copy is current). The
checkout page works without the preview (typed coordinates), so a machine without npm can still run
the system; the browser tests need it.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "web" / "static" / "vendor" / "pdfjs"
PDFJS_VERSION = "5.6.205"
# `npm pack pdfjs-dist@5.6.205 --json`'s integrity (the registry's dist.integrity), checked here again.
PDFJS_INTEGRITY = "sha512-tlUj+2IDa7G1SbvBNN74UHRLJybZDWYom+k6p5KIZl7huBvsA4APi6mKL+zCxd3tLjN5hOOEE9Tv7VdzO88pfg=="
# What the pages use: the library and its worker (minified ES modules), the standard 14 fonts' stand-ins
# (documents that don't embed Helvetica & co., common from office suites), the CMaps for CJK text, and
# the licences. Not the WebAssembly image decoders: they need 'wasm-unsafe-eval' in the page policy,
# and a preview without a JPEG 2000 image is still a preview.
_WANTED_PREFIXES = ("package/build/pdf.min.mjs", "package/build/pdf.worker.min.mjs", "package/standard_fonts/",
                    "package/cmaps/", "package/LICENSE")
STAMP_FILE = ".version"


def current() -> bool:
    """Whether the vendored copy is the pinned one."""
    stamp = TARGET / STAMP_FILE
    return stamp.is_file() and stamp.read_text().strip() == f"pdfjs-dist@{PDFJS_VERSION} {PDFJS_INTEGRITY}"


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def vendor() -> None:
    """Fetch the pinned pdfjs-dist tarball with npm, check it, and copy the files the pages use."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not installed: it fetches pdf.js for the checkout page's preview "
                         "(Debian: apt-get install npm)")
    with tempfile.TemporaryDirectory(prefix="meterai-vendor-") as work:
        answer = subprocess.run([npm, "pack", f"pdfjs-dist@{PDFJS_VERSION}", "--json", "--silent"], cwd=work,
                                capture_output=True, text=True, timeout=300)
        if answer.returncode != 0:
            raise SystemExit(f"npm pack pdfjs-dist@{PDFJS_VERSION} failed:\n{answer.stderr.strip()}")
        filename = json.loads(answer.stdout)[0]["filename"]
        tarball = Path(work) / filename
        found = _integrity(tarball)
        if found != PDFJS_INTEGRITY:
            raise SystemExit(f"pdfjs-dist@{PDFJS_VERSION} does not match its pinned integrity "
                             f"({found} != {PDFJS_INTEGRITY}); refusing to serve it")
        staging = Path(work) / "out"
        with tarfile.open(tarball) as archive:
            for member in archive.getmembers():
                if not member.isfile() or not member.name.startswith(_WANTED_PREFIXES):
                    continue
                relative = Path(member.name).relative_to("package")
                if relative.name.endswith(".map"):
                    continue
                destination = staging / (relative.name if relative.parts[0] == "build" else relative)
                destination.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None
                destination.write_bytes(source.read())
        (staging / STAMP_FILE).write_text(f"pdfjs-dist@{PDFJS_VERSION} {PDFJS_INTEGRITY}\n")
        if TARGET.exists():
            shutil.rmtree(TARGET)
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), TARGET)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 unless the vendored copy is current")
    args = parser.parse_args(argv)
    if current():
        return 0
    if args.check:
        print(f"web/static/vendor/pdfjs is not pdfjs-dist@{PDFJS_VERSION}: run python -m shared.devtools.vendor",
              file=sys.stderr)
        return 1
    vendor()
    print(f"[dev] vendored pdfjs-dist@{PDFJS_VERSION} into {TARGET.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
