#!/usr/bin/env python3
"""Add hubwatch accounts to a mosquitto password file and ACL.

    broker-account.py [--dir /etc/mosquitto/hubwatch] [--prefix hubwatch] add-machine HUB HOST
    broker-account.py [--dir ...] add-collector INSTANCE
    broker-account.py [--dir ...] remove NAME

A hub machine's account is named ``HUB.HOST``: it may publish only its own metrics, events
and status topics and read only its own ack topic. A collector account reads every hub's
topics and writes the ack topics (and retained alerts). The password is read from the
environment variable HUBWATCH_PASSWORD or generated and printed once; it is stored hashed
(mosquitto_passwd). Reload mosquitto afterwards (SIGHUP).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
BEGIN, END = "# >>> hubwatch account {name}", "# <<< hubwatch account {name}"


def machine_acl(prefix: str, hub: str, host: str) -> list[str]:
    base = f"{prefix}/v1/{hub}/{host}"
    return [f"topic write {base}/metrics", f"topic write {base}/events", f"topic write {base}/status",
            f"topic read {base}/ack"]


def collector_acl(prefix: str) -> list[str]:
    return [f"topic read {prefix}/v1/+/+/metrics", f"topic read {prefix}/v1/+/+/events",
            f"topic read {prefix}/v1/+/+/status", f"topic write {prefix}/v1/+/+/ack",
            f"topic readwrite {prefix}/alerts/#", f"topic readwrite {prefix}/collectors/#"]


def set_acl(acl_path: Path, name: str, lines: list[str] | None) -> None:
    """Replace (or with ``lines=None`` remove) the account's block in the ACL file."""
    text = acl_path.read_text() if acl_path.exists() else ""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    pattern = re.compile(rf"^{re.escape(begin)}\n.*?^{re.escape(end)}\n", re.S | re.M)
    text = pattern.sub("", text)
    if lines is not None:
        text += "\n".join([begin, f"user {name}", *lines, end]) + "\n"
    acl_path.write_text(text)


def set_password(passwd_path: Path, name: str, password: str | None) -> None:
    if password is None:
        if passwd_path.exists():
            subprocess.run(["mosquitto_passwd", "-D", str(passwd_path), name], check=True)
        return
    if not passwd_path.exists():
        passwd_path.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd_path), name, password], check=True)
    os.chmod(passwd_path, 0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/etc/mosquitto/hubwatch", help="where passwd and acl live")
    parser.add_argument("--prefix", default="hubwatch", help="topic prefix (default: hubwatch)")
    sub = parser.add_subparsers(dest="command", required=True)
    machine = sub.add_parser("add-machine", help="an account for one hub machine")
    machine.add_argument("hub")
    machine.add_argument("host")
    collector = sub.add_parser("add-collector", help="an account for one collector instance")
    collector.add_argument("instance")
    remove = sub.add_parser("remove", help="remove an account")
    remove.add_argument("name")
    args = parser.parse_args(argv)

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    passwd, acl = directory / "passwd", directory / "acl"
    if args.command == "remove":
        set_acl(acl, args.name, None)
        set_password(passwd, args.name, None)
        print(f"removed {args.name}; reload mosquitto")
        return 0
    if args.command == "add-machine":
        for what in (args.hub, args.host):
            if not ID.fullmatch(what):
                parser.error(f"{what!r} must match {ID.pattern}")
        name, lines = f"{args.hub}.{args.host}", machine_acl(args.prefix, args.hub, args.host)
    else:
        if not ID.fullmatch(args.instance):
            parser.error(f"{args.instance!r} must match {ID.pattern}")
        name, lines = f"hubwatch-collector-{args.instance}", collector_acl(args.prefix)
    password = os.environ.get("HUBWATCH_PASSWORD")
    generated = password is None
    if generated:
        password = secrets.token_urlsafe(18)
    set_password(passwd, name, password)
    set_acl(acl, name, lines)
    print(f"account {name} added; reload mosquitto")
    if generated:
        print(f"password (shown once, put it in the machine's password_file): {password}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
