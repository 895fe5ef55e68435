#!/usr/bin/env bash
# Install (or upgrade, or remove) the hubwatch agent on a Debian/Ubuntu gateway PC.
#
#   sudo scripts/install-agent.sh --hub gilgit-sco-01 --broker mqtts://broker.example.org:8883
#   sudo HUBWATCH_MQTT_PASSWORD=... scripts/install-agent.sh --hub ... --broker ...   # rerun = upgrade
#   sudo scripts/install-agent.sh --uninstall [--purge]
#
# See docs/install.md. Exit codes: 0 ok, 2 bad usage, 1 runtime failure.
set -euo pipefail

ID_RE='^[a-z0-9][a-z0-9_-]{0,62}$'
UNIT_NAME=hubwatch-agent.service
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$SCRIPT_DIR")

usage() {
    cat <<'EOF'
usage: install-agent.sh --hub HUB --broker URL [options]
       install-agent.sh --uninstall [--purge] [--prefix DIR]

Installs the hubwatch agent: a venv in /opt/hubwatch/venv, the config /etc/hubwatch/agent.yaml,
the MQTT password in /etc/hubwatch/mqtt.password (mode 0600), the outbox directory
/var/lib/hubwatch, the systemd unit hubwatch-agent.service (enabled and started) and a sysctl
drop-in letting the agent's group send ICMP echo without root. Rerunning upgrades the
program in place and keeps the config, the password file and the outbox.

  --hub HUB             hub id, [a-z0-9][a-z0-9_-]{0,62} (required to install)
  --broker URL          mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (required to install)
  --host HOST           this machine's name in the hub (default: its short host name)
  --username U          broker account (default: HUB.HOST, as scripts/broker-account.py names it)
  --password-file F     file holding the broker password (default: $HUBWATCH_MQTT_PASSWORD)
  --gateway IP          the ping probe's "gateway" target (default: this machine's default route)
  --ups NAME            the UPS name on the local NUT upsd (default: first in /etc/nut/ups.conf, else "ups")
  --user NAME           the account the agent runs as (default: hubwatch; created if missing)
  --python PY           Python 3.11+ for the venv (default: /usr/bin/python3)
  --source DIR|WHEEL    what to pip install (default: the hubwatch source this script lives in)
  --prefix DIR          install under DIR instead of / (for tests and images): no account is
                        created, nothing is started, no live setting is changed
  --no-start            do not enable or start the service
  --uninstall           remove the unit, the venv and the sysctl drop-in; keep config and outbox
  --purge               with --uninstall: also remove /etc/hubwatch, /var/lib/hubwatch and the account
  -h, --help            this help
EOF
}

die_usage() { echo "install-agent.sh: $*" >&2; echo "try: install-agent.sh --help" >&2; exit 2; }
die() { echo "install-agent.sh: $*" >&2; exit 1; }
say() { echo "hubwatch: $*"; }

HUB="" BROKER="" HOST="" USERNAME="" PASSWORD_FILE="" GATEWAY="" UPS=""
ACCOUNT=hubwatch PYTHON=/usr/bin/python3 SOURCE="$REPO" PREFIX=/
NO_START=0 UNINSTALL=0 PURGE=0

need_value() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hub) need_value "$@"; HUB=$2; shift 2 ;;
        --broker) need_value "$@"; BROKER=$2; shift 2 ;;
        --host) need_value "$@"; HOST=$2; shift 2 ;;
        --username) need_value "$@"; USERNAME=$2; shift 2 ;;
        --password-file) need_value "$@"; PASSWORD_FILE=$2; shift 2 ;;
        --gateway) need_value "$@"; GATEWAY=$2; shift 2 ;;
        --ups) need_value "$@"; UPS=$2; shift 2 ;;
        --user) need_value "$@"; ACCOUNT=$2; shift 2 ;;
        --python) need_value "$@"; PYTHON=$2; shift 2 ;;
        --source) need_value "$@"; SOURCE=$2; shift 2 ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --no-start) NO_START=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unknown argument: $1" ;;
    esac
done

# --- where things go ------------------------------------------------------------------------
[[ "$PREFIX" == /* ]] || die_usage "--prefix must be an absolute path, got '$PREFIX'"
ROOT=${PREFIX%/}          # "" for a live install, so "$ROOT/etc" is "/etc"
LIVE=0; [[ -z "$ROOT" ]] && LIVE=1
OPT_DIR=$ROOT/opt/hubwatch
VENV=$OPT_DIR/venv
ETC_DIR=$ROOT/etc/hubwatch
CONFIG=$ETC_DIR/agent.yaml
PASSWORD_PATH=$ETC_DIR/mqtt.password
STATE_DIR=$ROOT/var/lib/hubwatch
UNIT_PATH=$ROOT/etc/systemd/system/$UNIT_NAME
SYSCTL_PATH=$ROOT/etc/sysctl.d/60-hubwatch-ping.conf
# The paths as the agent sees them at run time (the rendered config names these).
RUN_PASSWORD_PATH=/etc/hubwatch/mqtt.password
RUN_OUTBOX=/var/lib/hubwatch/outbox.db

IS_ROOT=0; [[ $(id -u) == 0 ]] && IS_ROOT=1
if [[ $LIVE == 1 && $IS_ROOT == 0 ]]; then
    die "installing into / needs root: run it with sudo (or use --prefix DIR to try it elsewhere)"
fi
have_systemd() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

# --- uninstall --------------------------------------------------------------------------------
if [[ $UNINSTALL == 1 ]]; then
    if [[ $LIVE == 1 ]] && have_systemd; then
        systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1 || true
    fi
    rm -f "$UNIT_PATH" "$SYSCTL_PATH"
    rm -rf "$OPT_DIR"
    if [[ $LIVE == 1 ]] && have_systemd; then
        systemctl daemon-reload || true
    fi
    say "removed the unit, $OPT_DIR and the ping sysctl drop-in"
    if [[ $PURGE == 1 ]]; then
        rm -rf "$ETC_DIR" "$STATE_DIR"
        # Only an account this installer made (its comment says so) is deleted.
        if [[ $LIVE == 1 ]] && [[ "$(getent passwd "$ACCOUNT" | cut -d: -f5)" == "hubwatch agent" ]]; then
            userdel "$ACCOUNT" 2>/dev/null || true
            getent group "$ACCOUNT" >/dev/null && groupdel "$ACCOUNT" 2>/dev/null || true
            say "deleted the $ACCOUNT account"
        fi
        say "purged $ETC_DIR and $STATE_DIR (the outbox)"
    else
        say "kept $ETC_DIR (config, password) and $STATE_DIR (outbox); --uninstall --purge removes them"
    fi
    exit 0
fi

# --- validate ---------------------------------------------------------------------------------
[[ -n "$HUB" ]] || die_usage "--hub is required"
[[ -n "$BROKER" ]] || die_usage "--broker is required"
[[ "$HUB" =~ $ID_RE ]] || die_usage "hub id '$HUB' is not valid: it must match [a-z0-9][a-z0-9_-]{0,62}"
if [[ ! "$BROKER" =~ ^(mqtt|mqtts)://([^/?#@[:space:]\"\'\\]+)/?$ ]]; then
    die_usage "broker URL '$BROKER' is not valid: use mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (no user or password in it)"
fi
hostport=${BASH_REMATCH[2]}
port_re=':([^]:]*)$'  # a port after the last colon (an IPv6 address is in [brackets])
if [[ "$hostport" =~ $port_re ]]; then
    port=${BASH_REMATCH[1]}
    [[ "$port" =~ ^[0-9]{1,5}$ ]] && (( 10#$port >= 1 && 10#$port <= 65535 )) \
        || die_usage "broker URL '$BROKER' has an invalid port"
fi
[[ "${hostport%:*}" != "" && "$hostport" != :* ]] || die_usage "broker URL '$BROKER' names no host"
if [[ -z "$HOST" ]]; then
    # The agent's own default (agent.config.default_host), fixed here so the broker
    # account name does not change if the machine is renamed later.
    HOST=$(uname -n | cut -d. -f1 | tr 'A-Z' 'a-z' | sed -e 's/[^a-z0-9_-]/-/g' -e 's/^[-_]*//' -e 's/[-_]*$//')
    HOST=${HOST:0:63}; HOST=${HOST:-host}
fi
[[ "$HOST" =~ $ID_RE ]] || die_usage "host '$HOST' is not valid: it must match [a-z0-9][a-z0-9_-]{0,62}"
USERNAME=${USERNAME:-$HUB.$HOST}
[[ "$USERNAME" =~ ^[A-Za-z0-9._@-]{1,128}$ ]] || die_usage "username '$USERNAME' is not valid: letters, digits and . _ @ - only"
[[ "$ACCOUNT" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die_usage "--user '$ACCOUNT' is not a valid account name"
if [[ -n "$GATEWAY" && ! "$GATEWAY" =~ ^[A-Za-z0-9.:-]+$ ]]; then
    die_usage "--gateway '$GATEWAY' is not an address or host name"
fi
if [[ -n "$UPS" && ! "$UPS" =~ ^[A-Za-z0-9._-]+$ ]]; then
    die_usage "--ups '$UPS' is not a valid NUT UPS name"
fi
[[ -e "$SOURCE" ]] || die_usage "--source '$SOURCE' does not exist"
[[ -f "$REPO/systemd/$UNIT_NAME" ]] || die "cannot find the unit file $REPO/systemd/$UNIT_NAME next to this script"

PASSWORD=""
HAVE_PASSWORD=0
if [[ -n "$PASSWORD_FILE" ]]; then
    [[ -r "$PASSWORD_FILE" && -f "$PASSWORD_FILE" ]] || die_usage "--password-file '$PASSWORD_FILE' is not a readable file"
    PASSWORD=$(<"$PASSWORD_FILE")
    HAVE_PASSWORD=1
elif [[ -n "${HUBWATCH_MQTT_PASSWORD:-}" ]]; then
    PASSWORD=$HUBWATCH_MQTT_PASSWORD
    HAVE_PASSWORD=1
fi
unset HUBWATCH_MQTT_PASSWORD  # not passed on to pip and the rest
if [[ $HAVE_PASSWORD == 1 && -z "${PASSWORD//[[:space:]]/}" ]]; then
    die_usage "the broker password is empty"
fi
if [[ $HAVE_PASSWORD == 0 && ! -e "$PASSWORD_PATH" ]]; then
    die_usage "no broker password: give --password-file F or set HUBWATCH_MQTT_PASSWORD (make the account with scripts/broker-account.py add-machine $HUB $HOST)"
fi

command -v "$PYTHON" >/dev/null || die "no Python at $PYTHON (apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "hubwatch needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -c 'import platform; print(platform.python_version())'). Install a newer python3 and pass --python"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if [[ $LIVE == 1 ]] && command -v apt-get >/dev/null; then
        say "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
            || die "apt-get install python3-venv failed"
    else
        die "$PYTHON cannot make a venv: apt-get install python3-venv"
    fi
fi

# --- the account ------------------------------------------------------------------------------
# A static system user: it owns the outbox and the password file, and its group is what the
# ping sysctl admits. Under --prefix nothing is created: an existing account is used for
# ownership when we may chown, otherwise files keep the installer's ownership.
if [[ $LIVE == 1 ]] && ! getent passwd "$ACCOUNT" >/dev/null; then
    getent group "$ACCOUNT" >/dev/null || groupadd --system "$ACCOUNT"
    useradd --system --gid "$ACCOUNT" --home-dir /var/lib/hubwatch --no-create-home \
        --shell /usr/sbin/nologin --comment "hubwatch agent" "$ACCOUNT"
    say "created system user $ACCOUNT"
fi
OWN=0
if [[ $IS_ROOT == 1 ]] && getent passwd "$ACCOUNT" >/dev/null; then
    OWN=1
    GROUP=$(id -gn "$ACCOUNT")
    GID=$(id -g "$ACCOUNT")
elif [[ $LIVE == 0 ]]; then
    say "note: account $ACCOUNT is not used under --prefix (it does not exist or we are not root); files keep the installer's owner"
    GROUP=$(id -gn)
    GID=$(id -g)
fi
own() { # own USER:GROUP PATH...
    local who=$1; shift
    if [[ $OWN == 1 ]]; then chown "$who" "$@"; fi
}

# --- the program --------------------------------------------------------------------------------
mkdir -p "$OPT_DIR"
chmod 0755 "$OPT_DIR"
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "upgrading $VENV"
else
    # No venv yet, or its Python went away with a distribution upgrade: make it afresh.
    "$PYTHON" -m venv --clear "$VENV" || die "could not create the venv $VENV"
    say "created $VENV"
fi
# The base install only: the agent never needs the collector's libraries. pip honours
# PIP_INDEX_URL, PIP_FIND_LINKS and PIP_NO_INDEX for machines without PyPI.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$SOURCE" \
    || die "pip install of $SOURCE into $VENV failed"
"$VENV/bin/hubwatch-agent" --version >/dev/null || die "the installed hubwatch-agent does not run"

# --- state and config -----------------------------------------------------------------------------
mkdir -p "$STATE_DIR"
chmod 0750 "$STATE_DIR"
own "$ACCOUNT:$GROUP" "$STATE_DIR"

mkdir -p "$ETC_DIR"
chmod 0750 "$ETC_DIR"
own "root:$GROUP" "$ETC_DIR"

if [[ -e "$PASSWORD_PATH" ]]; then
    if [[ $HAVE_PASSWORD == 1 ]] && [[ "$(<"$PASSWORD_PATH")" != "$PASSWORD" ]]; then
        say "kept the existing $PASSWORD_PATH (the password given now differs; edit the file to change it)"
    else
        say "kept the existing $PASSWORD_PATH"
    fi
else
    tmp=$(mktemp "$ETC_DIR/.mqtt.password.XXXXXX")
    printf '%s\n' "$PASSWORD" >"$tmp"
    chmod 0600 "$tmp"
    own "$ACCOUNT:$GROUP" "$tmp"
    mv "$tmp" "$PASSWORD_PATH"
    say "wrote $PASSWORD_PATH (mode 0600)"
fi

default_gateway() { # the IPv4 default route's gateway, from the kernel's routing table
    awk 'NR > 1 && $2 == "00000000" && $3 != "00000000" { print $3; exit }' /proc/net/route 2>/dev/null |
        while read -r hex; do
            printf '%d.%d.%d.%d\n' "0x${hex:6:2}" "0x${hex:4:2}" "0x${hex:2:2}" "0x${hex:0:2}"
        done
}
first_nut_ups() {
    [[ -r /etc/nut/ups.conf ]] || return 0
    sed -n 's/^[[:space:]]*\[\([A-Za-z0-9._-]*\)\][[:space:]]*$/\1/p' /etc/nut/ups.conf | head -n 1
}

if [[ -e "$CONFIG" ]]; then
    say "kept the existing $CONFIG"
else
    GATEWAY=${GATEWAY:-$(default_gateway)}
    UPS=${UPS:-$(first_nut_ups)}
    UPS=${UPS:-ups}
    targets=""
    [[ -n "$GATEWAY" ]] && targets="      gateway: \"$GATEWAY\""$'\n'
    targets+="      internet: 1.1.1.1"
    tmp=$(mktemp "$ETC_DIR/.agent.yaml.XXXXXX")
    cat >"$tmp" <<EOF
# hubwatch agent configuration, written by install-agent.sh on $(date -u +%Y-%m-%d).
# Every key, with its default: /opt/hubwatch/config/agent.example.yaml
# Check after editing: /opt/hubwatch/venv/bin/hubwatch-agent --check -c /etc/hubwatch/agent.yaml
# Rerunning the installer keeps this file.
hub: "$HUB"
host: "$HOST"
interval: 10s

mqtt:
  url: "$BROKER"
  username: "$USERNAME"
  password_file: $RUN_PASSWORD_PATH
  topic_prefix: hubwatch

buffer:
  path: $RUN_OUTBOX
  max_mb: 256

probes:
  system: {}
  network:
    interfaces: ["eth*", "en*", "wl*"]
  ping:
    targets:
$targets
  nut:
    - name: "$UPS"
      host: 127.0.0.1
      port: 3493
EOF
    chmod 0640 "$tmp"
    own "root:$GROUP" "$tmp"
    mv "$tmp" "$CONFIG"
    say "wrote $CONFIG"
fi
# The full reference next to the program, for editing the config later.
mkdir -p "$OPT_DIR/config"
if [[ -f "$REPO/config/agent.example.yaml" ]]; then
    install -m 0644 "$REPO/config/agent.example.yaml" "$OPT_DIR/config/agent.example.yaml"
fi

# --- systemd unit and the ping permission ----------------------------------------------------------
mkdir -p "$(dirname "$UNIT_PATH")"
tmp=$(mktemp "$(dirname "$UNIT_PATH")/.$UNIT_NAME.XXXXXX")
UNIT_GROUP=$ACCOUNT
getent passwd "$ACCOUNT" >/dev/null && UNIT_GROUP=$(id -gn "$ACCOUNT")
sed -e "s/^User=hubwatch\$/User=$ACCOUNT/" -e "s/^Group=hubwatch\$/Group=$UNIT_GROUP/" \
    "$REPO/systemd/$UNIT_NAME" >"$tmp"
chmod 0644 "$tmp"
mv "$tmp" "$UNIT_PATH"
say "installed $UNIT_PATH"

# Unprivileged ICMP echo ("ping sockets") is allowed for the groups in
# net.ipv4.ping_group_range; Debian's default "1 0" allows none. Admit the agent's group,
# widening (never narrowing) what this machine already allows.
read -r lo hi < /proc/sys/net/ipv4/ping_group_range 2>/dev/null || { lo=1; hi=0; }
if (( lo > hi )); then
    lo=$GID; hi=$GID
else
    (( GID < lo )) && lo=$GID
    (( GID > hi )) && hi=$GID
fi
mkdir -p "$(dirname "$SYSCTL_PATH")"
cat >"$SYSCTL_PATH" <<EOF
# Written by hubwatch's install-agent.sh: lets the agent's group ($GROUP, gid $GID) send
# ICMP echo through unprivileged ping sockets, so the agent needs no root and no capability.
# Kept as wide as this machine already allowed. Removed by install-agent.sh --uninstall.
net.ipv4.ping_group_range = $lo $hi
EOF
chmod 0644 "$SYSCTL_PATH"
say "wrote $SYSCTL_PATH (net.ipv4.ping_group_range = $lo $hi)"

# --- live changes ----------------------------------------------------------------------------------
if [[ $LIVE == 0 ]]; then
    say "installed under $PREFIX; nothing started (a --prefix install never touches the running system)"
    exit 0
fi
sysctl -q -p "$SYSCTL_PATH" >/dev/null 2>&1 \
    || say "note: could not apply $SYSCTL_PATH now (a container?); the ping probe falls back to TCP until it applies"
"$VENV/bin/hubwatch-agent" --check -c "$CONFIG" >/dev/null \
    || die "the config $CONFIG does not pass --check (run: $VENV/bin/hubwatch-agent --check -c $CONFIG)"
if ! have_systemd; then
    say "systemd is not running here: start the agent yourself ($VENV/bin/hubwatch-agent -c $CONFIG)"
    exit 0
fi
systemctl daemon-reload
if [[ $NO_START == 1 ]]; then
    say "not started (--no-start): systemctl enable --now $UNIT_NAME"
    exit 0
fi
systemctl enable --quiet "$UNIT_NAME"
# restart: starts it on a first install, and runs the new program after an upgrade.
systemctl restart "$UNIT_NAME" || die "$UNIT_NAME did not start: journalctl -u $UNIT_NAME"
say "$UNIT_NAME enabled and running: journalctl -u $UNIT_NAME -f; status: $VENV/bin/hubwatch-agent --status -c $CONFIG"
