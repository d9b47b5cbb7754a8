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
    vdi_image(env, name, blocks, 1);
}

/// A VDI of `blocks` 1 MiB blocks, all mapped to data block 0, of image type `kind` (1
/// dynamic, 4 differencing: its parent is the image whose UUID is 0x22 bytes).
fn vdi_image(env: &Env, name: &str, blocks: u32, kind: u32) {
    let mut h = vec![0u8; 512];
    let text = b"<<< QEMU VM Virtual Disk Image >>>\n";
    h[..text.len()].copy_from_slice(text);
    let mut put = |at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(0x40, &0xbeda_107f_u32.to_le_bytes());
    put(0x44, &0x0001_0001_u32.to_le_bytes());
    put(0x48, &0x180u32.to_le_bytes());
    put(0x4c, &kind.to_le_bytes());
    let bmap = 0x200u32;
    let data = bmap + (blocks * 4).div_ceil(1 << 20) * (1 << 20);
    put(0x154, &bmap.to_le_bytes());
    put(0x158, &data.to_le_bytes());
    put(0x168, &512u32.to_le_bytes());
    put(0x170, &(u64::from(blocks) << 20).to_le_bytes());
    put(0x178, &(1u32 << 20).to_le_bytes());
    put(0x180, &blocks.to_le_bytes());
    put(0x188, &[0x11; 16]);
    if kind == 4 {
        put(0x1a8, &[0x22; 16]); // the parent's UUID
    }
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
    assert_eq!(lines[0], "ERROR: block index 0 also used by 0");
    assert_eq!(
        lines[10_000],
        format!("... and {} more messages like these", blocks - 10_000)
    );
    assert!(out
        .stdout
        .contains(&format!("\n{blocks} errors were found")));
    assert!(kib < 128 * 1024, "img check peaked at {kib} KiB");
}

/// A qcow2 image with one bitmap, marked in use, whose table has 128 Mi entries: 1 GiB, a hole
/// in the sparse file. qemu-img refuses to open it (the bitmap would take more than 512 MiB);
/// `img check` read the table whole, twice over, and took 2 GiB.
#[test]
fn check_of_qcow2_bitmap_with_a_gib_table_is_refused_quickly() {
    let env = Env::new();
    let cluster = 1u64 << 16;
    let entries = 0x0800_0000u32;
    let table_offset = 4 * cluster;
    let dir_offset = table_offset + u64::from(entries) * 8;
    let mut entry = Vec::new();
    entry.extend_from_slice(&table_offset.to_be_bytes());
    entry.extend_from_slice(&entries.to_be_bytes());
    entry.extend_from_slice(&1u32.to_be_bytes()); // in use
    entry.extend_from_slice(&[1, 16, 0, 4, 0, 0, 0, 0]);
    entry.extend_from_slice(b"huge");
    entry.resize(32, 0);
    let mut h = Vec::new();
    for v in [0x5146_49fb_u32, 3, 0, 0, 0, 16] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h.extend_from_slice(&(1u64 << 30).to_be_bytes()); // size
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&2u32.to_be_bytes()); // l1_size
    h.extend_from_slice(&(3 * cluster).to_be_bytes());
    h.extend_from_slice(&cluster.to_be_bytes()); // refcount table
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&[0; 12]);
    h.extend_from_slice(&[0; 16]);
    h.extend_from_slice(&1u64.to_be_bytes()); // autoclear: bitmaps
    h.extend_from_slice(&4u32.to_be_bytes());
    h.extend_from_slice(&112u32.to_be_bytes());
    h.resize(112, 0);
    for v in [0x2385_2875_u32, 24, 1, 0] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h.extend_from_slice(&(entry.len() as u64).to_be_bytes());
    h.extend_from_slice(&dir_offset.to_be_bytes());
    h.extend_from_slice(&[0; 8]);
    env.sparse_file("bitmap.qcow2", dir_offset + cluster);
    env.write_at("bitmap.qcow2", 0, &h);
    env.write_at("bitmap.qcow2", cluster, &(2 * cluster).to_be_bytes());
    env.write_at("bitmap.qcow2", dir_offset, &entry);
    let (out, kib) = img_peak_rss(env.dir.path(), &["check", "bitmap.qcow2"], TIMEOUT);
    eprintln!("img check peak RSS: {kib} KiB");
    let out = out.code_is(1);
    assert!(out.stderr.contains("bitmap.qcow2"), "{out}");
    assert!(out.stderr.contains("bitmap table too large"), "{out}");
    assert!(kib < 64 * 1024, "img check peaked at {kib} KiB");
}

/// A sparse extent of 2048 grain tables, all one table at sector 40 (1-sector grains, 512
/// entries per table): 16 KiB of directory, 2 KiB of table, 1 GiB of disk.
fn vmdk_one_table_everywhere(env: &Env, name: &str) -> u64 {
    let capacity: u64 = 2048 * 512;
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&1u64.to_le_bytes());
    h[44..48].copy_from_slice(&512u32.to_le_bytes());
    h[56..64].copy_from_slice(&1u64.to_le_bytes()); // directory at sector 1
    h[64..72].copy_from_slice(&48u64.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    env.sparse_file(name, 49 * 512);
    env.write_at(name, 0, &h);
    env.write_at(name, 512, &40u32.to_le_bytes().repeat(2048));
    capacity
}

/// 128 extents naming that file: reading them fills a grain table cache per extent. Each
/// extent kept up to 8 MiB of tables (1 GiB in all here, 8 GiB with 1024 extents); the
/// extents now share 8 MiB, and each keeps at least 64 KiB.
#[test]
fn map_of_many_extents_of_many_tables_keeps_memory_bounded() {
    let env = Env::new();
    let sectors = vmdk_one_table_everywhere(&env, "tables.vmdk");
    let mut d = String::from(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n",
    );
    for _ in 0..128 {
        d.push_str(&format!("RW {sectors} SPARSE \"tables.vmdk\"\n"));
    }
    d.push_str("\n# The Disk Data Base\n#DDB\nddb.adapterType = \"ide\"\n");
    env.write("many.vmdk", d.as_bytes());
    let (out, kib) = img_peak_rss(env.dir.path(), &["map", "many.vmdk"], TIMEOUT);
    eprintln!("img map peak RSS: {kib} KiB");
    let out = out.ok();
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    assert!(kib < 64 * 1024, "img map peaked at {kib} KiB");
}

/// A qcow2 v3 header of 64 KiB clusters with its refcount table at cluster 1, its L1 table
/// after it, and an optional backing file name after the header.
fn qcow2_header(
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    rt_clusters: u32,
    backing: Option<&str>,
) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&0x5146_49fb_u32.to_be_bytes());
    h.extend_from_slice(&3u32.to_be_bytes());
    let name = backing.unwrap_or("");
    let name_offset: u64 = if name.is_empty() { 0 } else { 120 };
    h.extend_from_slice(&name_offset.to_be_bytes());
    h.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
    h.extend_from_slice(&16u32.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&l1_size.to_be_bytes());
    h.extend_from_slice(&l1_offset.to_be_bytes());
    h.extend_from_slice(&(1u64 << 16).to_be_bytes());
    h.extend_from_slice(&rt_clusters.to_be_bytes());
    h.extend_from_slice(&[0; 12]); // no snapshots
    h.extend_from_slice(&[0; 24]); // feature bits
    h.extend_from_slice(&4u32.to_be_bytes());
    h.extend_from_slice(&112u32.to_be_bytes());
    h.resize(120, 0); // compression type, padding, end of extensions
    h.extend_from_slice(name.as_bytes());
    h
}

/// A backing chain of 16 images of a 1 GiB disk, each with the largest L1 table (4 Mi entries,
/// 32 MiB) and refcount table (8 MiB) qemu allows, both holes of a sparse file. Reading the
/// chain held every table whole (40 MiB a layer, as qemu-img does); a reader now holds only
/// the entries that cover the disk and the file. `check` still walks the whole tables.
#[test]
fn chain_of_images_with_largest_tables_reads_in_bounded_memory() {
    let env = Env::with_qemu();
    let layers = 16;
    let l1_entries = 4u32 << 20;
    let rt_clusters = 128;
    let l1_offset = (1 + u64::from(rt_clusters)) << 16;
    let len = l1_offset + u64::from(l1_entries) * 8;
    for i in 0..layers {
        let name = format!("l{i}.qcow2");
        let below = format!("l{}.qcow2", i + 1);
        let backing = (i + 1 < layers).then_some(below.as_str());
        env.sparse_file(&name, len);
        let h = qcow2_header(1 << 30, l1_entries, l1_offset, rt_clusters, backing);
        env.write_at(&name, 0, &h);
    }
    let dir = env.dir.path();
    let (out, map_kib) = img_peak_rss(dir, &["map", "--output=json", "l0.qcow2"], TIMEOUT);
    let out = out.ok();
    let (conv, convert_kib) = img_peak_rss(
        dir,
        &["convert", "-O", "raw", "l0.qcow2", "l0.raw"],
        TIMEOUT,
    );
    conv.ok();
    eprintln!("peak RSS over {layers} layers: map {map_kib} KiB, convert {convert_kib} KiB");
    assert_eq!(
        out.json(),
        env.qemu_img(&["map", "--output=json", "l0.qcow2"])
            .ok()
            .json()
    );
    assert_eq!(env.len("l0.raw"), 1 << 30);
    assert!(env.allocated("l0.raw") < MIB);
    assert!(map_kib < 64 * 1024, "img map peaked at {map_kib} KiB");
    assert!(
        convert_kib < 64 * 1024,
        "img convert peaked at {convert_kib} KiB"
    );
    // The check of a layer counts the whole tables, as qemu-img's does.
    let ours = env.img(&["check", "l3.qcow2"]);
    let theirs = env.qemu_img(&["check", "l3.qcow2"]);
    assert_eq!(ours.code, theirs.code, "{ours}\n{theirs}");
    assert_eq!(ours.stdout, theirs.stdout, "{ours}\n{theirs}");
}

/// Files an image names (a backing file, an extent, a differencing VDI's parent candidates) may
/// be FIFOs: opening one waited forever for a writer (qemu-img waits too). They are refused, or
/// passed over, at once.
#[test]
fn fifos_named_by_images_do_not_hang() {
    let env = Env::new();
    let mk = common::run_timeout(env.dir.path(), "mkfifo", &["pipe", "parent.vdi"], TIMEOUT);
    mk.ok();
    let quick = Duration::from_secs(20);
    // A qcow2 image backed by the FIFO.
    env.write(
        "top.qcow2",
        &qcow2_header(1 << 20, 1, 3 << 16, 1, Some("pipe")),
    );
    env.set_len("top.qcow2", 4 << 16);
    let out = env.img_timeout(&["map", "top.qcow2"], quick).code_is(1);
    assert!(
        out.stderr
            .contains("Could not open 'pipe': not a regular file or block device"),
        "{out}"
    );
    // A vmdk whose extent is the FIFO.
    env.write(
        "flat.vmdk",
        b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
          createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"pipe\" 0\n",
    );
    let out = env.img_timeout(&["info", "flat.vmdk"], quick).code_is(1);
    assert!(
        out.stderr.contains("not a regular file or block device"),
        "{out}"
    );
    // A differencing VDI whose directory holds a FIFO named like its parent.
    vdi_image(&env, "child.vdi", 4, 4);
    let out = env.img_timeout(&["info", "child.vdi"], quick).code_is(1);
    assert!(out.stderr.contains("child.vdi"), "{out}");
}

/// A snapshot whose ID and name are 65535 bytes each (the table allows it, thousands of times
/// over): `info` and `snapshot -l` list them cut to 127 and 255 bytes, as qemu-img does, rather
/// than printing megabytes.
#[test]
fn snapshot_with_longest_id_and_name_lists_as_qemu_does() {
    let env = Env::with_qemu();
    let cluster = 1u64 << 16;
    let mut h = qcow2_header(1 << 20, 1, 3 * cluster, 1, None);
    h[60..64].copy_from_slice(&1u32.to_be_bytes()); // one snapshot
    h[64..72].copy_from_slice(&(4 * cluster).to_be_bytes());
    let mut e = Vec::new();
    e.extend_from_slice(&(3 * cluster).to_be_bytes()); // its L1 table: the active one
    e.extend_from_slice(&1u32.to_be_bytes());
    e.extend_from_slice(&u16::MAX.to_be_bytes());
    e.extend_from_slice(&u16::MAX.to_be_bytes());
    e.extend_from_slice(&[0; 16]); // dates, VM clock
    e.extend_from_slice(&0u32.to_be_bytes());
    e.extend_from_slice(&16u32.to_be_bytes());
    e.extend_from_slice(&0u64.to_be_bytes());
    e.extend_from_slice(&(1u64 << 20).to_be_bytes());
    e.extend(std::iter::repeat_n(b'i', 65535));
    e.extend(std::iter::repeat_n(b'n', 65535));
    env.write("long.qcow2", &h);
    env.set_len("long.qcow2", 4 * cluster + e.len() as u64);
    env.write_at("long.qcow2", cluster, &(2 * cluster).to_be_bytes());
    env.write_at("long.qcow2", 2 * cluster, &1u16.to_be_bytes().repeat(5));
    env.write_at("long.qcow2", 4 * cluster, &e);
    for args in [
        &["info", "long.qcow2"][..],
        &["info", "--output=json", "long.qcow2"],
        &["snapshot", "-l", "long.qcow2"],
    ] {
        let ours = env.img(args).ok();
        let theirs = env.qemu_img(args).ok();
        assert!(ours.stdout.len() < 4096, "{ours}");
        assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
    }
}

/// One snapshot whose table lies before 1 GiB of the file: the table is read as far as its
/// entries go, not to qemu's 64 MiB limit, at every open.
#[test]
fn small_snapshot_table_in_a_large_file_is_read_in_little_memory() {
    let env = Env::with_qemu();
    env.img(&["create", "-f", "qcow2", "s.qcow2", "2G"]).ok();
    env.img(&["snapshot", "-c", "s1", "s.qcow2"]).ok();
    env.set_len("s.qcow2", 1 << 30);
    let (out, kib) = img_peak_rss(env.dir.path(), &["info", "s.qcow2"], TIMEOUT);
    eprintln!("img info peak RSS: {kib} KiB");
    let out = out.ok();
    assert_eq!(out.stdout, env.qemu_img(&["info", "s.qcow2"]).ok().stdout);
    assert!(kib < 32 * 1024, "img info peaked at {kib} KiB");
}

/// Two blocks of a VDI made by qemu pointed at the data of a third: `img check` says what
/// qemu-img check says, word for word (qemu names the shared data block twice), and fails the
/// same way.
#[test]
fn vdi_blocks_sharing_data_are_reported_as_qemu_reports_them() {
    let env = Env::with_qemu();
    env.qemu_img(&["create", "-f", "vdi", "a.vdi", "8M"]).ok();
    env.qemu_io(
        "vdi",
        "a.vdi",
        &["write -P 1 0 1M", "write -P 2 3M 1M", "write -P 3 5M 1M"],
    );
    // Blocks 5 and 6 (the map starts at 512) now name data block 1, block 3's.
    env.write_at("a.vdi", 512 + 5 * 4, &1u32.to_le_bytes());
    env.write_at("a.vdi", 512 + 6 * 4, &1u32.to_le_bytes());
    for args in [
        &["check", "a.vdi"][..],
        &["check", "--output=json", "a.vdi"],
    ] {
        let ours = env.img(args);
        let theirs = env.qemu_img(args);
        assert_eq!(ours.code, Some(2), "{ours}");
        assert_eq!(ours.code, theirs.code, "{ours}\n{theirs}");
        assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
        assert_eq!(ours.stderr, theirs.stderr, "{args:?}");
    }
}
