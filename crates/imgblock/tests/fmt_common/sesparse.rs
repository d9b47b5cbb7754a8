//! Builds ESXi seSparse snapshots for tests, from the layout (qemu-img cannot create them):
//! an extent file with the const header, the volatile header, a journal header and journal,
//! the grain directory, grain tables, a free bitmap, a backmap and grains, and a descriptor
//! (createType "seSparse", one SESPARSE extent, optionally a parent). Standard library only,
//! so that the command-line tests can include it too. It lays the bytes out itself rather than
//! through the library's serializers, so that a wrong field offset in either shows up as a
//! difference from qemu-img.

#![allow(dead_code)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;
/// Grain: 8 sectors.
pub const GRAIN: u64 = 4096;
/// Entries per grain table (64 sectors of u64).
pub const GTES: u64 = 4096;
/// Guest bytes one grain table covers (16 MiB).
pub const GT_COVER: u64 = GRAIN * GTES;

/// What one guest grain holds in the snapshot.
#[derive(Debug, Clone)]
pub enum Grain {
    /// Unmapped by the guest (type 1): zeroes.
    Unmapped,
    /// Zeroed (type 2): zeroes.
    Zero,
    /// Allocated (type 3) in grain slot `slot` of the grains area, holding `data` (4 KiB).
    Data { slot: u64, data: Vec<u8> },
}

/// A snapshot to build.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Disk size in bytes (a multiple of 512).
    pub size: u64,
    /// Guest grain index → content; grains not listed are unallocated (read from the parent).
    pub grains: BTreeMap<u64, Grain>,
    /// The parent: file name (as written in parentFileNameHint) and its CID.
    pub parent: Option<(String, u32)>,
    /// This image's CID.
    pub cid: u32,
    /// Grain directory sectors (each holds 64 entries, 1 GiB of disk); 0: just enough.
    pub gd_sectors: u64,
}

impl Spec {
    /// An empty snapshot of `size` bytes with no parent.
    pub fn new(size: u64) -> Spec {
        Spec {
            size,
            grains: BTreeMap::new(),
            parent: None,
            cid: 0x5e5e_0001,
            gd_sectors: 0,
        }
    }
}

/// Where the builder put things (byte offsets in the extent file), for corruption tests.
#[derive(Debug, Clone)]
pub struct Built {
    /// The descriptor.
    pub descriptor: PathBuf,
    /// The extent file.
    pub extent: PathBuf,
    /// Volatile header.
    pub volatile: u64,
    /// Grain directory.
    pub gd: u64,
    /// GD index → byte offset of its grain table.
    pub tables: BTreeMap<u64, u64>,
    /// Grains area.
    pub grains: u64,
}

impl Built {
    /// Byte offset of the grain table entry for guest grain `g` (its table must exist).
    pub fn gte(&self, g: u64) -> u64 {
        self.tables[&(g / GTES)] + (g % GTES) * 8
    }
    /// Byte offset of the grain directory entry covering guest grain `g`.
    pub fn gde(&self, g: u64) -> u64 {
        self.gd + (g / GTES) * 8
    }
}

fn put(f: &mut [u8], at: u64, v: u64) {
    f[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Overwrites the little-endian u64 at byte `at` of `path`.
pub fn poke(path: &Path, at: u64, v: u64) {
    let mut f = std::fs::read(path).unwrap();
    put(&mut f, at, v);
    std::fs::write(path, f).unwrap();
}

/// The grain table entry for an allocated grain in slot `n`: type 3 in the top nibble, the low
/// 12 bits of `n` in bits 48..60 and the rest of `n` in bits 0..48.
pub fn allocated(n: u64) -> u64 {
    (3 << 60) | ((n & 0xfff) << 48) | (n >> 12)
}

/// The CID in a vmdk's descriptor (embedded in a sparse file, or a descriptor file).
pub fn read_cid(path: &Path) -> u32 {
    let f = std::fs::read(path).unwrap();
    let head = String::from_utf8_lossy(&f[..f.len().min(64 << 10)]).into_owned();
    let line = head
        .lines()
        .find(|l| l.starts_with("CID="))
        .unwrap_or_else(|| panic!("{}: no CID", path.display()));
    u32::from_str_radix(line[4..].trim(), 16).unwrap()
}

/// Writes `dir/NAME.vmdk` (descriptor) and `dir/NAME-sesparse.vmdk` (extent).
pub fn build(dir: &Path, name: &str, spec: &Spec) -> Built {
    let sectors = spec.size / SECTOR;
    let gd_entries = spec.size.div_ceil(GT_COVER);
    let gd_sectors = if spec.gd_sectors == 0 {
        (gd_entries * 8).div_ceil(SECTOR)
    } else {
        spec.gd_sectors
    };
    // GD indexes with a table, numbered from the last so that table n is not GD entry n.
    let used: Vec<u64> = {
        let mut v: Vec<u64> = spec.grains.keys().map(|g| g / GTES).collect();
        v.dedup();
        v.reverse();
        v
    };
    let n_tables = used.len() as u64;
    // Sectors: const header 0, volatile header 1, journal header 2..4, journal 4..8, then
    // the directory, the tables, the free bitmap, the backmap and the grains, each aligned.
    let (vol, jh, jh_size, j, j_size) = (1u64, 2u64, 2u64, 4u64, 4u64);
    let gd = 8u64;
    let gt = (gd + gd_sectors).div_ceil(8) * 8;
    let gt_size = n_tables * 64;
    let fb = gt + gt_size;
    let fb_size = 1;
    let bm = fb + fb_size;
    let bm_size = 8;
    let grains = (bm + bm_size).div_ceil(8) * 8;
    let grains_size = spec.size.div_ceil(GRAIN) * 8;
    let max_slot = spec
        .grains
        .values()
        .filter_map(|g| match g {
            Grain::Data { slot, .. } => Some(*slot + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let len = (grains + max_slot * 8) * SECTOR;
    let mut f = vec![0u8; len.max(grains * SECTOR) as usize];
    // Const header.
    for (i, v) in [
        0xcafe_babe,
        0x0000_0002_0000_0001,
        sectors,
        8,
        64,
        0,
        0,
        0,
        0,
        0,
        vol,
        1,
        jh,
        jh_size,
        j,
        j_size,
        gd,
        gd_sectors,
        gt,
        gt_size,
        fb,
        fb_size,
        bm,
        bm_size,
        grains,
        grains_size,
    ]
    .iter()
    .enumerate()
    {
        put(&mut f, i as u64 * 8, *v);
    }
    // Volatile header: magic, next free table, next transaction, replay_journal 0.
    put(&mut f, vol * SECTOR, 0xcafe_cafe);
    put(&mut f, vol * SECTOR + 8, n_tables);
    put(&mut f, vol * SECTOR + 16, 1);
    let mut tables = BTreeMap::new();
    for (n, k) in used.iter().enumerate() {
        put(
            &mut f,
            gd * SECTOR + k * 8,
            0x1000_0000_0000_0000 | n as u64,
        );
        tables.insert(*k, (gt + n as u64 * 64) * SECTOR);
        // The free bitmap marks the table used.
        f[(fb * SECTOR) as usize + n / 8] |= 1 << (n % 8);
    }
    for (g, grain) in &spec.grains {
        let at = tables[&(g / GTES)] + (g % GTES) * 8;
        let e = match grain {
            Grain::Unmapped => 1 << 60,
            Grain::Zero => 2 << 60,
            Grain::Data { slot, data } => {
                assert_eq!(data.len() as u64, GRAIN);
                let o = ((grains + slot * 8) * SECTOR) as usize;
                f[o..o + GRAIN as usize].copy_from_slice(data);
                allocated(*slot)
            }
        };
        put(&mut f, at, e);
    }
    let extent_name = format!("{name}-sesparse.vmdk");
    let extent = dir.join(&extent_name);
    std::fs::write(&extent, &f).unwrap();
    let (parent_cid, hint) = match &spec.parent {
        Some((p, cid)) => (*cid, format!("parentFileNameHint=\"{p}\"\n")),
        None => (0xffff_ffff, String::new()),
    };
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={:08x}\nparentCID={parent_cid:08x}\n\
isNativeSnapshot=\"no\"\ncreateType=\"seSparse\"\n{hint}\n# Extent description\n\
RW {sectors} SESPARSE \"{extent_name}\"\n\n# The Disk Data Base\n#DDB\n\n\
ddb.grain = \"8\"\nddb.longContentID = \"6b1d2f1a0c8e4b7d9a3c5e7f5e5e0001\"\n\
ddb.sidecars = \"\"\nddb.uuid = \"60 00 C2 9a 6b 2a 36 c1-d9 3e 93 4e 58 2d 1b 5e\"\n",
        spec.cid
    );
    let descriptor = dir.join(format!("{name}.vmdk"));
    std::fs::write(&descriptor, desc).unwrap();
    Built {
        descriptor,
        extent,
        volatile: vol * SECTOR,
        gd: gd * SECTOR,
        tables,
        grains: grains * SECTOR,
    }
}

/// A mix of every kind of grain over a 40 MiB disk (three grain tables' worth, the middle one
/// absent): allocated runs that are contiguous in the file and ones that are not, a grain in a
/// slot above 4096 (both halves of the split index used), zeroed and unmapped grains next to
/// allocated ones, and the last grain of the disk.
pub fn mixed(parent: Option<(String, u32)>) -> Spec {
    let mut s = Spec::new(40 << 20);
    s.parent = parent;
    let data = |slot: u64, seed: u8| Grain::Data {
        slot,
        data: (0..GRAIN)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ seed)
            .collect(),
    };
    let g = &mut s.grains;
    g.insert(0, data(5, 1));
    g.insert(1, data(6, 2)); // contiguous with grain 0 in the file
    g.insert(2, Grain::Zero);
    g.insert(3, Grain::Unmapped);
    g.insert(4, data(2, 3)); // before grain 0's slot
    g.insert(10, data(4097, 4)); // split index: 0x1001
    for i in 100..110 {
        g.insert(i, Grain::Zero);
    }
    for i in 110..113 {
        g.insert(i, Grain::Unmapped);
    }
    g.insert(4095, data(7, 5)); // last grain of the first table
    g.insert(2 * GTES, data(8, 6)); // first grain of the third table (32 MiB)
    g.insert(2 * GTES + 1, Grain::Zero);
    let last = s.size / GRAIN - 1;
    let g = &mut s.grains;
    g.insert(last, data(0, 7)); // the last grain of the disk
    s
}
