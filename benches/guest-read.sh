#!/usr/bin/env bash
# In-guest read throughput against the host's: the VMM's test guest reads a raw image through
# virtio-blk, and `img bench` reads the same image on the host, alternating, in the same run.
#
#   benches/guest-read.sh              # 1 GiB image, 3 rounds
#   benches/guest-read.sh --size 256M --rounds 5
#
# Both sides do sequential 64 KiB reads of the whole image from the host page cache (the image
# is read once first): the guest at queue depths 1, 8, 32 and 64 on one queue, interrupt-driven
# from ring 0 and polled from ring 3, and at depths 8, 32 and 64 split over two queues
# (`tg.mode0=bench`, a read-only disk with num_queues=2, so that two I/O threads serve it);
# `img bench -s 64K -t writeback` at depths 1 and 64. The guest also does random 4 KiB reads
# both ways. It prints each figure's median (MiB/s; IOPS for random reads) and the guest's rate
# as a share of the host's. Needs /dev/kvm. The machines are shared: compare ratios, not
# absolute rates.
#
# Why ring 3: where KVM is page-table based (no VT-x/AMD-V underneath; /sys/module/kvm_pvm),
# guest supervisor code is emulated instruction by instruction and only guest user code runs
# natively, so the ring-0 figures measure that emulator; the ring-3 ones measure the VMM.
set -euo pipefail

SIZE=1G
ROUNDS=3
while [ $# -gt 0 ]; do
    case "$1" in
    --size) SIZE=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ ! -c /dev/kvm ]; then
    echo "guest-read: SKIPPED: /dev/kvm is missing; the guest cannot run" >&2
    exit 1
fi
cargo build --release -q -p vmm -p img-tool
IMG=$ROOT/target/release/img
VMM=$ROOT/target/release/vmm
GUEST=$(ls -t "$ROOT"/target/release/build/vmm-*/out/test-guest | head -1)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

BYTES=$(numfmt --from=iec "$SIZE")
COUNT=$((BYTES / 65536))
head -c "$BYTES" /dev/urandom >"$TMP/disk.raw"
cat "$TMP/disk.raw" >/dev/null
echo "image: $SIZE of random data ($COUNT 64 KiB reads per pass); load: $(cut -d' ' -f1-3 /proc/loadavg)"

host() { # depth -> MiB/s
    local secs
    secs=$("$IMG" bench -f raw -t writeback -s 64K -d "$1" -c "$COUNT" "$TMP/disk.raw" |
        sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p')
    awk -v b="$BYTES" -v s="$secs" 'BEGIN { printf "%d\n", b / s / 1048576 }'
}

declare -A R
for round in $(seq "$ROUNDS"); do
    R[host1]+="$(host 1) "
    R[host64]+="$(host 64) "
    out=$("$VMM" --kernel "$GUEST" --memory 256M --serial stdio \
        --disk "path=$TMP/disk.raw,format=raw,readonly=on,num_queues=2" --cmdline "console=ttyS0 tg.mode0=bench")
    if ! grep -q " passed, 0 failed" <<<"$out"; then
        echo "guest-read: the guest reported failures:" >&2
        echo "$out" >&2
        exit 1
    fi
    for d in 1 8 32 64; do
        R[guest$d]+="$(sed -n "s/.*sequential 64 KiB reads, queue depth $d: \([0-9]*\) MiB\/s.*/\1/p" <<<"$out") "
    done
    for d in 1 8 32 64; do
        R[polled$d]+="$(sed -n "s/.*sequential 64 KiB reads, polled from ring 3, queue depth $d: \([0-9]*\) MiB\/s.*/\1/p" <<<"$out") "
    done
    R[rand4k_iops]+="$(sed -n "s/.*random 4 KiB reads, queue depth 1: .*, \([0-9]*\) IOPS.*/\1/p" <<<"$out") "
    R[rand4k_polled_iops]+="$(sed -n "s/.*random 4 KiB reads, polled from ring 3, queue depth 1: .*, \([0-9]*\) IOPS.*/\1/p" <<<"$out") "
    for d in 8 32 64; do
        R[guest2q$d]+="$(sed -n "s/.*sequential 64 KiB reads, 2 queues, queue depth $d: \([0-9]*\) MiB\/s.*/\1/p" <<<"$out") "
    done
    echo "round $round done"
done

median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
printf '%-28s %10s   %s\n' "sequential 64 KiB reads" "MiB/s" "all rounds"
for k in host1 host64 guest1 guest8 guest32 guest64 polled1 polled8 polled32 polled64 \
    guest2q8 guest2q32 guest2q64 rand4k_iops rand4k_polled_iops; do
    printf '%-28s %10s   %s\n' "$k" "$(median "${R[$k]}")" "${R[$k]}"
done
h1=$(median "${R[host1]}") h64=$(median "${R[host64]}")
g1=$(median "${R[guest1]}") g64=$(median "${R[guest64]}")
p64=$(median "${R[polled64]}")
best_g=$(for k in guest1 guest8 guest32 guest64 polled1 polled8 polled32 polled64 \
    guest2q8 guest2q32 guest2q64; do median "${R[$k]}"; done |
    sort -n | tail -1)
best_h=$(printf '%s\n' "$h1" "$h64" | sort -n | tail -1)
awk -v a="$g1" -v b="$h1" 'BEGIN { printf "guest / host at depth 1:    %.0f%%\n", 100 * a / b }'
awk -v a="$g64" -v b="$h64" 'BEGIN { printf "guest / host at depth 64:   %.0f%%\n", 100 * a / b }'
awk -v a="$p64" -v b="$h64" 'BEGIN { printf "polled guest / host, d64:   %.0f%%\n", 100 * a / b }'
awk -v a="$p64" -v b="$h1" 'BEGIN { printf "polled guest d64 / host d1: %.0f%%\n", 100 * a / b }'
g2=$(median "${R[guest2q64]}")
awk -v a="$g2" -v b="$h64" 'BEGIN { printf "guest, 2 queues / host, d64: %.0f%%\n", 100 * a / b }'
awk -v a="$best_g" -v b="$best_h" 'BEGIN { printf "best guest / best host:     %.0f%%\n", 100 * a / b }'
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
