#!/usr/bin/env bash
# Installs agentd on a systemd host (Debian 12 or alike), or into a root directory being
# built (run it under chroot; vm-tests/run.sh does). Idempotent: run it again to upgrade.
#
#   scripts/install.sh [--prefix DIR] [--offline WHEEL_DIR] [--no-start] WHEEL
#
#   WHEEL            agentd-*.whl (make it with `.venv/bin/pip wheel --no-deps -w dist .`)
#   --prefix DIR     where the virtualenv goes (default /opt/agentd)
#   --offline DIR    install dependencies from wheels in DIR only, never from an index
#   --no-start       do not start the sockets (they are enabled either way)
#
# What it does, and where:
#   DIR (/opt/agentd)                       a virtualenv with agentd and its dependencies;
#                                           its own, so no system Python package can break it
#   /usr/local/bin/agentctl                 symlink to the CLI
#   /usr/local/lib/systemd/system/          agentd.service and its three sockets
#   /usr/local/lib/sysusers.d/agentd.conf   the agentd and agentd-approvers groups
#   /usr/local/lib/tmpfiles.d/agentd.conf   /run/agentd, /var/lib/agentd
#   /etc/agentd/agentd.toml                 the config: installed only if there is none
#   /etc/agentd/policies/                   stage ceilings and example policies: files that
#                                           are already there are never overwritten
# then creates the groups and directories, enables the sockets and, on a running systemd,
# reloads it, starts the sockets and restarts agentd if it was running (an upgrade).
# /usr/local/lib is where systemd looks for units that no package installed; a distribution
# package would use /usr/lib instead.
set -euo pipefail

prefix=/opt/agentd
offline=
start=1
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=$2; shift 2 ;;
        --offline) offline=$2; shift 2 ;;
        --no-start) start=0; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || { echo "usage: install.sh [--prefix DIR] [--offline WHEEL_DIR] [--no-start] WHEEL" >&2; exit 2; }
wheel=$1
src=$(cd "$(dirname "$0")/.." && pwd)   # the checkout (or unpacked release) with systemd/, policies/
say() { echo "install.sh: $*"; }

[ "$(id -u)" = 0 ] || { echo "install.sh: must run as root" >&2; exit 1; }
command -v systemctl >/dev/null || { echo "install.sh: systemd is required" >&2; exit 1; }
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null ||
    { echo "install.sh: Python >= 3.11 is required" >&2; exit 1; }
python3 -c 'import ensurepip' 2>/dev/null ||
    { echo "install.sh: python3 -m venv needs ensurepip: apt-get install python3-venv" >&2; exit 1; }

say "virtualenv in $prefix"
[ -x "$prefix/bin/python" ] || python3 -m venv "$prefix"
pipargs=(-q --disable-pip-version-check)
[ -n "$offline" ] && pipargs+=(--no-index --find-links "$offline")
# --force-reinstall --no-deps first: the same version number rebuilt from a newer checkout
# must replace the old files; then the dependencies, which pip leaves alone when satisfied.
"$prefix/bin/pip" install "${pipargs[@]}" --force-reinstall --no-deps "$wheel"
"$prefix/bin/pip" install "${pipargs[@]}" "$wheel"
ln -sf "$prefix/bin/agentctl" /usr/local/bin/agentctl

say "units, sysusers.d, tmpfiles.d"
units=/usr/local/lib/systemd/system
install -d "$units" /usr/local/lib/sysusers.d /usr/local/lib/tmpfiles.d
for unit in agentd.service agentd.socket agentd-approver.socket agentd-admin.socket; do
    # The unit names /opt/agentd; another prefix is written into the installed copy.
    sed "s|/opt/agentd/|$prefix/|g" "$src/systemd/$unit" >"$units/$unit.tmp"
    chmod 0644 "$units/$unit.tmp"
    mv "$units/$unit.tmp" "$units/$unit"
done
install -m 0644 "$src/systemd/agentd.sysusers" /usr/local/lib/sysusers.d/agentd.conf
install -m 0644 "$src/systemd/agentd.tmpfiles" /usr/local/lib/tmpfiles.d/agentd.conf

say "config and policies in /etc/agentd (existing files are kept)"
install -d -m 0755 /etc/agentd /etc/agentd/policies
[ -e /etc/agentd/agentd.toml ] || install -m 0644 "$src/systemd/agentd.toml" /etc/agentd/agentd.toml
if [ -d "$src/policies" ]; then
    cp -r --no-clobber "$src/policies/." /etc/agentd/policies/
fi

# Both work without a running systemd (in a chroot too): the groups must exist before the
# sockets are created with them.
systemd-sysusers /usr/local/lib/sysusers.d/agentd.conf
systemd-tmpfiles --create /usr/local/lib/tmpfiles.d/agentd.conf

# agentd.service's [Install] has Also= its three sockets: enabling it enables them.
systemctl enable agentd.service 2>&1 | sed 's/^/install.sh: /'

if [ -d /run/systemd/system ] && [ "$(readlink -f /proc/1/root)" = / ] && [ "$start" = 1 ]; then
    say "starting the sockets"
    systemctl daemon-reload
    systemctl start agentd.socket agentd-approver.socket agentd-admin.socket
    systemctl try-restart agentd.service
else
    say "systemd not running here: the sockets start at next boot"
fi
say "done; 'systemctl status agentd.socket' shows the sockets, agentctl is in /usr/local/bin"
