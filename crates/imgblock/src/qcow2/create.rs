//! Creating qcow2 images with qemu-img's options.

use std::path::Path;
use std::sync::Arc;

use super::header::{self, CompressionType, Extension, Header};
use super::Qcow2;
use crate::driver::Driver;
use crate::error::IoContext;
use crate::options::{parse_bool, parse_size_opt};
use crate::raw::Preallocation;
use crate::storage::{FileStorage, Storage, Unfinished};
use crate::{CreateOptions, Error, Image, OpenOptions, Result};

/// Options qcow2 accepts on create, with qemu-img's help text.
pub const CREATE_OPTIONS: &[(&str, &str)] = &[
    ("backing_file", "File name of a base image"),
    ("backing_fmt", "Image format of the base image"),
    ("cluster_size", "qcow2 cluster size"),
    ("compat", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    (
        "compression_type",
        "Compression method used for image cluster compression",
    ),
    ("data_file", "File name of an external data file"),
    ("encrypt.cipher-alg", "Name of encryption cipher algorithm"),
    ("encrypt.cipher-mode", "Name of encryption cipher mode"),
    (
        "encrypt.format",
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    ("encrypt.hash-alg", "Name of encryption hash algorithm"),
    (
        "encrypt.iter-time",
        "Time to spend in PBKDF in milliseconds",
    ),
    ("encrypt.ivgen-alg", "Name of IV generator algorithm"),
    (
        "encrypt.ivgen-hash-alg",
        "Name of IV generator hash algorithm",
    ),
    (
        "encrypt.key-secret",
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    (
        "encryption",
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    (
        "data_file_raw",
        "The external data file must stay valid as a raw image",
    ),
    ("extended_l2", "Extended L2 tables"),
    ("lazy_refcounts", "Postpone refcount updates"),
    (
        "preallocation",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    ("refcount_bits", "Width of a reference count entry in bits"),
    ("size", "Virtual disk size"),
];

/// Parsed qcow2 creation options.
#[derive(Debug, Clone)]
struct Opts {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    lazy_refcounts: bool,
    extended_l2: bool,
    prealloc: Preallocation,
    data_file: Option<String>,
    data_file_raw: bool,
    compression: CompressionType,
    encrypt: Option<super::crypt::CreateCrypt>,
}

impl Opts {
    /// qemu's defaults: version 3, 64 KiB clusters, 16-bit refcounts, nothing else.
    fn defaults() -> Opts {
        Opts {
            version: 3,
            cluster_bits: 16,
            refcount_order: 4,
            lazy_refcounts: false,
            extended_l2: false,
            prealloc: Preallocation::Off,
            data_file: None,
            data_file_raw: false,
            compression: CompressionType::Zlib,
            encrypt: None,
        }
    }
}

/// A `refcount_bits` value as its refcount order (log2 of the width), with qemu's messages.
pub(super) fn refcount_order(v: &str) -> Result<u32> {
    let b: u64 = v
        .parse()
        .map_err(|_| invalid(format!("Invalid refcount_bits '{v}'")))?;
    if !b.is_power_of_two() || b > 64 {
        return Err(invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    Ok(b.trailing_zeros())
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidOption(msg.into())
}

fn parse(o: &CreateOptions) -> Result<Opts> {
    let mut r = Opts {
        encrypt: super::crypt::parse_create(o)?,
        ..Opts::defaults()
    };
    let mut refcount_given = false;
    for (k, v) in &o.opts {
        match k.as_str() {
            "compat" => {
                r.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err(invalid(format!(
                            "Parameter 'version' does not accept value '{v}'"
                        )))
                    }
                }
            }
            "cluster_size" => {
                let cs = parse_size_opt(k, v)?;
                if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
                    return Err(invalid(
                        "Cluster size must be a power of two between 512 and 2048k",
                    ));
                }
                r.cluster_bits = cs.trailing_zeros();
            }
            "refcount_bits" => {
                r.refcount_order = refcount_order(v)?;
                refcount_given = true;
            }
            "lazy_refcounts" => r.lazy_refcounts = parse_bool(k, v)?,
            "extended_l2" => r.extended_l2 = parse_bool(k, v)?,
            "preallocation" => {
                r.prealloc = Preallocation::parse(v).map_err(|_| {
                    invalid(format!(
                        "Parameter 'preallocation' does not accept value '{v}'"
                    ))
                })?;
            }
            "data_file" => r.data_file = Some(v.clone()),
            "data_file_raw" => r.data_file_raw = parse_bool(k, v)?,
            "compression_type" => {
                r.compression = match v.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => {
                        return Err(invalid(format!(
                            "Parameter 'compression-type' does not accept value '{v}'"
                        )))
                    }
                }
            }
            // Parsed by crypt::parse_create.
            k if k == "encryption" || k.starts_with("encrypt.") => {}
            _ => return Err(invalid(format!("Invalid parameter '{k}' for format qcow2"))),
        }
    }
    let v3 = "(use version=v3 or greater)";
    if r.version == 2 {
        if r.lazy_refcounts {
            return Err(invalid(format!(
                "Lazy refcounts only supported with compatibility level 1.1 and above {v3}"
            )));
        }
        if refcount_given && r.refcount_order != 4 {
            return Err(invalid(format!(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above {v3}"
            )));
        }
        if r.compression != CompressionType::Zlib {
            return Err(invalid(format!(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above {v3}"
            )));
        }
        if r.extended_l2 {
            return Err(invalid(format!("Extended L2 entries are only supported with compatibility level 1.1 and above {v3}")));
        }
        if r.data_file.is_some() {
            return Err(invalid(format!(
                "External data files are only supported with compatibility level 1.1 and above {v3}"
            )));
        }
    }
    if r.extended_l2 && r.cluster_bits < 14 {
        return Err(invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if r.data_file_raw && r.data_file.is_none() {
        return Err(invalid("data-file-raw requires data-file"));
    }
    if r.data_file_raw && r.prealloc == Preallocation::Off {
        // A raw data file is read without the metadata too: the L2 tables must map every
        // cluster to the same offset in it, or data written straight into it would read back
        // as unallocated through the image. qemu forces this the same way.
        r.prealloc = Preallocation::Metadata;
    }
    Ok(r)
}

/// The options as qemu's `qcow2_measure` reads them: cluster size, `compat` (only `0.10` and
/// `1.1`), refcount width, preallocation and a LUKS header; the others are not checked against
/// each other (qemu measures `compat=0.10,lazy_refcounts=on` as it is) and legacy AES needs no
/// secret.
fn parse_measure(o: &CreateOptions) -> Result<Opts> {
    let get = |k: &str| o.opts.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v);
    // qemu checks the boolean options' values as it reads the option list.
    for (k, v) in &o.opts {
        if ["lazy_refcounts", "data_file_raw", "encryption", "nocow"].contains(&k.as_str()) {
            parse_bool(k, v)?;
        }
    }
    let mut r = Opts::defaults();
    if let Some(v) = get("extended_l2") {
        r.extended_l2 = parse_bool("extended_l2", v)?;
    }
    if let Some(v) = get("cluster_size") {
        let cs = parse_size_opt("cluster_size", v)?;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        r.cluster_bits = cs.trailing_zeros();
    }
    if r.extended_l2 && r.cluster_bits < 14 {
        return Err(invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if let Some(v) = get("compat") {
        r.version = match v.as_str() {
            "0.10" => 2,
            "1.1" => 3,
            _ => return Err(invalid(format!("Invalid compatibility level: '{v}'"))),
        };
    }
    if let Some(v) = get("refcount_bits") {
        let order = refcount_order(v)?;
        if r.version < 3 && order != 4 {
            return Err(invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or \
                 above (use compat=1.1 or greater)",
            ));
        }
        r.refcount_order = order;
    }
    if let Some(v) = get("preallocation") {
        r.prealloc = Preallocation::parse(v)
            .map_err(|_| invalid(format!("invalid parameter value: {v}")))?;
    }
    if get("encrypt.format").map(String::as_str) == Some("luks") {
        r.encrypt = super::crypt::parse_create(o)?;
    }
    Ok(r)
}

/// Creates a qcow2 image.
///
/// # Errors
/// When an option is invalid (with qemu-img's message), the backing image cannot be opened to
/// take its size, or I/O fails.
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    let opts = parse(o)?;
    if o.backing_fmt.is_some() && o.backing_file.is_none() {
        return Err(invalid(
            "Backing format cannot be used without backing file",
        ));
    }
    if o.backing_file.is_some() && opts.data_file_raw {
        return Err(invalid(
            "Backing file and data-file-raw cannot be used at the same time",
        ));
    }
    if o.backing_file.is_some() && opts.prealloc != Preallocation::Off && !opts.extended_l2 {
        return Err(invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    let size = match (o.size, &o.backing_file) {
        (Some(s), _) => s,
        (None, Some(b)) if !o.unsafe_backing => {
            let bpath = crate::image::resolve_backing(path, b);
            let fmt = o.backing_fmt.as_deref().map(str::parse).transpose()?;
            // Only the size is read: like qemu, share the file with any writer.
            Image::open_with_secrets(
                &bpath,
                &OpenOptions {
                    force_share: true,
                    ..OpenOptions::read_only().format(fmt)
                },
                &crate::crypto::Secrets::for_metadata(),
            )?
            .size()
        }
        _ => return Err(invalid("Image creation needs a size parameter")),
    };
    // qemu sizes images in whole sectors.
    let size = size.div_ceil(512).saturating_mul(512);
    if size > i64::MAX as u64 {
        return Err(invalid(format!("Image size {size} is too large")));
    }
    let cs = 1u64 << opts.cluster_bits;
    // An L1 table past qemu's limit: refused before any file is made, in qemu-img's words.
    let l2_entries = cs / if opts.extended_l2 { 16 } else { 8 };
    let l1_entries = size.div_ceil(l2_entries * cs);
    let l1_size = u32::try_from(l1_entries)
        .ok()
        .filter(|_| l1_entries * 8 <= super::MAX_L1_BYTES)
        .ok_or_else(|| invalid(TOO_LARGE))?;

    // Files made here are deleted again if the create fails, as qemu deletes them.
    let data_file = match &opts.data_file {
        Some(name) => {
            // Created as named, from the working directory, as qemu creates it; the driver
            // opens it again from the header extension.
            let dpath = std::path::PathBuf::from(name);
            let ds = FileStorage::create_with(&dpath, o.file)?;
            let guard = Unfinished::new(&dpath);
            ds.set_len(size).ctx(&dpath)?;
            Some(guard)
        }
        None => None,
    };

    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: opts.cluster_bits,
        // The bootstrap header describes an empty disk; size and L1 are set together below.
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: opts.refcount_order,
        header_length: if opts.version == 3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        },
        compression: opts.compression,
        extensions: Vec::new(),
        backing_file: o.backing_file.clone(),
    };
    if let Some(f) = &o.backing_fmt {
        h.extensions.push(Extension {
            kind: header::EXT_BACKING_FORMAT,
            data: f.as_bytes().to_vec(),
        });
    }
    if let Some(d) = &opts.data_file {
        h.extensions.push(Extension {
            kind: header::EXT_DATA_FILE,
            data: d.as_bytes().to_vec(),
        });
        h.incompatible |= header::INCOMPAT_DATA_FILE;
        if opts.data_file_raw {
            h.autoclear |= header::AUTOCLEAR_DATA_FILE_RAW;
        }
    }
    if opts.version == 3 {
        if opts.cluster_bits >= header::FEATURE_TABLE_MIN_CLUSTER_BITS {
            h.extensions.push(Extension {
                kind: header::EXT_FEATURE_TABLE,
                data: header::feature_table(),
            });
        }
        if opts.lazy_refcounts {
            h.compatible |= header::COMPAT_LAZY_REFCOUNTS;
        }
        if opts.extended_l2 {
            h.incompatible |= header::INCOMPAT_EXTL2;
        }
        if opts.compression != CompressionType::Zlib {
            h.incompatible |= header::INCOMPAT_COMPRESSION;
        }
    }
    let hdr = h.serialize().map_err(|e| Error::Qcow2 {
        path: path.to_owned(),
        source: e,
    })?;

    // Bootstrap: header, a one-cluster refcount table, one refcount block covering the three.
    let file = FileStorage::create_with(path, o.file)?;
    let image_file = Unfinished::new(path);
    let csu = usize::try_from(cs).unwrap_or(0);
    let mut first = vec![0u8; csu * 3];
    first[..hdr.len()].copy_from_slice(&hdr);
    first[csu..csu + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    for c in 0..3 {
        super::refcount::set_entry(&mut first[2 * csu..], opts.refcount_order, c, 1);
    }
    file.write_at(&first, 0).ctx(path)?;

    // Everything else goes through the driver's allocator, which handles any geometry.
    let storage: Arc<dyn Storage> = Arc::new(file);
    let mut q = Qcow2::open(storage.clone(), true)?;
    {
        let mut st = q.lock();
        let l1_off = if l1_entries > 0 {
            let l1_clusters = (l1_entries * 8).div_ceil(cs);
            let off = q.alloc_clusters(&mut st, l1_clusters)?;
            // Only the entries are written, as qemu writes them: the rest of the cluster lies
            // past the end of the file and reads as zeroes.
            let zeroes = vec![0u8; usize::try_from(l1_entries * 8).unwrap_or(0)];
            storage.write_at(&zeroes, off).ctx(path)?;
            off
        } else {
            0
        };
        // size, crypt_method, l1_size and l1_table_offset are adjacent: one write.
        let mut f = [0u8; 24];
        f[..8].copy_from_slice(&size.to_be_bytes());
        f[12..16].copy_from_slice(&l1_size.to_be_bytes());
        f[16..].copy_from_slice(&l1_off.to_be_bytes());
        storage.write_at(&f, 24).ctx(path)?;
        st.h.size = size;
        st.h.l1_size = l1_size;
        st.h.l1_table_offset = l1_off;
        st.l1 = vec![0; usize::try_from(l1_entries).unwrap_or(0)];
        st.meta_invalidate();
    }
    q.size = size;
    if let Some(e) = &opts.encrypt {
        q.set_up_encryption(e)?;
    }
    if opts.prealloc != Preallocation::Off {
        q.preallocate_range(0, q.geo.align_up(size), opts.prealloc, false)?;
    }
    q.flush()?;
    image_file.finish();
    if let Some(guard) = data_file {
        guard.finish();
    }
    Ok(())
}

/// qemu-img's words for a disk whose L1 table would pass its limit.
const TOO_LARGE: &str =
    "The image size is too large for file format 'qcow2' (try using a larger cluster size)";

/// Clusters of refcount table and blocks needed to count `clusters` clusters and themselves
/// (the fixed point qemu's qcow2_refcount_metadata_size finds).
fn refcount_metadata_clusters(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return blocks + table;
        }
    }
}

/// What `measure` reports for a qcow2 target: the cluster size, and the size of a fully
/// allocated image of `size` bytes (data rounded up to clusters, plus all metadata), computed as
/// qemu-img measure computes it.
///
/// # Errors
/// When an option is invalid.
pub fn measure_full(size: u64, o: &CreateOptions) -> Result<(u64, u64)> {
    let opts = parse_measure(o)?;
    let cs = 1u64 << opts.cluster_bits;
    let esize = if opts.extended_l2 { 16 } else { 8 };
    // qemu's check, in its words (it divides the size down, where create rounds it up).
    if (size / cs).div_ceil(cs / esize) * 8 > super::MAX_L1_BYTES {
        return Err(Error::InvalidOption(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    let aligned = size.div_ceil(cs) * cs;
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / esize) * (cs / esize);
    meta += nl2e * esize;
    let nl1e = (nl2e * esize / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_clusters((meta + aligned) / cs, cs, opts.refcount_order) * cs;
    // qemu adds a LUKS header area, in whole clusters, after counting the refcounts.
    if let Some(super::crypt::CreateCrypt::Luks(params, _)) = &opts.encrypt {
        meta += params.header_area_len().div_ceil(cs) * cs;
    }
    Ok((cs, meta + aligned))
}

/// Whether an image made with these options can hold persistent bitmaps (version 3 only).
///
/// # Errors
/// When an option is invalid.
pub fn can_hold_bitmaps(o: &CreateOptions) -> Result<bool> {
    Ok(parse_measure(o)?.version >= 3)
}

/// Whether creation options ask for data preallocation (falloc or full).
///
/// # Errors
/// When an option is invalid.
pub fn preallocates_data(o: &CreateOptions) -> Result<bool> {
    Ok(matches!(
        parse_measure(o)?.prealloc,
        Preallocation::Falloc | Preallocation::Full
    ))
}
