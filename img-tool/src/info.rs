//! `img info`: what qemu-img's `ImageInfo` says about an image, as JSON or as text.

use std::sync::Arc;

use clap::Args;
use imgblock::driver::{BitmapInfo, Qcow2Specific};
use imgblock::storage::Storage;
use imgblock::{FormatSpecific, Image, SnapshotInfo, VmdkSpecific};
use serde_json::{json, Map, Value};

use imgblock::crypto::{EncryptionInfo, LuksInfo};

use crate::console;
use crate::failure::CliResult;
use crate::open::{open_source, parse_format, OpenRequest};
use crate::output::OutputFormat;
use crate::qjson;
use crate::secrets::SecretArgs;
use crate::units::{size_to_str, size_with_bytes};

/// `img info [-f FMT] [--output=human|json] [-b|--backing-chain] [-U] FILE`
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", value_name = "FMT", default_value = "human")]
    output: String,
    /// Describe every image of the backing chain.
    #[arg(short = 'b', long = "backing-chain")]
    backing_chain: bool,
    /// Open the image even if another process uses it (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// OVA appliances: which disk to describe (0-based; default the first).
    #[arg(long = "disk", value_name = "N")]
    disk: Option<usize>,
    /// The image file (or OVA appliance).
    filename: String,
    /// `--object secret,...` and `--image-opts`.
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
}

/// Runs `img info`.
///
/// # Errors
/// When the image (or, with `--backing-chain`, one of its backing files) cannot be opened.
pub fn run(args: &InfoArgs) -> CliResult<i32> {
    let output = OutputFormat::parse(&args.output, "info")?;
    let mut spec = args
        .secret_args
        .resolve(&args.filename, parse_format(args.format.as_deref())?)?;
    // Like qemu-img info, describe encrypted images from their headers: a secret, right or
    // wrong, is not even tried.
    spec.secrets = imgblock::crypto::Secrets::for_metadata();
    let req = OpenRequest {
        format: spec.format,
        no_backing: !args.backing_chain,
        force_share: args.force_share,
        secrets: Some(&spec.secrets),
        ..OpenRequest::default()
    };
    let img = open_source(&spec.path, &req, args.disk)?;
    let images = if args.backing_chain {
        img.chain()
    } else {
        vec![&img]
    };
    let infos = images
        .iter()
        .map(|i| image_info(i))
        .collect::<CliResult<Vec<_>>>()?;
    let text = match (output, args.backing_chain) {
        (OutputFormat::Json, true) => qjson::to_string(&Value::Array(infos)) + "\n",
        (OutputFormat::Json, false) => {
            infos.first().map(qjson::to_string).unwrap_or_default() + "\n"
        }
        (OutputFormat::Human, _) => infos.iter().map(human_info).collect::<Vec<_>>().join("\n"),
    };
    console::print(&text);
    Ok(0)
}

/// One image's `ImageInfo`, keys inserted in QAPI field order.
fn image_info(img: &Image) -> CliResult<Value> {
    let d = img.driver();
    let files = host_files(d);
    let mut m = Map::new();
    m.insert("filename".into(), json!(img.name()));
    m.insert("format".into(), json!(img.format().name()));
    m.insert("dirty-flag".into(), json!(d.dirty()));
    // The files the format counts as its own (vmdk: every extent; qcow2: not a data file).
    let allocated: Result<u64, _> = files
        .iter()
        .take(d.usage_files())
        .map(|f| f.allocated_size())
        .sum();
    if let Ok(a) = allocated {
        m.insert("actual-size".into(), json!(a));
    }
    m.insert("virtual-size".into(), json!(img.size()));
    if let Some(cs) = d.cluster_size() {
        m.insert("cluster-size".into(), json!(cs));
    }
    if d.encrypted() {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = d.backing() {
        // A json: name stays as it is: it is not a path to resolve.
        let full = imgblock::image::resolve_backing(img.path(), &b.filename)
            .display()
            .to_string();
        m.insert("backing-filename".into(), json!(b.filename));
        m.insert("full-backing-filename".into(), json!(full));
        if let Some(f) = b.format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    let snapshots = d.snapshots()?;
    if !snapshots.is_empty() {
        m.insert(
            "snapshots".into(),
            Value::Array(snapshots.iter().map(snapshot_info).collect()),
        );
    }
    let mut children = Vec::new();
    match d.specific() {
        FormatSpecific::Qcow2(q) => {
            let mut data = qcow2_specific(&q);
            if let (Some(e), Value::Object(dm)) = (d.encryption_info(), &mut data) {
                // QAPI puts `encrypt` just before `compression-type`.
                let bm = dm.remove("bitmaps");
                let ct = dm.remove("compression-type");
                dm.insert("encrypt".into(), encrypt_info(&e));
                if let Some(bm) = bm {
                    dm.insert("bitmaps".into(), bm);
                }
                if let Some(ct) = ct {
                    dm.insert("compression-type".into(), ct);
                }
            }
            m.insert(
                "format-specific".into(),
                json!({"type": "qcow2", "data": data}),
            );
        }
        FormatSpecific::None if img.format() == imgblock::Format::Luks => {
            if let Some(EncryptionInfo::Luks(l)) = d.encryption_info() {
                m.insert(
                    "format-specific".into(),
                    json!({"type": "luks", "data": luks_info(&l, false)}),
                );
            }
        }
        FormatSpecific::Vmdk(v) => {
            m.insert(
                "format-specific".into(),
                json!({"type": "vmdk", "data": vmdk_specific(&v)}),
            );
            // Extents in files of their own are child nodes, newest (last) first, as in qemu.
            // The extent names are already resolved against the descriptor's directory.
            for (i, e) in v.extents.iter().enumerate().rev() {
                // Compared as displayed: a name in a legacy code page is not UTF-8.
                let shown = files[1..]
                    .iter()
                    .find(|f| f.path().display().to_string() == e.filename);
                if let Some(f) = shown {
                    children.push(json!({"name": format!("extents.{i}"), "info": file_info(f)?}));
                }
            }
        }
        // qemu prints no format-specific block for vdi (nor raw).
        _ => {}
    }
    children.push(json!({"name": "file", "info": file_info(d.storage(0))?}));
    m.insert("children".into(), Value::Array(children));
    Ok(Value::Object(m))
}

/// qcow2's `encrypt` block (qemu's `QCryptoBlockInfo`).
fn encrypt_info(e: &EncryptionInfo) -> Value {
    match e {
        EncryptionInfo::Aes => json!({"format": "aes"}),
        EncryptionInfo::Luks(l) => luks_info(l, true),
    }
}

/// A LUKS header as qemu's `QCryptoBlockInfoLUKS`, with the `format` discriminator when it is
/// qcow2's `encrypt` union.
fn luks_info(l: &LuksInfo, with_format: bool) -> Value {
    let mut m = Map::new();
    if with_format {
        m.insert("format".into(), json!("luks"));
    }
    m.insert("cipher-alg".into(), json!(l.cipher_alg));
    m.insert("cipher-mode".into(), json!(l.cipher_mode));
    m.insert("ivgen-alg".into(), json!(l.ivgen_alg));
    if let Some(h) = l.ivgen_hash_alg {
        m.insert("ivgen-hash-alg".into(), json!(h));
    }
    m.insert("hash-alg".into(), json!(l.hash_alg));
    m.insert("detached-header".into(), json!(l.detached_header));
    m.insert("payload-offset".into(), json!(l.payload_offset));
    m.insert("master-key-iters".into(), json!(l.master_key_iters));
    m.insert("uuid".into(), json!(l.uuid));
    let slots: Vec<Value> = l
        .slots
        .iter()
        .map(|s| {
            let mut sm = Map::new();
            sm.insert("active".into(), json!(s.active));
            if let Some(i) = s.iters {
                sm.insert("iters".into(), json!(i));
            }
            if let Some(st) = s.stripes {
                sm.insert("stripes".into(), json!(st));
            }
            sm.insert("key-offset".into(), json!(s.key_offset));
            Value::Object(sm)
        })
        .collect();
    m.insert("slots".into(), Value::Array(slots));
    Value::Object(m)
}

/// The driver's host files, the image file first.
fn host_files(d: &dyn imgblock::Driver) -> Vec<&Arc<dyn Storage>> {
    (0..d.files().max(1)).map(|i| d.storage(i)).collect()
}

/// qemu measures files in whole 512-byte sectors.
const SECTOR: u64 = 512;

/// A host file as qemu's file protocol driver describes it (its length rounded up to a whole
/// sector, as qemu's `bdrv_getlength` does).
fn file_info(file: &Arc<dyn Storage>) -> CliResult<Value> {
    let mut m = Map::new();
    m.insert("filename".into(), json!(file.path().display().to_string()));
    // qemu's protocol driver for a block device is host_device (its specific type stays file).
    let protocol = if file.is_device() {
        "host_device"
    } else {
        "file"
    };
    m.insert("format".into(), json!(protocol));
    m.insert("dirty-flag".into(), json!(false));
    if let Ok(a) = file.allocated_size() {
        m.insert("actual-size".into(), json!(a));
    }
    m.insert(
        "virtual-size".into(),
        json!(file.size()?.div_ceil(SECTOR) * SECTOR),
    );
    m.insert(
        "format-specific".into(),
        json!({"type": "file", "data": {}}),
    );
    m.insert("children".into(), json!([]));
    Ok(Value::Object(m))
}

/// vmdk's format-specific data (qemu's `ImageInfoSpecificVmdk`).
fn vmdk_specific(v: &VmdkSpecific) -> Value {
    let extents: Vec<Value> = v
        .extents
        .iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert("filename".into(), json!(e.filename));
            m.insert("format".into(), json!(e.format));
            m.insert("virtual-size".into(), json!(e.virtual_size));
            if let Some(cs) = e.cluster_size {
                m.insert("cluster-size".into(), json!(cs));
            }
            if e.compressed {
                m.insert("compressed".into(), json!(true));
            }
            Value::Object(m)
        })
        .collect();
    json!({
        "create-type": v.create_type,
        "cid": v.cid,
        "parent-cid": v.parent_cid,
        "extents": extents,
    })
}

/// One persistent bitmap as qemu's `Qcow2BitmapInfo` (fields in QAPI order).
fn bitmap_info(b: &BitmapInfo) -> Value {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.enabled {
        flags.push("auto");
    }
    let mut m = Map::new();
    m.insert("name".into(), json!(b.name));
    m.insert("granularity".into(), json!(b.granularity));
    m.insert("flags".into(), json!(flags));
    Value::Object(m)
}

/// qcow2's format-specific data; the v3-only fields appear only for compat 1.1, as in qemu.
fn qcow2_specific(q: &Qcow2Specific) -> Value {
    let v3 = q.compat != "0.10";
    let mut m = Map::new();
    m.insert("compat".into(), json!(q.compat));
    if let Some(df) = &q.data_file {
        m.insert("data-file".into(), json!(df));
        m.insert("data-file-raw".into(), json!(q.data_file_raw));
    }
    if v3 {
        m.insert("extended-l2".into(), json!(q.extended_l2));
        m.insert("lazy-refcounts".into(), json!(q.lazy_refcounts));
        m.insert("corrupt".into(), json!(q.corrupt));
    }
    m.insert("refcount-bits".into(), json!(q.refcount_bits));
    if v3 && !q.bitmaps.is_empty() {
        m.insert(
            "bitmaps".into(),
            Value::Array(q.bitmaps.iter().map(bitmap_info).collect()),
        );
    }
    m.insert("compression-type".into(), json!(q.compression_type));
    Value::Object(m)
}

/// What `img snapshot -l` prints: qemu's table, or nothing when there are no snapshots.
pub fn snapshot_list_text(snaps: &[SnapshotInfo]) -> String {
    if snaps.is_empty() {
        return String::new();
    }
    let v: Vec<Value> = snaps.iter().map(snapshot_info).collect();
    snapshot_table(&v)
}

/// qemu lists a snapshot's ID and name from fixed arrays (QEMUSnapshotInfo's `id_str[128]`
/// and `name[256]`): at most 127 and 255 bytes of them. An image may hold 65535 bytes of each
/// in each of thousands of snapshots.
const LISTED_ID_BYTES: usize = 127;
const LISTED_NAME_BYTES: usize = 255;

/// The first `max` bytes of `s`, cut back to a character boundary.
fn listed(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn snapshot_info(s: &SnapshotInfo) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(listed(&s.id, LISTED_ID_BYTES)));
    m.insert("name".into(), json!(listed(&s.name, LISTED_NAME_BYTES)));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert(
        "vm-clock-sec".into(),
        json!(s.vm_clock_nsec / 1_000_000_000),
    );
    m.insert(
        "vm-clock-nsec".into(),
        json!(s.vm_clock_nsec % 1_000_000_000),
    );
    if let Some(i) = s.icount {
        m.insert("icount".into(), json!(i));
    }
    Value::Object(m)
}

fn get_u64(m: &Map<String, Value>, k: &str) -> Option<u64> {
    m.get(k).and_then(Value::as_u64)
}

fn get_str<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// The human text for one image (qemu's `bdrv_image_info_dump`), from its JSON form.
fn human_info(info: &Value) -> String {
    let Some(m) = info.as_object() else {
        return String::new();
    };
    let mut out = node_header(m, 0, false);
    if m.get("encrypted").and_then(Value::as_bool) == Some(true) {
        out.push_str("encrypted: yes\n");
    }
    if let Some(cs) = get_u64(m, "cluster-size") {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if m.get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = get_str(m, "backing-filename") {
        out.push_str(&format!("backing file: {b}"));
        match get_str(m, "full-backing-filename") {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => out.push_str(&format!(" (actual path: {full})")),
            Some(_) => {}
        }
        out.push('\n');
    }
    if let Some(f) = get_str(m, "backing-filename-format") {
        out.push_str(&format!("backing file format: {f}\n"));
    }
    if let Some(Value::Array(snaps)) = m.get("snapshots") {
        out.push_str(&snapshot_table(snaps));
    }
    out.push_str(&format_specific_text(m, 0));
    if let Some(Value::Array(children)) = m.get("children") {
        for c in children {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            if let Some(ci) = c.get("info").and_then(Value::as_object) {
                out.push_str(&format!("Child node '/{name}':\n"));
                out.push_str(&node_header(ci, 4, true));
                out.push_str(&format_specific_text(ci, 4));
            }
        }
    }
    out
}

/// The four lines every node starts with; `protocol` uses the file child's wording.
fn node_header(m: &Map<String, Value>, indent: usize, protocol: bool) -> String {
    let ind = " ".repeat(indent);
    let (name, kind, size) = if protocol {
        ("filename", "protocol type", "file length")
    } else {
        ("image", "file format", "virtual size")
    };
    let disk = get_u64(m, "actual-size").map_or_else(|| "unavailable".to_owned(), size_to_str);
    format!(
        "{ind}{name}: {}\n{ind}{kind}: {}\n{ind}{size}: {}\n{ind}disk size: {disk}\n",
        get_str(m, "filename").unwrap_or(""),
        get_str(m, "format").unwrap_or(""),
        size_with_bytes(get_u64(m, "virtual-size").unwrap_or(0)),
    )
}

/// "Format specific information:" and the data, unless there is none.
fn format_specific_text(m: &Map<String, Value>, indent: usize) -> String {
    let Some(data) = m
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(Value::as_object)
    else {
        return String::new();
    };
    if data.is_empty() {
        return String::new();
    }
    let mut out = format!("{:indent$}Format specific information:\n", "");
    qjson::dump_human(&mut out, data, indent + 4);
    out
}

/// The snapshot table as qemu's `bdrv_snapshot_dump` prints it.
fn snapshot_table(snaps: &[Value]) -> String {
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for s in snaps.iter().filter_map(Value::as_object) {
        let clock = get_u64(s, "vm-clock-sec").unwrap_or(0) * 1_000_000_000
            + get_u64(s, "vm-clock-nsec").unwrap_or(0);
        out.push_str(&format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            get_str(s, "id").unwrap_or(""),
            get_str(s, "name").unwrap_or(""),
            size_to_str(get_u64(s, "vm-state-size").unwrap_or(0)),
            format_date(get_u64(s, "date-sec").unwrap_or(0)),
            format_vm_clock(clock),
            // A snapshot without an instruction count (icount -1) shows "--", as in qemu.
            get_u64(s, "icount").map_or_else(|| "--".to_owned(), |i| i.to_string()),
        ));
    }
    out
}

/// The guest clock as qemu prints it: `HHHH:MM:SS.mmm`.
fn format_vm_clock(nsec: u64) -> String {
    let secs = nsec / 1_000_000_000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (nsec / 1_000_000) % 1000
    )
}

/// The snapshot's date as qemu prints it: local time, `%Y-%m-%d %H:%M:%S`.
fn format_date(secs: u64) -> String {
    crate::localtime::format_local(i64::try_from(secs).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_vm_clock_hours_minutes_millis() {
        assert_eq!(format_vm_clock(0), "0000:00:00.000");
        assert_eq!(format_vm_clock(3_723_456_000_000), "0001:02:03.456");
    }

    #[test]
    fn snapshot_table_matches_qemu_columns() {
        let s = json!([{"id": "1", "name": "snap1", "vm-state-size": 0, "date-sec": 1_795_278_336u64,
            "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0, "icount": 0}]);
        let t = snapshot_table(s.as_array().unwrap());
        assert_eq!(
            t,
            format!(
                "Snapshot list:\n\
             ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\n\
             1       snap1                 0 B {}  0000:00:00.000          0\n",
                format_date(1_795_278_336)
            )
        );
    }

    #[test]
    fn human_info_raw_matches_qemu() {
        let v = json!({"filename": "r.raw", "format": "raw", "dirty-flag": false, "actual-size": 69632,
            "virtual-size": 1_048_576,
            "children": [{"name": "file", "info": {"filename": "r.raw", "format": "file", "dirty-flag": false,
                "actual-size": 69632, "virtual-size": 1_048_576,
                "format-specific": {"type": "file", "data": {}}, "children": []}}]});
        assert_eq!(
            human_info(&v),
            "image: r.raw\nfile format: raw\nvirtual size: 1 MiB (1048576 bytes)\ndisk size: 68 KiB\n\
             Child node '/file':\n    filename: r.raw\n    protocol type: file\n\
             \x20   file length: 1 MiB (1048576 bytes)\n    disk size: 68 KiB\n"
        );
    }

    #[test]
    fn qcow2_specific_v2_has_only_three_keys() {
        let q = Qcow2Specific {
            compat: "0.10",
            compression_type: "zlib",
            lazy_refcounts: false,
            refcount_bits: 16,
            corrupt: false,
            extended_l2: false,
            data_file: None,
            data_file_raw: false,
            bitmaps: Vec::new(),
        };
        assert_eq!(qjson::to_string(&qcow2_specific(&q)), "{\n    \"compat\": \"0.10\",\n    \"compression-type\": \"zlib\",\n    \"refcount-bits\": 16\n}");
    }
}
