//! Small or sparse images whose headers are valid but ask `img` for gigabytes of memory or
//! minutes of work. Each is built here; `img` must refuse it with a clear error naming the file
//! and the field, or handle it in bounded memory (peak RSS measured on the real binary).
//!
//! The thresholds leave several times the memory the fixed code needs, and are a fraction of
//! what it took before.

mod common;

use common::{img_peak_rss, Env, MIB};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

/// A dynamic VDI of `blocks` 1 MiB blocks whose block map is all zeroes: every block claims
/// data block 0, and the header says none is allocated. Sparse: the map is a hole.
fn vdi_all_blocks_at_zero(env: &Env, name: &str, blocks: u32) {
    let mut h = vec![0u8; 512];
    let text = b"<<< QEMU VM Virtual Disk Image >>>\n";
    h[..text.len()].copy_from_slice(text);
    let mut put = |at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(0x40, &0xbeda_107f_u32.to_le_bytes());
    put(0x44, &0x0001_0001_u32.to_le_bytes());
    put(0x48, &0x180u32.to_le_bytes());
    put(0x4c, &1u32.to_le_bytes()); // dynamic
    let bmap = 0x200u32;
    let data = bmap + (blocks * 4).div_ceil(1 << 20) * (1 << 20);
    put(0x154, &bmap.to_le_bytes());
    put(0x158, &data.to_le_bytes());
    put(0x168, &512u32.to_le_bytes());
    put(0x170, &(u64::from(blocks) << 20).to_le_bytes());
    put(0x178, &(1u32 << 20).to_le_bytes());
    put(0x180, &blocks.to_le_bytes());
    put(0x188, &[0x11; 16]);
    env.sparse_file(name, u64::from(data) + MIB);
    env.write_at(name, 0, &h);
}

/// Four million blocks of a VDI claiming one data block: `img check` reports the first lines
/// and how many more there were, in tens of MiB rather than the half GiB that keeping every
/// line took.
#[test]
fn check_of_four_million_aliased_vdi_blocks_keeps_memory_bounded() {
    let env = Env::new();
    let blocks = 4 << 20;
    vdi_all_blocks_at_zero(&env, "aliased.vdi", blocks);
    let (out, kib) = img_peak_rss(env.dir.path(), &["check", "aliased.vdi"], TIMEOUT);
    eprintln!("img check peak RSS: {kib} KiB");
    let out = out.code_is(2);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 10_001, "{}", &out.stderr[..200]);
    assert_eq!(lines[0], "ERROR: block index 1 also used by 0");
    assert_eq!(
        lines[10_000],
        format!("... and {} more messages like these", blocks - 10_000)
    );
    assert!(out
        .stdout
        .contains(&format!("\n{blocks} errors were found")));
    assert!(kib < 128 * 1024, "img check peaked at {kib} KiB");
}
