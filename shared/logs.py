"""One structured log line per event: ``event=stamped order_id=… task=… attempt=…``.

Key=value lines grep well and parse into any log pipeline. Never log secrets, tokens or documents.
"""
from __future__ import annotations

import logging
from typing import Any


def _fmt(value: Any) -> str:
    # Escape line breaks so a value from outside can't forge a second log line.
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace('"', "'") + '"'
    return text


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    parts = [f"event={event}"] + [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None]
    logger.log(level, " ".join(parts))
