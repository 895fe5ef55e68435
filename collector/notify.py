"""Notifiers: webhook (JSON POST), email (SMTP with STARTTLS and login).

Each notifier has its own worker thread and queue, so a slow or dead endpoint never blocks
ingest or the other notifiers. A failed send is retried with exponential backoff (and
logged) up to ``max_attempts``; then it is dropped with an error line.
(Retained active alerts on MQTT are published by the engine itself: see engine.py.)
"""

from __future__ import annotations

import json
import logging
import queue
import random
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage

from agent.confload import Secret
from collector.alerts import Notification

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    timeout: float = 5.0
    headers: tuple[tuple[str, str], ...] = ()
    max_attempts: int = 8


@dataclass(frozen=True)
class EmailConfig:
    host: str
    port: int = 587
    starttls: bool = True
    username: str | None = None
    password: Secret | None = None
    sender: str = "hubwatch@localhost"
    recipients: tuple[str, ...] = ()
    ca_file: str | None = None
    timeout: float = 10.0
    max_attempts: int = 8


class Notifier:
    """A queue and a worker thread around one ``send(notification)``."""

    name = "notifier"

    def __init__(self, max_attempts: int, base_delay: float = 1.0, max_delay: float = 60.0):
        self._queue: queue.Queue[tuple[Notification, int] | None] = queue.Queue()
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._stop = threading.Event()
        self.sent = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name=f"notify-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, notification: Notification) -> None:
        self._queue.put((notification, 1))

    def send(self, notification: Notification) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            notification, attempt = item
            try:
                self.send(notification)
                self.sent += 1
            except Exception as exc:
                if attempt >= self._max_attempts:
                    self.failed += 1
                    log.error("%s: giving up on %s after %d attempts: %s", self.name, notification.key, attempt, exc)
                    continue
                delay = min(self._max_delay, self._base_delay * 2 ** (attempt - 1)) * random.uniform(0.7, 1.0)
                log.warning("%s: sending %s failed (%s); retry %d in %.1fs", self.name, notification.key, exc,
                            attempt + 1, delay)
                if self._stop.wait(delay):
                    return
                self._queue.put((notification, attempt + 1))

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (within ``timeout``), then stop."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._queue.put(None)
        self._thread.join(max(0.1, deadline - time.monotonic()))


class WebhookNotifier(Notifier):
    name = "webhook"

    def __init__(self, config: WebhookConfig):
        self.config = config
        super().__init__(config.max_attempts)

    def send(self, notification: Notification) -> None:
        body = json.dumps(notification.to_json()).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "hubwatch-collector"}
        headers.update(dict(self.config.headers))
        request = urllib.request.Request(self.config.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                if response.status >= 300:
                    raise RuntimeError(f"{self.config.url} answered {response.status}")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{self.config.url} answered {exc.code}") from None


class EmailNotifier(Notifier):
    name = "email"

    def __init__(self, config: EmailConfig):
        self.config = config
        super().__init__(config.max_attempts)

    def send(self, notification: Notification) -> None:
        c = self.config
        message = EmailMessage()
        state = "RESOLVED" if notification.state == "resolved" else notification.severity.upper()
        message["Subject"] = f"[hubwatch] {state} {notification.rule} — {notification.hub}/{notification.host}"
        message["From"] = c.sender
        message["To"] = ", ".join(c.recipients)
        message.set_content(notification.message + "\n\n" + json.dumps(notification.to_json(), indent=2) + "\n")
        with smtplib.SMTP(c.host, c.port, timeout=c.timeout) as smtp:
            if c.starttls:
                context = ssl.create_default_context(cafile=c.ca_file)
                smtp.starttls(context=context)
            if c.username:
                smtp.login(c.username, c.password.reveal() if c.password else "")
            smtp.send_message(message)
