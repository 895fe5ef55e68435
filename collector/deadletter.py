"""A bounded file of rejected messages, one JSON object a line, for an engineer to inspect.

When the file passes its size cap it is rotated once (``.1``), so the newest rejections are
always kept and the disk never fills.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PAYLOAD_KEPT = 4096


class DeadLetters:
    def __init__(self, path: Path, max_mb: float):
        self._path = Path(path)
        self._max_bytes = int(max_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._warned = False

    @property
    def path(self) -> Path:
        return self._path

    def add(self, topic: str, reason: str, detail: str, payload: bytes | str | None = None) -> None:
        entry: dict[str, object] = {"time": round(time.time(), 3), "topic": topic, "reason": reason, "detail": detail}
        if isinstance(payload, str):
            entry["line"] = payload[:MAX_PAYLOAD_KEPT]
        elif payload is not None:
            entry["payload_bytes"] = len(payload)
            entry["payload_b64"] = base64.b64encode(payload[:MAX_PAYLOAD_KEPT]).decode()
        text = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                if self._path.exists() and self._path.stat().st_size + len(text) > self._max_bytes // 2:
                    self._path.replace(self._path.with_name(self._path.name + ".1"))
                with open(self._path, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as exc:
                if not self._warned:  # never let a full disk take ingest down
                    log.error("cannot write dead letters to %s: %s", self._path, exc)
                    self._warned = True

    def read(self) -> list[dict]:
        """Every entry currently kept, oldest first (rotated file included)."""
        entries = []
        for path in (self._path.with_name(self._path.name + ".1"), self._path):
            if path.exists():
                entries += [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l]
        return entries
