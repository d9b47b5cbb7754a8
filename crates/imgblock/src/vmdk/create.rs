//! Creating vmdk images with qemu-img's options: the five subformats qemu-img offers, laid out
//! as qemu lays them out (sparse: header, embedded descriptor, redundant GD and GTs, GD and GTs,
//! grains), except streamOptimized, which gets VMware's layout (see stream.rs).

use std::path::{Path, PathBuf};

use super::descriptor::{Access, Descriptor, ExtentLine, ExtentType, NO_PARENT_CID};
use super::sparse::{self, Geometry, SparseHeader, SECTOR};
use super::Error as VmdkError;
use crate::error::IoContext;
use crate::options::{parse_bool, FileOptions};
use crate::raw::Preallocation;
use crate::storage::{FileStorage, Storage};
use crate::{CreateOptions, Error, Image, OpenOptions, Result};

/// Options vmdk accepts on create, with qemu-img's help text.
pub const CREATE_OPTIONS: &[(&str, &str)] = &[
    (
        "adapter_type",
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    ("backing_file", "File name of a base image"),
    ("backing_fmt", "Must be 'vmdk' if present"),
    ("compat6", "VMDK version 6 image"),
    (
        "extent_size_hint",
        "Extent size hint for the image file, 0 to disable",
    ),
    ("hwversion", "VMDK hardware version"),
    ("nocow", "Turn off copy-on-write (valid only on btrfs)"),
    (
        "preallocation",
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    ("size", "Virtual disk size"),
    (
        "subformat",
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    ),
    ("toolsversion", "VMware guest tools version"),
    (
        "zeroed_grain",
        "Enable efficient zero writes using the zeroed-grain GTE feature",
    ),
];

/// Size of one extent of the twoGbMaxExtent subformats.
pub const SPLIT_EXTENT_BYTES: u64 = 2 << 30;
/// Grain size qemu and VMware use: 128 sectors (64 KiB).
pub const DEFAULT_GRAIN_SECTORS: u64 = 128;
/// Grain table entries per table.
pub const GTES_PER_GT: u32 = 512;
/// Sectors reserved for the embedded descriptor (qemu's DESC_SIZE).
pub const EMBEDDED_DESC_SECTORS: u64 = 20;

/// The subformats qemu-img creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with an embedded descriptor.
    MonolithicSparse,
    /// A descriptor and one flat file.
    MonolithicFlat,
    /// A descriptor and 2 GiB sparse files.
    TwoGbMaxExtentSparse,
    /// A descriptor and 2 GiB flat files.
    TwoGbMaxExtentFlat,
    /// One compressed, write-once file with markers.
    StreamOptimized,
}

impl Subformat {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            _ => {
                return Err(Error::InvalidOption(format!(
                    "invalid parameter value: {s}"
                )))
            }
        })
    }
    fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }
}

pub(crate) fn random_u32() -> u32 {
    let u = crate::vdi::header::Uuid::random();
    u32::from_le_bytes([u.0[0], u.0[1], u.0[2], u.0[3]])
}

/// Splits a path's file name into (prefix, extension-with-dot) the way qemu names extents.
fn prefix_postfix(path: &Path) -> (String, String) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rfind('.') {
        Some(i) if i > 0 => (name[..i].to_owned(), name[i..].to_owned()),
        _ => (name, String::new()),
    }
}

fn vmdk_invalid(path: &Path, msg: String) -> Error {
    Error::Vmdk {
        path: path.to_owned(),
        source: VmdkError::InvalidOption(msg),
    }
}

/// Writes a sparse extent file in qemu's layout (`compressed`: VMware stream layout instead).
fn write_sparse_extent(
    path: &Path,
    sectors: u64,
    zeroed_grain: bool,
    stream: bool,
    desc: Option<&str>,
    file: FileOptions,
) -> Result<()> {
    let geo =
        Geometry::new(sectors, DEFAULT_GRAIN_SECTORS, GTES_PER_GT).map_err(|e| Error::Vmdk {
            path: path.to_owned(),
            source: e,
        })?;
    let s = FileStorage::create_with(path, file)?;
    let gd_sectors = geo.gd_bytes() / SECTOR;
    let gt_sectors = geo.gt_bytes() / SECTOR;
    let mut h = SparseHeader {
        version: if zeroed_grain { 2 } else { 1 },
        flags: sparse::FLAG_NL_DETECT
            | sparse::FLAG_RGD
            | if zeroed_grain {
                sparse::FLAG_ZERO_GRAIN
            } else {
                0
            },
        capacity: sectors,
        grain_size: DEFAULT_GRAIN_SECTORS,
        desc_offset: 1,
        desc_size: EMBEDDED_DESC_SECTORS,
        gtes_per_gt: GTES_PER_GT,
        rgd_offset: 0,
        gd_offset: 0,
        overhead: 0,
        unclean: 0,
        check_bytes: *b"\n \r\n",
        compress: 0,
    };
    if let Some(d) = desc {
        if d.len() as u64 > EMBEDDED_DESC_SECTORS * SECTOR {
            return Err(vmdk_invalid(path, "descriptor too long".into()));
        }
        s.write_at(d.as_bytes(), SECTOR).ctx(path)?;
    }
    if stream {
        // An empty stream in qemu's layout: directories and zeroed tables after the descriptor,
        // as in a sparse extent, so that qemu can write into it as well as read it. Writing it
        // here starts the stream afresh, in VMware's layout (see the driver's open).
        // zeroed_grain keeps its flag, as in qemu's streams.
        h.version = 3;
        h.flags |= sparse::FLAG_COMPRESS | sparse::FLAG_MARKER;
        h.compress = sparse::COMPRESSION_DEFLATE;
    }
    let tables = gt_sectors * geo.gd_entries;
    h.rgd_offset = 1 + EMBEDDED_DESC_SECTORS;
    h.gd_offset = h.rgd_offset + gd_sectors + tables;
    h.overhead =
        (h.gd_offset + gd_sectors + tables).div_ceil(DEFAULT_GRAIN_SECTORS) * DEFAULT_GRAIN_SECTORS;
    for dir in [h.rgd_offset, h.gd_offset] {
        let first_gt = dir + gd_sectors;
        let mut raw = Vec::with_capacity(usize::try_from(geo.gd_bytes()).unwrap_or(0));
        for i in 0..geo.gd_entries {
            let sec = u32::try_from(first_gt + i * gt_sectors)
                .map_err(|_| vmdk_invalid(path, "image too large".into()))?;
            raw.extend_from_slice(&sec.to_le_bytes());
        }
        s.write_at(&raw, dir * SECTOR).ctx(path)?;
    }
    s.write_at(&h.to_bytes(), 0).ctx(path)?;
    s.set_len(h.overhead * SECTOR).ctx(path)?;
    s.flush().ctx(path)
}

/// Creates a vmdk image.
///
/// # Errors
/// When an option is invalid, the backing image cannot be read, or I/O fails.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    crate::storage::refuse_device(path, "vmdk")?;
    let mut adapter = "ide".to_owned();
    let mut compat6 = false;
    let mut hwversion: Option<String> = None;
    let mut prealloc = Preallocation::Off;
    let mut sub = Subformat::MonolithicSparse;
    let mut tools = "2147483647".to_owned();
    let mut zeroed = false;
    for (k, v) in &opts.opts {
        match k.as_str() {
            "adapter_type" => {
                if !matches!(v.as_str(), "ide" | "lsilogic" | "buslogic" | "legacyESX") {
                    return Err(Error::InvalidOption(format!(
                        "invalid parameter value: {v}"
                    )));
                }
                adapter = v.clone();
            }
            "compat6" => compat6 = parse_bool(k, v)?,
            "hwversion" => {
                if v != "undefined" {
                    hwversion = Some(v.clone());
                }
            }
            "preallocation" => {
                prealloc = Preallocation::parse(v)?;
                if prealloc == Preallocation::Metadata {
                    return Err(Error::InvalidOption(format!(
                        "Unsupported preallocation mode: {v}"
                    )));
                }
            }
            "subformat" => sub = Subformat::parse(v)?,
            "toolsversion" => tools = v.clone(),
            "zeroed_grain" => zeroed = parse_bool(k, v)?,
            "extent_size_hint" | "nocow" => {}
            _ => {
                return Err(Error::InvalidOption(format!(
                    "Invalid parameter '{k}' for format vmdk"
                )))
            }
        }
    }
    if compat6 && hwversion.is_some() {
        return Err(Error::InvalidOption(
            "compat6 cannot be enabled with hwversion set".into(),
        ));
    }
    let flat = matches!(
        sub,
        Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
    );
    // The caller names the file (qemu's words follow it).
    if zeroed && flat {
        return Err(Error::InvalidOption(
            "Flat image can't enable zeroed grain".into(),
        ));
    }
    if flat && opts.backing_file.is_some() {
        // A flat extent holds every sector: nothing would ever be read from the parent.
        return Err(Error::InvalidOption(
            "Flat image can't have backing file".into(),
        ));
    }
    let hw = hwversion.unwrap_or_else(|| if compat6 { "6" } else { "4" }.to_owned());
    if let Some(f) = &opts.backing_fmt {
        if f != "vmdk" {
            return Err(Error::InvalidOption(
                "backing_file must be a vmdk image".into(),
            ));
        }
    }
    let mut parent_cid = NO_PARENT_CID;
    let mut size = opts.size;
    if let Some(b) = &opts.backing_file {
        let bpath = crate::image::resolve_backing(path, b);
        if !opts.unsafe_backing || size.is_none() {
            let bimg = Image::open(
                &bpath,
                &OpenOptions::read_only().format(Some(crate::Format::Vmdk)),
            )?;
            if size.is_none() {
                size = Some(bimg.size());
            }
            if let crate::FormatSpecific::Vmdk(v) = bimg.driver().specific() {
                parent_cid = v.cid;
            }
        } else if let Ok(s) = FileStorage::open(&bpath, false) {
            if let Ok((d, _)) = super::read_descriptor(&s) {
                parent_cid = d.cid;
            }
        }
    }
    let size =
        size.ok_or_else(|| Error::InvalidOption("Image creation needs a size parameter".into()))?;
    let total_sectors = size.div_ceil(SECTOR);
    let heads: u64 = if adapter == "ide" { 16 } else { 255 };
    let mut desc = Descriptor {
        version: 1,
        cid: random_u32(),
        parent_cid,
        create_type: sub.name().to_owned(),
        parent_hint: opts.backing_file.clone(),
        extents: Vec::new(),
        ddb: vec![
            ("ddb.virtualHWVersion".into(), hw),
            (
                "ddb.geometry.cylinders".into(),
                (total_sectors / (heads * 63)).to_string(),
            ),
            ("ddb.geometry.heads".into(), heads.to_string()),
            ("ddb.geometry.sectors".into(), "63".into()),
            ("ddb.adapterType".into(), adapter),
            ("ddb.toolsVersion".into(), tools),
        ],
        latin1: false,
    };
    let dir: PathBuf = path.parent().map(Path::to_owned).unwrap_or_default();
    let (prefix, postfix) = prefix_postfix(path);
    let own = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match sub {
        Subformat::MonolithicSparse | Subformat::StreamOptimized => {
            desc.extents.push(ExtentLine {
                access: Access::Rw,
                sectors: total_sectors,
                kind: ExtentType::Sparse,
                filename: Some(own),
                offset: 0,
            });
            let text = desc.to_text();
            write_sparse_extent(
                path,
                total_sectors,
                zeroed,
                sub == Subformat::StreamOptimized,
                Some(&text),
                opts.file,
            )?;
        }
        _ => {
            let split = matches!(
                sub,
                Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat
            );
            let per = if split {
                SPLIT_EXTENT_BYTES / SECTOR
            } else {
                total_sectors.max(1)
            };
            let mut left = total_sectors;
            let mut idx = 1;
            loop {
                let n = left.min(per);
                let name = match (split, flat) {
                    (false, _) => format!("{prefix}-flat{postfix}"),
                    (true, true) => format!("{prefix}-f{idx:03}{postfix}"),
                    (true, false) => format!("{prefix}-s{idx:03}{postfix}"),
                };
                let epath = dir.join(&name);
                if flat {
                    let s = FileStorage::create_with(&epath, opts.file)?;
                    crate::storage::set_len_preallocated(&s, 0, n * SECTOR, prealloc)
                        .ctx(&epath)?;
                    s.flush().ctx(&epath)?;
                } else {
                    write_sparse_extent(&epath, n, zeroed, false, None, opts.file)?;
                }
                desc.extents.push(ExtentLine {
                    access: Access::Rw,
                    sectors: n,
                    kind: if flat {
                        ExtentType::Flat
                    } else {
                        ExtentType::Sparse
                    },
                    filename: Some(name),
                    offset: 0,
                });
                left -= n;
                idx += 1;
                if left == 0 {
                    break;
                }
            }
            let s = FileStorage::create_with(path, opts.file)?;
            s.write_at(desc.to_text().as_bytes(), 0).ctx(path)?;
            s.flush().ctx(path)?;
        }
    }
    Ok(())
}
