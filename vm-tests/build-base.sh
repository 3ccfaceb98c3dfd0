#!/usr/bin/env bash
# Builds the part of the VM that does not depend on the checkout: a Debian kernel, a busybox
# initramfs that loads virtio + ext4 and switch_roots, and a debootstrapped root directory with
# systemd and Python. run.sh caches the result under a key made of this file's inputs, so it is
# rebuilt only when they change (≈ 1–2 min cold, dominated by debootstrap).
#
# Usage: build-base.sh OUT_DIR        (OUT_DIR must not exist; it is created atomically)
# Why not a cloud image: the only reachable registries are Debian's package mirrors and PyPI;
# debootstrap builds from the mirror, a prebuilt disk image would have to be downloaded.
set -euo pipefail

out=$1
here=$(cd "$(dirname "$0")" && pwd)
tmp="$out.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"

# The mirror this machine's apt already uses: the only one reachable from here.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

# Packages of the guest. systemd-sysv makes systemd pid 1; kmod, or module loading units fail;
# python3-venv for /opt/agentd; libseccomp2 for pyseccomp; nftables for network policies;
# procps for ps/pgrep in the tests.
include=systemd,systemd-sysv,dbus,kmod,python3,python3-venv,libseccomp2,nftables,procps

echo "build-base: kernel"
# The kernel package that linux-image-amd64 points at, unpacked (not installed) on the host.
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
mkdir -p "$tmp/kernel"
(cd "$tmp/kernel" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >/dev/null)
dpkg-deb -x "$tmp"/kernel/*.deb "$tmp/kernel/root"
kver=$(ls "$tmp/kernel/root/lib/modules")
cp "$tmp/kernel/root/boot/vmlinuz-$kver" "$tmp/vmlinuz"
echo "$kver" >"$tmp/kernel-version"
depmod -b "$tmp/kernel/root" "$kver"

echo "build-base: initramfs"
# modprobe --show-depends lists, in load order, the insmod lines a module needs.
ird="$tmp/initramfs"
mkdir -p "$ird"/{bin,dev,proc,sys,newroot}
cp /bin/busybox "$ird/bin/busybox"
cp "$here/initramfs-init" "$ird/init"
chmod 755 "$ird/init"
: >"$ird/modules"
for m in virtio_pci virtio_blk crc32c_generic ext4; do
    modprobe -d "$tmp/kernel/root" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}' |
        while read -r path; do
            rel=${path#"$tmp/kernel/root"}
            grep -qxF "$rel" "$ird/modules" && continue
            mkdir -p "$ird$(dirname "$rel")"
            cp "$path" "$ird$rel"
            echo "$rel" >>"$ird/modules"
        done
done
(cd "$ird" && find . | cpio -o -H newc --quiet) | gzip -1 >"$tmp/initrd.gz"

echo "build-base: debootstrap from $mirror"
debootstrap --variant=minbase --include="$include" bookworm "$tmp/rootfs" "$mirror" \
    >"$tmp/debootstrap.log" 2>&1 || { tail -30 "$tmp/debootstrap.log"; exit 1; }
# The guest has no network: apt's downloaded packages and lists are dead weight in the image.
rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/lib/apt/lists/*

echo "build-base: modules and guest configuration"
mkdir -p "$tmp/rootfs/lib/modules"
cp -a "$tmp/kernel/root/lib/modules/$kver" "$tmp/rootfs/lib/modules/"
# Hardware a virtio guest never has: about 250 MiB of modules less to put in every image.
(cd "$tmp/rootfs/lib/modules/$kver/kernel" && rm -rf sound drivers/{gpu,media,scsi,usb} \
    drivers/{infiniband,iio,staging,platform,hwmon,hid,input,ata,bluetooth,isdn,mtd,mmc} \
    drivers/net/{ethernet,wireless,usb,can,wwan} net/{wireless,mac80211,bluetooth})
depmod -b "$tmp/rootfs" "$kver"
rm -rf "$tmp/kernel" "$tmp/initramfs"

r="$tmp/rootfs"
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" >"$r/etc/fstab"
echo agentd-vm >"$r/etc/hostname"
: >"$r/etc/machine-id"   # generated at first boot
# Nothing here may wait for a network or a login: the guest has no network and nobody logs in.
# Masking (a symlink to /dev/null) is what `systemctl mask` does; done by hand as systemd is
# not running in this chroot.
for unit in serial-getty@ttyS0.service getty@tty1.service getty.target \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer systemd-networkd-wait-online.service; do
    ln -sf /dev/null "$r/etc/systemd/system/$unit"
done
# Journal kept on disk so that a stop/start of agentd and the suite can both read it.
mkdir -p "$r/var/log/journal"

mv "$tmp" "$out"
echo "build-base: done ($kver)"
