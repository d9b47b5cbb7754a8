//! Images whose headers are valid but ask for huge amounts of memory or time: every table entry
//! pointing at one cluster, tables at their largest, hundreds of extents naming one file. Each
//! is built here, small or sparse, and must either be refused with a clear error naming the
//! field, or be handled in bounded memory.

use std::fs::OpenOptions as FileOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imgblock::{Image, OpenOptions, Repair};

/// Most per-problem lines a check keeps (`imgblock::Messages::MAX`).
const MAX_LINES: usize = 10_000;

/// Writes `pieces` (offset, bytes) into a new file of `len` bytes (sparse where not written).
fn write_file(path: &Path, len: u64, pieces: &[(u64, &[u8])]) {
    let f = FileOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .unwrap();
    f.set_len(len).unwrap();
    for (off, data) in pieces {
        f.write_all_at(data, *off).unwrap();
    }
}

/// A qcow2 v3 header (no extensions) for 64 KiB clusters and 16-bit refcounts.
struct Qcow2Header {
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    refcount_table_offset: u64,
    autoclear: u64,
    extensions: Vec<u8>,
}

const CLUSTER: u64 = 1 << 16;

impl Qcow2Header {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0x5146_49fb_u32.to_be_bytes());
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(&[0; 12]); // no backing file
        b.extend_from_slice(&16u32.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&[0; 12]); // no snapshots
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&self.autoclear.to_be_bytes());
        b.extend_from_slice(&4u32.to_be_bytes());
        b.extend_from_slice(&112u32.to_be_bytes());
        b.resize(112, 0);
        b.extend_from_slice(&self.extensions);
        b.extend_from_slice(&[0; 8]);
        b
    }
}

fn be64s(v: u64, n: usize) -> Vec<u8> {
    v.to_be_bytes().repeat(n)
}

/// A qcow2 image whose `l1_entries` L1 entries all name one L2 table, whose 8192 entries all
/// name one data cluster without the COPIED flag, while that cluster's refcount is 1: every
/// entry of every table is a problem `check` reports.
fn qcow2_one_cluster_everywhere(dir: &Path, l1_entries: u32) -> PathBuf {
    let p = dir.join("everywhere.qcow2");
    let h = Qcow2Header {
        size: u64::from(l1_entries) * 8192 * CLUSTER,
        l1_size: l1_entries,
        l1_offset: 5 * CLUSTER,
        refcount_table_offset: CLUSTER,
        autoclear: 0,
        extensions: Vec::new(),
    }
    .bytes();
    let reftable = (2 * CLUSTER).to_be_bytes();
    let refblock = 1u16.to_be_bytes().repeat(5);
    let l2 = be64s(4 * CLUSTER, 8192);
    let data = vec![0xab; 512];
    let l1 = be64s(3 * CLUSTER, l1_entries as usize);
    write_file(
        &p,
        6 * CLUSTER,
        &[
            (0, &h),
            (CLUSTER, &reftable),
            (2 * CLUSTER, &refblock),
            (3 * CLUSTER, &l2),
            (4 * CLUSTER, &data),
            (5 * CLUSTER, &l1),
        ],
    );
    p
}

/// A dynamic VDI of `blocks` 1 MiB blocks whose block map is all zeroes: every block claims
/// data block 0, and the header says none is allocated.
fn vdi_all_blocks_at_zero(dir: &Path, blocks: u32) -> PathBuf {
    let p = dir.join("aliased.vdi");
    let mut h = vec![0u8; 512];
    let text = b"<<< QEMU VM Virtual Disk Image >>>\n";
    h[..text.len()].copy_from_slice(text);
    let put = |h: &mut Vec<u8>, at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(&mut h, 0x40, &0xbeda_107f_u32.to_le_bytes());
    put(&mut h, 0x44, &0x0001_0001_u32.to_le_bytes());
    put(&mut h, 0x48, &0x180u32.to_le_bytes());
    put(&mut h, 0x4c, &1u32.to_le_bytes()); // dynamic
    let bmap = 0x200u32;
    let data = bmap + (blocks * 4).div_ceil(1 << 20) * (1 << 20);
    put(&mut h, 0x154, &bmap.to_le_bytes());
    put(&mut h, 0x158, &data.to_le_bytes());
    put(&mut h, 0x168, &512u32.to_le_bytes());
    put(&mut h, 0x170, &(u64::from(blocks) << 20).to_le_bytes());
    put(&mut h, 0x178, &(1u32 << 20).to_le_bytes());
    put(&mut h, 0x180, &blocks.to_le_bytes());
    put(&mut h, 0x188, &[0x11; 16]);
    write_file(&p, u64::from(data) + (1 << 20), &[(0, &h)]);
    p
}

/// A million blocks of a VDI claiming one data block are a million problems: the check counts
/// them all but keeps only the first lines.
#[test]
fn vdi_check_of_a_million_aliased_blocks_keeps_bounded_messages() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 1 << 20;
    let p = vdi_all_blocks_at_zero(dir.path(), blocks);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let r = img.check(Repair::None).unwrap();
    // Every block but the first is shared, and the allocated count is wrong.
    assert_eq!(r.corruptions, u64::from(blocks));
    assert_eq!(r.messages.len(), MAX_LINES);
    assert_eq!(
        r.messages.iter().next().map(String::as_str),
        Some("ERROR: block index 0 also used by 0")
    );
}

/// 16 L1 entries naming one L2 table whose entries all name one data cluster: 131072 wrong
/// COPIED flags, reported as a bounded number of lines.
#[test]
fn qcow2_check_of_one_cluster_everywhere_keeps_bounded_messages() {
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2_one_cluster_everywhere(dir.path(), 16);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let r = img.check(Repair::None).unwrap();
    assert!(r.corruptions > 16 * 8192, "{}", r.corruptions);
    assert_eq!(r.messages.len(), MAX_LINES);
}

/// A qcow2 image with one bitmap, marked in use (so its table need not match the disk), whose
/// table has `table_entries` entries: a sparse hole of up to 1 GiB.
fn qcow2_with_bitmap_table(dir: &Path, table_entries: u32) -> PathBuf {
    let p = dir.join("bitmap.qcow2");
    let table_offset = 4 * CLUSTER;
    let table_bytes = u64::from(table_entries) * 8;
    let dir_offset = table_offset + table_bytes.div_ceil(CLUSTER) * CLUSTER;
    let name = b"huge";
    let mut entry = Vec::new();
    entry.extend_from_slice(&table_offset.to_be_bytes());
    entry.extend_from_slice(&table_entries.to_be_bytes());
    entry.extend_from_slice(&1u32.to_be_bytes()); // in use
    entry.extend_from_slice(&[1, 16]); // dirty tracking, 64 KiB granularity
    entry.extend_from_slice(&4u16.to_be_bytes()); // name length
    entry.extend_from_slice(&0u32.to_be_bytes());
    entry.extend_from_slice(name);
    entry.resize(entry.len().div_ceil(8) * 8, 0);
    write_qcow2_with_bitmaps(&p, 1, &entry, dir_offset, dir_offset + CLUSTER);
    p
}

/// Writes a 1 GiB qcow2 image at `p` whose bitmaps extension names `count` bitmaps in
/// `directory` at `dir_offset`, the file `len` bytes long (sparse).
fn write_qcow2_with_bitmaps(p: &Path, count: u32, directory: &[u8], dir_offset: u64, len: u64) {
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x2385_2875_u32.to_be_bytes());
    ext.extend_from_slice(&24u32.to_be_bytes());
    ext.extend_from_slice(&count.to_be_bytes());
    ext.extend_from_slice(&0u32.to_be_bytes());
    ext.extend_from_slice(&(directory.len() as u64).to_be_bytes());
    ext.extend_from_slice(&dir_offset.to_be_bytes());
    let h = Qcow2Header {
        size: 1 << 30,
        l1_size: 2,
        l1_offset: 3 * CLUSTER,
        refcount_table_offset: CLUSTER,
        autoclear: 1, // bitmaps
        extensions: ext,
    }
    .bytes();
    let reftable = (2 * CLUSTER).to_be_bytes();
    write_file(
        p,
        len,
        &[(0, &h), (CLUSTER, &reftable), (dir_offset, directory)],
    );
}

/// A bitmap table of 128 Mi entries (1 GiB, a hole in a sparse file) is past qemu's 512 MiB
/// bitmap limit: refused when the image opens, before `check` would read the table whole.
#[test]
fn qcow2_bitmap_table_past_qemus_limit_is_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2_with_bitmap_table(dir.path(), 0x0800_0000);
    let e = Image::open(&p, &OpenOptions::read_only())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bitmap.qcow2"), "{e}");
    assert!(e.contains("bitmap table too large"), "{e}");
    // At the limit, the image opens and checks.
    let p = qcow2_with_bitmap_table(dir.path(), 8192);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    img.check(Repair::None).unwrap();
}

/// A hosted sparse extent header (KDMV, version 1, no embedded descriptor).
fn vmdk_sparse_header(
    capacity: u64,
    grain: u64,
    gtes: u32,
    gd_sector: u64,
    overhead: u64,
) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..4].copy_from_slice(b"KDMV");
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[8..12].copy_from_slice(&1u32.to_le_bytes()); // newline detection
    b[12..20].copy_from_slice(&capacity.to_le_bytes());
    b[20..28].copy_from_slice(&grain.to_le_bytes());
    b[44..48].copy_from_slice(&gtes.to_le_bytes());
    b[56..64].copy_from_slice(&gd_sector.to_le_bytes());
    b[64..72].copy_from_slice(&overhead.to_le_bytes());
    b[73..77].copy_from_slice(b"\n \r\n");
    b
}

/// A twoGbMaxExtentSparse descriptor listing `count` extents of `sectors`, all the file `name`.
fn vmdk_descriptor(count: usize, sectors: u64, name: &str) -> String {
    let mut d = String::from(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n",
    );
    for _ in 0..count {
        d.push_str(&format!("RW {sectors} SPARSE \"{name}\"\n"));
    }
    d.push_str("\n# The Disk Data Base\n#DDB\nddb.adapterType = \"ide\"\n");
    d
}

/// 64 extents naming one file whose grain directory is 32 MiB (a hole): 2 GiB of directories
/// in memory, where each alone is within the limit. Refused once they pass 64 MiB in all.
#[test]
fn vmdk_many_extents_with_large_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 2^32 sectors of 1-sector grains, 512 per table: 8 Mi directory entries, 32 MiB.
    let capacity = 1u64 << 32;
    let gd_bytes = 32u64 << 20;
    let overhead = 1 + gd_bytes / 512;
    let h = vmdk_sparse_header(capacity, 1, 512, 1, overhead);
    write_file(&d.join("big-gd.vmdk"), (overhead + 8) * 512, &[(0, &h)]);
    std::fs::write(
        d.join("one.vmdk"),
        vmdk_descriptor(1, capacity, "big-gd.vmdk"),
    )
    .unwrap();
    std::fs::write(
        d.join("many.vmdk"),
        vmdk_descriptor(64, capacity, "big-gd.vmdk"),
    )
    .unwrap();
    // One such extent is fine.
    Image::open(&d.join("one.vmdk"), &OpenOptions::read_only()).unwrap();
    let e = match Image::open(&d.join("many.vmdk"), &OpenOptions::read_only()) {
        Ok(_) => panic!("64 extents with 2 GiB of grain directories opened"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("big-gd.vmdk"), "{e}");
    assert!(
        e.contains("grain directories of the extents take more than 67108864 bytes in all"),
        "{e}"
    );
}

/// A qcow2 image with `count` bitmaps, all in use and sharing one single-entry table, whose
/// 1000-byte names differ only in their last bytes.
fn qcow2_with_many_bitmaps(dir: &Path, count: u32) -> PathBuf {
    let p = dir.join("bitmaps.qcow2");
    let table_offset = 4 * CLUSTER;
    let dir_offset = 5 * CLUSTER;
    let mut directory = Vec::new();
    for i in 0..count {
        let name = format!("{i:b>1000}");
        directory.extend_from_slice(&table_offset.to_be_bytes());
        directory.extend_from_slice(&1u32.to_be_bytes());
        directory.extend_from_slice(&1u32.to_be_bytes()); // in use
        directory.extend_from_slice(&[1, 16]);
        directory.extend_from_slice(&1000u16.to_be_bytes());
        directory.extend_from_slice(&0u32.to_be_bytes());
        directory.extend_from_slice(name.as_bytes());
    }
    let len = dir_offset + directory.len() as u64;
    write_qcow2_with_bitmaps(&p, count, &directory, dir_offset, len);
    p
}

/// 24000 bitmaps with long names alike but for their ends: their names are told apart in
/// linear time (comparing each with all before it took half a minute, and minutes for 65535).
#[test]
fn qcow2_many_bitmaps_with_long_names_open_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2_with_many_bitmaps(dir.path(), 24_000);
    let t = std::time::Instant::now();
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let elapsed = t.elapsed();
    assert_eq!(img.driver().bitmap_list().len(), 24_000);
    assert!(elapsed.as_secs() < 6, "opening took {elapsed:?}");
}

/// A reader holds only the L1 entries that cover the disk, but `check` counts what the entries
/// past it reference (here an L2 table and a data cluster past a disk made smaller by hand).
#[test]
fn qcow2_check_of_a_reader_counts_l1_entries_past_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shrunk.qcow2");
    imgblock::create(
        &p,
        imgblock::Format::Qcow2,
        &imgblock::CreateOptions::new(2 << 30),
    )
    .unwrap();
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[7; 4096], 3 << 29).unwrap();
    drop(img);
    let f = FileOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&(1u64 << 30).to_be_bytes(), 24).unwrap();
    drop(f);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let r = img.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
}

/// A ustar header for a regular file.
fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// An OVA whose 15 MiB descriptor lists 130000 files and 130000 disks, each disk naming a file
/// listed far from it: the files are looked up by id, not searched for each disk (which took
/// close to a minute).
#[test]
fn ova_descriptor_with_many_disks_parses_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("many.ova");
    let n = 130_000;
    let mut ovf = String::from("<?xml version=\"1.0\"?>\n<Envelope xmlns:ovf=\"x\"><References>\n");
    for i in 0..n {
        ovf.push_str(&format!("<File ovf:id=\"f{i}\" ovf:href=\"d{i}.vmdk\"/>\n"));
    }
    ovf.push_str("</References><DiskSection>\n");
    for i in 0..n {
        let f = n - 1 - i;
        ovf.push_str(&format!(
            "<Disk ovf:diskId=\"v{i}\" ovf:fileRef=\"f{f}\" ovf:capacity=\"1048576\"/>\n"
        ));
    }
    ovf.push_str("</DiskSection></Envelope>\n");
    let len = ovf.len() as u64;
    let padded = len.div_ceil(512) * 512;
    let h = tar_header("a.ovf", len);
    write_file(&p, 512 + padded + 1024, &[(0, &h), (512, ovf.as_bytes())]);
    let t = std::time::Instant::now();
    let disks = imgblock::ova::disks(&p).unwrap();
    let elapsed = t.elapsed();
    assert_eq!(disks.len(), n);
    assert_eq!(disks[0].href, format!("d{}.vmdk", n - 1));
    assert!(
        elapsed.as_secs() < 6,
        "reading the descriptor took {elapsed:?}"
    );
}

/// A LUKS image whose key slot 0 asks for 2^32 - 1 PBKDF2 iterations: hours of hashing before
/// a passphrase, right or wrong, gets an answer (qemu-img runs them). It is refused at once,
/// naming the count, and `info` (which needs no passphrase) still reads it.
#[test]
fn luks_slot_with_four_billion_iterations_is_refused_at_once() {
    use imgblock::crypto::{Secret, Secrets};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("slow.luks");
    let mut o = imgblock::CreateOptions::new(1 << 20);
    o.parse_opts("key-secret=s0,iter-time=10").unwrap();
    o.secrets.insert("s0".into(), Secret::from("pw"));
    imgblock::create(&p, imgblock::Format::Luks, &o).unwrap();
    // Slot 0's iteration count: the header's key slots start at byte 208, 48 bytes each.
    let f = FileOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&u32::MAX.to_be_bytes(), 212).unwrap();
    drop(f);
    let (tx, rx) = std::sync::mpsc::channel();
    let q = p.clone();
    std::thread::spawn(move || {
        let r = Image::open_with_secrets(
            &q,
            &OpenOptions::read_only(),
            &Secrets::all(Secret::from("pw")),
        );
        let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("still hashing after 20 s");
    let e = r.expect_err("the slot opened");
    assert!(e.contains("slow.luks"), "{e}");
    assert!(e.contains("PBKDF2 iterations"), "{e}");
    let img =
        Image::open_with_secrets(&p, &OpenOptions::read_only(), &Secrets::for_metadata()).unwrap();
    assert_eq!(img.size(), 1 << 20);
}
