#!/bin/bash
# Boots Debian's stock cloud kernel under vmm with a busybox initramfs that loads the virtio
# modules, then reads and writes /dev/vda; checks the write afterwards with qemu-img.
#
# Needs hardware-backed KVM (VT-x / AMD-V). On the project's machines /dev/kvm is a nested,
# page-table-based KVM (kvm_pvm) on which no stock Linux kernel boots (see
# ../shared/ENVIRONMENT.md): the script detects that and says plainly that it skips.
#
# Usage: vmm/scripts/linux-boot.sh [path/to/vmm]   (run as root: apt-get download, dpkg -x)
set -euo pipefail

VMM=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/vmm}

if [ ! -e /dev/kvm ]; then
    echo "SKIPPED: /dev/kvm does not exist; the Linux boot test needs KVM."
    exit 0
fi
if [ -d /sys/module/kvm_pvm ]; then
    echo "SKIPPED: this host's KVM is kvm_pvm (nested, page-table-based). A stock Linux kernel"
    echo "         cannot boot on it (it dies on cmpxchg16b, xrstor and the int3 self-test), under"
    echo "         vmm or qemu alike. Run this script on a host with VT-x/AMD-V."
    exit 0
fi
if [ ! -x "$VMM" ]; then
    echo "vmm binary not found at $VMM; build it with: cargo build -p vmm --release" >&2
    exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

apt-get download linux-image-cloud-amd64 >/dev/null
dep=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*' | head -1)
apt-get download "$dep" >/dev/null
dpkg -x "${dep}"_*.deb root
KVER=$(ls root/lib/modules | head -1)
KERNEL=$(ls root/boot/vmlinuz-* | head -1)
echo "kernel $KVER"

command -v busybox >/dev/null || apt-get install -y busybox-static >/dev/null
mkdir -p initramfs/{bin,dev,proc,sys,lib/modules}
cp "$(command -v busybox)" initramfs/bin/busybox
for m in virtio virtio_ring virtio_mmio virtio_blk; do
    f=$(find root/lib/modules/"$KVER" -name "$m.ko*" | head -1)
    [ -n "$f" ] && cp "$f" initramfs/lib/modules/
done
cat > initramfs/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio virtio_ring virtio_mmio virtio_blk; do
    for f in /lib/modules/$m.ko*; do
        case $f in *.xz) xz -dc $f > /tmp.ko; insmod /tmp.ko;; *.zst) zstd -dc $f > /tmp.ko 2>/dev/null && insmod /tmp.ko;; *) insmod $f;; esac
    done
done
sleep 1
if [ -b /dev/vda ]; then
    dd if=/dev/vda bs=4096 count=1 2>/dev/null | head -c 16 | od -An -tx1
    echo "linux-boot: hello from the guest" | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync 2>/dev/null
    echo "LINUX-BOOT: PASS /dev/vda read and written"
else
    echo "LINUX-BOOT: FAIL no /dev/vda"
fi
poweroff -f
INIT
chmod +x initramfs/init
(cd initramfs && find . | cpio -o -H newc 2>/dev/null | gzip) > initramfs.cpio.gz

qemu-img create -f qcow2 disk.qcow2 64M >/dev/null
timeout 120 "$VMM" --kernel "$KERNEL" --initrd initramfs.cpio.gz --memory 512M --cpus 2 \
    --cmdline "console=ttyS0 reboot=k panic=1 noxsave" \
    --disk path=disk.qcow2,format=qcow2 | tee console.log
grep -q "LINUX-BOOT: PASS" console.log
qemu-img check disk.qcow2
qemu-img convert -f qcow2 -O raw disk.qcow2 disk.raw
dd if=disk.raw bs=512 skip=8 count=1 2>/dev/null | grep -q "hello from the guest"
echo "linux-boot: PASS (guest write visible to qemu-img convert, check clean)"
