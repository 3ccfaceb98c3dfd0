#!/usr/bin/env bash
# `make vm-test`: boots a Debian VM with systemd and cgroup v2, installs the agentd wheel built
# from this checkout with the units from systemd/, and runs the end-to-end suite inside it
# against the real service. Prints a pytest-style summary ("N passed, M failed") and exits
# non-zero on any failure, on a guest that never reports, or on a timeout.
#
# Everything it builds is cached under vm-tests/cache/ (or $AGENTD_VM_CACHE):
#   base-<key>/      kernel, initramfs and debootstrapped root; key = hash of build-base.sh,
#                    initramfs-init (≈ 1 min to rebuild)
#   wheels-<key>/    dependency wheels from PyPI; key = hash of pyproject.toml
#   image-<key>/     rootfs.img: base + agentd installed by scripts/install.sh + the suite;
#                    key = hash of base key, wheels key and every file that goes in
#   console.log      the guest's serial console of the last run, kept for diagnosis
#   results.txt      the guest's per-test results of the last run
# The guest boots from a throw-away qcow2 overlay, so a cached image is never modified.
#
# Why the image is built on the host and not by the guest: the guest has no network and runs
# under TCG (no usable KVM here), where pip would take minutes; in a chroot on the host it
# takes seconds. The guest's Python (Debian 12: 3.11) matches the host's wheels.
#
# Environment: AGENTD_VM_CACHE (cache dir), AGENTD_VM_TIMEOUT (seconds for the boot + suite,
# default 900), AGENTD_VM_PYTEST_ARGS (extra pytest arguments in the guest, e.g. "-k exec"),
# AGENTD_VM_KEEP=1 (keep the staging root directory for inspection).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
vmt="$repo/vm-tests"
cache=${AGENTD_VM_CACHE:-$vmt/cache}
timeout_s=${AGENTD_VM_TIMEOUT:-900}
pytest_args=${AGENTD_VM_PYTEST_ARGS:-}
pip="$repo/.venv/bin/pip"
start=$SECONDS

log() { printf 'vm-test [%4ds] %s\n' $((SECONDS - start)) "$*"; }
die() { log "ERROR: $*"; echo "0 passed, 1 failed"; exit 1; }
hash_files() { (cd "$repo" && sha256sum "$@" | sha256sum | cut -c1-16); }
# Every regular file under the given paths, sorted, caches and bytecode left out.
files_under() {
    (cd "$repo" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
        ! -path 'vm-tests/cache/*' 2>/dev/null | LC_ALL=C sort)
}

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
[ -x "$pip" ] || die "no $pip: run 'make venv' first"
mkdir -p "$cache"
# One run at a time per cache: a second one waits rather than rebuild under the first.
exec 9>"$cache/.lock"
flock 9

# Undone on any exit: the proc mount in the staging root, the console tail.
proc_mount=
tailpid=
cleanup() {
    [ -n "$proc_mount" ] && umount "$proc_mount" 2>/dev/null
    [ -n "$tailpid" ] && kill "$tailpid" 2>/dev/null
    return 0
}
trap cleanup EXIT

# --- host tools -------------------------------------------------------------------------
need=()
for pkg in qemu-system-x86 qemu-utils busybox-static debootstrap cpio kmod e2fsprogs; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing host packages: ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" \
        >"$cache/apt.log" 2>&1 || { tail -20 "$cache/apt.log"; die "apt-get install failed"; }
fi
# apt-get download in build-base.sh needs package lists even when nothing was missing.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then apt-get update -q >/dev/null; fi

# --- base: kernel, initramfs, debootstrapped root ----------------------------------------
base_key=$(hash_files vm-tests/build-base.sh vm-tests/initramfs-init)
base="$cache/base-$base_key"
if [ ! -d "$base" ]; then
    log "building the base image (cache miss: $base)"
    rm -rf "$cache"/base-*   # one base is enough; old ones are 700 MB each
    "$vmt/build-base.sh" "$base" || die "base image build failed"
else
    log "base image cached: $base"
fi

# --- wheels: dependencies from PyPI, the test runner too ---------------------------------
wheels_key=$(hash_files pyproject.toml)
wheels="$cache/wheels-$wheels_key"
if [ ! -d "$wheels" ]; then
    log "downloading dependency wheels"
    rm -rf "$cache"/wheels-* "$wheels.tmp"
    mkdir -p "$wheels.tmp"
    # The runtime dependencies as pyproject.toml declares them, plus pytest for the guest.
    deps=$("$repo/.venv/bin/python" -c '
import tomllib, sys
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"]))' "$repo/pyproject.toml")
    mapfile -t deplist <<<"$deps"
    "$pip" download -q --only-binary=:all: -d "$wheels.tmp" "${deplist[@]}" pytest pytest-timeout \
        >"$cache/pip.log" 2>&1 || {
        # A dependency without a wheel for this platform: build it here instead.
        "$pip" wheel -q -w "$wheels.tmp" "${deplist[@]}" pytest pytest-timeout \
            >>"$cache/pip.log" 2>&1 || { tail -20 "$cache/pip.log"; die "pip download failed"; }
    }
    mv "$wheels.tmp" "$wheels"
fi

# --- image: base + agentd + units + suite -------------------------------------------------
mapfile -t inputs < <(files_under agentd pyproject.toml README.md systemd scripts/install.sh \
    policies tests vm-tests/guest)
image_key=$( { echo "$base_key $wheels_key"; hash_files "${inputs[@]}"; } | sha256sum | cut -c1-16)
image="$cache/image-$image_key"
if [ ! -f "$image/rootfs.img" ]; then
    log "building the image (cache miss: $image)"
    rm -rf "$cache"/image-* "$cache/stage"
    stage="$cache/stage"
    mkdir -p "$image" "$stage"

    log "building the agentd wheel from the checkout"
    dist="$stage/dist"
    "$pip" wheel -q --no-deps --no-build-isolation -w "$dist" "$repo" >"$cache/wheel.log" 2>&1 ||
        { tail -20 "$cache/wheel.log"; die "building the agentd wheel failed"; }
    wheel=$(ls "$dist"/agentd-*.whl)

    log "copying the base root"
    cp -a "$base/rootfs" "$stage/root"
    r="$stage/root"
    # What install.sh needs, where it would be on an operator's host after unpacking a release.
    src="$r/tmp/agentd-src"
    mkdir -p "$src/scripts" "$src/wheels"
    cp -a "$repo/systemd" "$repo/policies" "$src/"
    cp "$repo/scripts/install.sh" "$src/scripts/"
    cp "$wheels"/*.whl "$wheel" "$src/wheels/"

    log "installing agentd in the guest root (chroot)"
    mount -t proc proc "$r/proc"
    proc_mount="$r/proc"
    # A clean environment: nothing of this host's (PIP_*, proxies) may leak into the guest.
    in_root=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$r")
    "${in_root[@]}" /tmp/agentd-src/scripts/install.sh --offline /tmp/agentd-src/wheels \
        "/tmp/agentd-src/wheels/$(basename "$wheel")" >"$cache/install.log" 2>&1 ||
        { tail -30 "$cache/install.log"; die "scripts/install.sh failed in the guest root"; }
    # The suite: pytest into the same venv; tests/ beside pyproject.toml (for its pytest
    # settings) but without the agentd/ source, so the tests import the installed package.
    "${in_root[@]}" /opt/agentd/bin/pip install -q --no-index --find-links /tmp/agentd-src/wheels \
        pytest pytest-timeout >>"$cache/install.log" 2>&1 || die "installing pytest failed"
    umount "$r/proc"
    proc_mount=
    t="$r/opt/agentd-tests"
    mkdir -p "$t"
    cp -a "$repo/tests" "$t/tests"
    cp "$repo/pyproject.toml" "$t/"
    cp -a "$vmt/guest" "$t/vm"
    "$vmt/guest/setup-guest.sh" "$r"
    # Kept for test_upgrade.py, which runs install.sh again on the live guest.
    mv "$src" "$r/opt/agentd-src"

    log "making the ext4 image"
    mkfs.ext4 -q -F -L agentd-vm -d "$r" "$image/rootfs.img.tmp" 3G || die "mkfs.ext4 failed"
    mv "$image/rootfs.img.tmp" "$image/rootfs.img"
    [ "${AGENTD_VM_KEEP:-0}" = 1 ] || rm -rf "$stage"
else
    log "image cached: $image"
fi

# --- boot ---------------------------------------------------------------------------------
console="$cache/console.log"
results="$cache/results.txt"
overlay="$cache/run.qcow2"
rm -f "$console" "$results" "$overlay"
qemu-img create -q -f qcow2 -F raw -b "$image/rootfs.img" "$overlay"

log "booting the VM (TCG; console: $console; timeout ${timeout_s}s)"
append="console=ttyS0 panic=-1 rw systemd.unified_cgroup_hierarchy=1 systemd.show_status=error"
append+=" loglevel=4 agentd.pytest_args=$(printf %s "$pytest_args" | base64 -w0)"
# Progress lines the guest prints ("agentd-vm: ...") are shown as they come.
touch "$console"
tail -n +1 -F "$console" 2>/dev/null | grep --line-buffered -a '^agentd-vm:' &
tailpid=$!
set +e
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m 2048 \
    -nodefaults -display none -no-reboot -monitor none \
    -serial "file:$console" \
    -bios /usr/share/qemu/qboot.rom \
    -kernel "$base/vmlinuz" -initrd "$base/initrd.gz" \
    -drive "file=$overlay,format=qcow2,if=virtio" \
    -append "$append" </dev/null
qrc=$?
set -e
sleep 0.5
kill "$tailpid" 2>/dev/null || true
wait "$tailpid" 2>/dev/null || true
tailpid=
rm -f "$overlay"
[ "$qrc" = 124 ] && log "TIMEOUT: the VM did not power off within ${timeout_s}s"
log "VM exited ($qrc)"

# --- results ------------------------------------------------------------------------------
# The guest prints, between the markers, one line per test: "RESULT <outcome> <test id>",
# then the failures' reports between their own markers.
tr -d '\r' <"$console" |
    awk '/^@@AGENTD-VM-RESULTS-BEGIN@@/ {on=1; next} /^@@AGENTD-VM-RESULTS-END@@/ {on=0} on' \
    >"$results"
if ! grep -q '^@@AGENTD-VM-RESULTS-END@@' <(tr -d '\r' <"$console"); then
    echo "---- last 60 lines of the console ($console) ----"
    tail -n 60 "$console" | tr -d '\r'
    die "the guest did not report results (see $console)"
fi
tr -d '\r' <"$console" |
    awk '/^@@AGENTD-VM-FAILURES-BEGIN@@/ {on=1; next} /^@@AGENTD-VM-FAILURES-END@@/ {on=0} on'
# One line per test, as pytest -v would; skipped ones (the v1/hybrid cases of the cgroup
# suite, which cannot run on a pure cgroup v2 guest) only in the count.
grep '^RESULT ' "$results" | awk '$2 != "SKIPPED" {printf "%-7s %s\n", $2, $3}'
passed=$(grep -c '^RESULT PASSED ' "$results" || true)
failed=$(grep -c -E '^RESULT (FAILED|ERROR) ' "$results" || true)
skipped=$(grep -c '^RESULT SKIPPED ' "$results" || true)
if [ "$qrc" != 0 ]; then
    # The results may all be in, but a VM that did not power off by itself is a failure.
    echo "ERROR   the VM exited with status $qrc (124: timeout)"
    failed=$((failed + 1))
fi
log "done; console log kept at $console"
if [ "$((passed + failed))" = 0 ]; then
    die "the guest ran no test"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
