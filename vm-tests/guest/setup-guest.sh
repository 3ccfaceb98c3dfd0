#!/usr/bin/env bash
# Runs on the host, on the guest's root directory, after scripts/install.sh has installed
# agentd there: adds what only the test VM has: the suite's oneshot unit (enabled) and the
# test configuration (one agent, `e2e`, with small limits the tests can hit quickly).
#
# Usage: setup-guest.sh ROOT
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")" && pwd)

install -m 0644 "$here/agentd-vm-suite.service" "$root/etc/systemd/system/"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf ../agentd-vm-suite.service "$root/etc/systemd/system/multi-user.target.wants/"

# The operator's config is replaced by the suite's: install.sh never overwrites one, so this
# is the same step an operator takes after installing.
install -m 0644 "$here/etc/agentd.toml" "$root/etc/agentd/agentd.toml"
install -m 0644 "$here/etc/e2e.yaml" "$root/etc/agentd/policies/e2e.yaml"
# An unprivileged member of the agentd group, to show that group membership is the access.
chroot "$root" useradd --system --no-create-home --groups agentd e2e-client 2>/dev/null ||
    chroot "$root" usermod -a -G agentd e2e-client
