#!/usr/bin/env bash
# Runs inside the VM as the agentd-vm-suite oneshot: the end-to-end tests against the real
# service (vm/test_*.py), then the repository's cgroup conformance suite (tests/test_cgroups.py)
# on this cgroup v2 host, against the installed package. Prints one "RESULT <outcome> <id>"
# line per test between markers, then the failures' reports, for vm-tests/run.sh to parse.
# Always exits 0: the verdict travels in the markers, and the unit powers off either way.
# No `set -e`: whatever fails, the markers must still be printed.
set -uo pipefail
cd /opt/agentd-tests || { echo "@@AGENTD-VM-RESULTS-BEGIN@@"; echo "RESULT ERROR no-suite"; \
    echo "@@AGENTD-VM-RESULTS-END@@"; exit 0; }
export PATH=/opt/agentd/bin:$PATH PYTHONDONTWRITEBYTECODE=1
say() { echo "agentd-vm: $*"; }

# Extra pytest arguments from the host, base64 on the kernel command line.
extra=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^agentd.pytest_args=//p' | base64 -d 2>/dev/null)
say "booted in $(cut -d' ' -f1 /proc/uptime)s; running the suite ${extra:+($extra)}"

out=/var/tmp/agentd-vm
rm -rf "$out" && mkdir -p "$out"
targets=(vm)
# The repository's tests that need what only this guest has: the cgroup conformance suite
# on a cgroup v2 root with controllers, and the systemd protocol tests on a systemd host.
for t in tests/test_cgroups.py tests/test_systemd_notify.py tests/test_activation.py; do
    [ -f "$t" ] && targets+=("$t")
done
# -p vm.resultlog writes the RESULT lines; -p no:cacheprovider: nothing to keep between boots.
# shellcheck disable=SC2086
AGENTD_VM_RESULTS="$out/results" AGENTD_VM_FAILURES="$out/failures" \
    /opt/agentd/bin/python -m pytest -p vm.resultlog -p no:cacheprovider -v --durations=10 --rootdir=. \
    "${targets[@]}" $extra >"$out/pytest.log" 2>&1
rc=$?
# On a failure, what an operator would look at next: the units' state and agentd's journal.
if [ "$rc" -ne 0 ]; then
    systemctl status --no-pager agentd.service agentd.socket 2>&1 | sed 's/^/status| /'
    journalctl -b --no-pager -u agentd.service -n 150 -o cat 2>&1 | sed 's/^/journal| /'
fi
# For the report: the units as this systemd judges them (test_units.py asserts on them).
systemd-analyze verify /usr/local/lib/systemd/system/agentd*.s* 2>&1 | sed 's/^/verify| /'
systemd-analyze security --no-pager agentd.service 2>&1 | sed 's/^/security| /'
say "pytest exited $rc after $(cut -d' ' -f1 /proc/uptime)s of uptime"
# The pytest output goes to the console too: it is the first thing to read on a failure.
sed 's/^/pytest| /' "$out/pytest.log"

echo "@@AGENTD-VM-RESULTS-BEGIN@@"
cat "$out/results" 2>/dev/null
# Collection errors and crashes leave no per-test line: report them as one failed "test".
if [ "$rc" -ne 0 ] && ! grep -q -E '^RESULT (FAILED|ERROR) ' "$out/results" 2>/dev/null; then
    echo "RESULT ERROR pytest-exit-status-$rc"
fi
echo "@@AGENTD-VM-RESULTS-END@@"
echo "@@AGENTD-VM-FAILURES-BEGIN@@"
cat "$out/failures" 2>/dev/null
echo "@@AGENTD-VM-FAILURES-END@@"
exit 0
