#!/usr/bin/env bash
# Side-by-side convert benchmark: `img` against qemu-img on the same data, in the same run.
#
#   benches/convert.sh            # full run: two 1 GiB data sets, 3 rounds
#   benches/convert.sh --quick    # smoke test: 64 MiB data sets, 1 round
#   benches/convert.sh --size 2G --rounds 5 --only 'c-zstd|stream'
#
# It builds `img` in release mode, generates two sparse data sets in a temporary directory
# (half random / half zero, and half real file content from /usr / half zero, in alternating
# 16 MiB runs), makes the source images with qemu-img, then runs every job with each tool in
# turn — alternating the order every round so that neither always runs on a warmer machine —
# and prints each one's median wall time (including an fsync of the output), its speed relative
# to qemu-img with its defaults (>1: faster than qemu-img), peak RSS, user/wall CPU ratio and
# output size. For the compressing jobs qemu-img also runs with `-m 16 -W` (parallel,
# out-of-order writes), its fastest settings. Every img output is checked against its source
# with `qemu-img compare` in the first round.
#
# Before each run the source is read into the page cache (both tools read it from there), the
# previous output is deleted and the disk left to settle. The machine's load average is printed before and after: these machines are
# shared, so compare ratios, not absolute times.
set -euo pipefail

SIZE=1G
ROUNDS=3
ONLY=.
KEEP=
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) SIZE=64M ROUNDS=1 ;;
    --size) SIZE=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --keep) KEEP=1 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cargo build --quiet --release -p img-tool --manifest-path "$ROOT/Cargo.toml"
IMG=$ROOT/target/release/img
QEMU=$(command -v qemu-img)
TIME=/usr/bin/time
[ -x "$TIME" ] || { echo "needs GNU time (/usr/bin/time, Debian package 'time')" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/img-bench.XXXXXX")
[ -n "$KEEP" ] || trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

bytes=$(numfmt --from=iec "$SIZE")
RUN=$((16 << 20))
[ "$bytes" -ge $((2 * RUN)) ] || { echo "--size must be at least 32M" >&2; exit 2; }
runs=$((bytes / RUN))
half=$(((runs + 1) / 2 * RUN))

# Lays $2 (a stream of at least half the size) into a sparse file $1: data, hole, data, ...
lay_out() {
    local out=$1 src=$2 i
    truncate -s "$bytes" "$out"
    for ((i = 0; i < runs; i += 2)); do
        dd if="$src" of="$out" bs=1M iflag=skip_bytes,count_bytes oflag=seek_bytes \
            skip=$((i / 2 * RUN)) seek=$((i * RUN)) count=$RUN conv=notrunc,sparse status=none
    done
}

echo "# generating data sets of $SIZE in $WORK" >&2
head -c "$half" /dev/urandom >stream.rand
lay_out rand.raw stream.rand
# Real file content: the larger files under /usr, concatenated in a fixed order.
find /usr -xdev -type f -size +8k 2>/dev/null | LC_ALL=C sort | head -n 100000 |
    tr '\n' '\0' | xargs -0 cat 2>/dev/null | head -c "$half" >stream.usr || true
lay_out usr.raw stream.usr
rm -f stream.rand stream.usr

for d in rand usr; do
    "$QEMU" convert -f raw -O qcow2 $d.raw $d.qcow2
    "$QEMU" convert -f raw -O qcow2 -c -o compression_type=zlib $d.raw $d.zlib.qcow2
    "$QEMU" convert -f raw -O qcow2 -c -o compression_type=zstd $d.raw $d.zstd.qcow2
    "$QEMU" convert -f raw -O vmdk -o subformat=streamOptimized $d.raw $d.stream.vmdk
done

# name|compressing (1: also run qemu-img -m 16 -W)|source suffix|convert arguments|output
JOBS=(
    "raw-qcow2|0|raw|-f raw -O qcow2|qcow2"
    "raw-vdi|0|raw|-f raw -O vdi|vdi"
    "raw-vmdk|0|raw|-f raw -O vmdk|vmdk"
    "qcow2-raw|0|qcow2|-f qcow2 -O raw|raw"
    "c-zlib-raw|0|zlib.qcow2|-f qcow2 -O raw|raw"
    "c-zstd-raw|0|zstd.qcow2|-f qcow2 -O raw|raw"
    "stream-raw|0|stream.vmdk|-f vmdk -O raw|raw"
    "raw-c-zlib|1|raw|-f raw -O qcow2 -c -o compression_type=zlib|qcow2"
    "raw-c-zstd|1|raw|-f raw -O qcow2 -c -o compression_type=zstd|qcow2"
    "raw-stream|1|raw|-f raw -O vmdk -o subformat=streamOptimized|vmdk"
)

# The block device under $WORK, whose in-flight count settle() watches (empty if unknown).
DEV=$(basename "$(df --output=source . | tail -1)")
[ -r "/sys/class/block/$DEV/inflight" ] || DEV=

# Lets the disk finish what the previous run left (its writeback, the discards of a deleted
# output) before the next run starts, so that no run pays for another's I/O.
settle() {
    sync -f . 2>/dev/null || true
    if [ -n "$DEV" ]; then
        local i r w
        for ((i = 0; i < 100; i++)); do
            read -r r w <"/sys/class/block/$DEV/inflight"
            [ "$r$w" = 00 ] && break
            sleep 0.05
        done
    fi
    sleep 3
}

# One timed run: tool, source, args, output. Appends "wall user rss_kib size" to $results/key.
measure() {
    local key=$1 tool=$2 src=$3 args=$4 out=$5 extra=$6
    rm -f "$out"
    # The machine's memory manager evicts page-cache pages idle for a minute or so (DAMON
    # pageout): read the source back in, or whichever tool runs first pays for the disk reads.
    cat "$src" >/dev/null
    settle
    # shellcheck disable=SC2086
    if ! $TIME -f '%e %U %M' -o time.txt sh -c "\"$tool\" convert $extra $args \"$src\" \"$out\" && sync \"$out\""; then
        echo "# FAILED: $key" >&2
        touch "results/$key.failed"
        return 0
    fi
    local size
    size=$(du -B1 "$out" | cut -f1)
    echo "$(cat time.txt) $size" >>"results/$key"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

mkdir -p results
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores" >&2
for ((round = 1; round <= ROUNDS; round++)); do
    for d in rand usr; do
        for job in "${JOBS[@]}"; do
            IFS='|' read -r name comp srcsfx args outfmt <<<"$job"
            [[ "$d/$name" =~ $ONLY ]] || continue
            src=$d.$srcsfx
            out=out.$outfmt
            tools=(img qemu)
            [ "$comp" = 1 ] && tools+=(qemuW)
            # Alternate the order each round.
            if ((round % 2 == 0)); then
                tools=($(printf '%s\n' "${tools[@]}" | tac))
            fi
            for t in "${tools[@]}"; do
                case $t in
                img) measure "$d.$name.$t" "$IMG" "$src" "$args" "$out" "" ;;
                qemu) measure "$d.$name.$t" "$QEMU" "$src" "$args" "$out" "" ;;
                qemuW) measure "$d.$name.$t" "$QEMU" "$src" "$args" "$out" "-m 16 -W" ;;
                esac
                if [ "$t" = img ] && [ "$round" = 1 ] && [ ! -e "results/$d.$name.img.failed" ]; then
                    "$QEMU" compare -q -f raw "$d.raw" "$out" ||
                        { echo "MISMATCH: img output of $d/$name differs from its source" >&2; exit 1; }
                fi
            done
            echo "# round $round $d/$name done" >&2
        done
    done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

printf '\n%-16s %-12s %9s %8s %8s %8s %9s %10s\n' data/job tool median_s vs_qemu vs_-W rss_MiB user/wall size_MiB
for d in rand usr; do
    for job in "${JOBS[@]}"; do
        IFS='|' read -r name comp _ _ _ <<<"$job"
        [ -f "results/$d.$name.img" ] || [ -f "results/$d.$name.img.failed" ] || continue
        q=$(cut -d' ' -f1 "results/$d.$name.qemu" 2>/dev/null | median)
        w=
        [ -f "results/$d.$name.qemuW" ] && w=$(cut -d' ' -f1 "results/$d.$name.qemuW" | median)
        for t in img qemu qemuW; do
            f=results/$d.$name.$t
            if [ -e "$f.failed" ]; then
                printf '%-16s %-12s %9s\n' "$d/$name" "$t" FAILED
                continue
            fi
            [ -f "$f" ] || continue
            wall=$(cut -d' ' -f1 "$f" | median)
            uw=$(awk '{ print ($1 > 0 ? $2 / $1 : 0) }' "$f" | median)
            rss=$(cut -d' ' -f3 "$f" | sort -n | tail -1)
            size=$(cut -d' ' -f4 "$f" | median)
            label=$t
            [ "$t" = qemuW ] && label="qemu -m16 -W"
            vs=$(awk -v q="$q" -v x="$wall" 'BEGIN { printf "%.2f", (x > 0 ? q / x : 0) }')
            vw=-
            [ -n "$w" ] && vw=$(awk -v q="$w" -v x="$wall" 'BEGIN { printf "%.2f", (x > 0 ? q / x : 0) }')
            printf '%-16s %-12s %9.2f %8s %8s %8.1f %9.2f %10.1f\n' "$d/$name" "$label" "$wall" "$vs" "$vw" \
                "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')" "$uw" \
                "$(awk -v b="$size" 'BEGIN { print b / 1048576 }')"
        done
    done
done
echo
echo "vs_qemu, vs_-W: the other's median wall time / this one's (above 1: faster). $ROUNDS round(s), data sets of $SIZE."
