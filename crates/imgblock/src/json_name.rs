//! qemu's `json:{...}` image names: an image given by its block options rather than a file
//! name, as libvirt and blockdev tooling write into backing-file fields
//! (`json:{"driver":"qcow2","file":{"driver":"file","filename":"/img/base.qcow2"}}`).
//!
//! Nested objects and dotted keys mean the same (`"file":{"filename":F}` is
//! `"file.filename":F`), as in qemu. Only images in local files are supported: a format driver
//! (or none, to probe) over the `file` or `host_device` protocol. Options that only tune how
//! qemu opens the file (caching, locking, node names) are accepted and ignored; any other is
//! refused by name, never silently dropped.

use std::path::PathBuf;

use serde_json::{Map, Value};

/// Keys that only tune how qemu opens a node: they change nothing that is read.
pub const IGNORED: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "force-share",
    "cache.direct",
    "cache.no-flush",
    "file.node-name",
    "file.locking",
    "file.aio",
    "file.aio-max-batch",
    "file.cache.direct",
    "file.cache.no-flush",
    "file.discard",
    "file.detect-zeroes",
    "file.read-only",
    "file.auto-read-only",
    "file.x-check-cache-dropped",
    "file.drop-cache",
];

/// Protocols naming a local file or device.
const LOCAL: &[&str] = &["file", "host_device", "host_cdrom"];

/// What a `json:` name opens: the file, and the format when the name gives one (`driver`; a
/// bare protocol node reads as raw).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonName {
    /// The file, as the name spells it (qemu opens it relative to the working directory).
    pub filename: PathBuf,
    /// The format driver's name, when given.
    pub driver: Option<String>,
    /// The raw driver's `offset` and `size`, when either is given.
    pub window: Option<crate::raw::Window>,
    /// The format sits on a raw window of the file (`"file":{"driver":"raw","offset":...}`,
    /// as virt-v2v reads a disk inside an OVA).
    pub file_window: Option<crate::raw::Window>,
    /// qemu's `backing` option, when given: `Some(None)` opens the image without its backing
    /// chain (`"backing": null`), `Some(Some(name))` puts the image `name` (a `json:` name)
    /// below it instead of the one its header names (`"backing": {"driver": ...}`), as oVirt
    /// names a single volume or a sub-chain to measure.
    pub backing: Option<Option<String>>,
    /// The ID of the secret that unlocks the image (`encrypt.key-secret`, luks' `key-secret`).
    pub key_secret: Option<String>,
    /// The encryption format the image must have (`encrypt.format`).
    pub encrypt_format: Option<String>,
    /// A qcow2 image's external data file, instead of the one its header names (`data-file`,
    /// a local file node).
    pub data_file: Option<PathBuf>,
}

/// Parses `name` when it is a `json:` name: `None` for plain file names.
///
/// # Errors
/// A message naming what qemu would accept and we do not read: bad JSON, a protocol other than
/// a local file, an unknown option.
pub fn parse(name: &str) -> Option<Result<JsonName, String>> {
    let body = name.strip_prefix("json:")?;
    Some(parse_body(body))
}

fn parse_body(body: &str) -> Result<JsonName, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("Could not parse 'json:' options: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("Invalid JSON object given".into());
    };
    let mut flat = Map::new();
    flatten("", &obj, &mut flat)?;
    let backing = take_backing(&mut flat)?;
    let text = |k: &str| -> Result<Option<String>, String> {
        match flat.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("Invalid value for option '{k}': {other}")),
        }
    };
    let driver = text("driver")?;
    let key_secret = match (text("encrypt.key-secret")?, text("key-secret")?) {
        (Some(_), Some(_)) => return Err("Duplicate option 'encrypt.key-secret'".into()),
        (a, b) => a.or(b),
    };
    let encrypt_format = text("encrypt.format")?;
    if let Some(p) = text("data-file.driver")? {
        if !LOCAL.contains(&p.as_str()) {
            return Err(format!(
                "Unsupported protocol '{p}' (only local files can be opened)"
            ));
        }
    }
    let data_file = text("data-file.filename")?.map(PathBuf::from);
    // A format over a raw window over the file: the window's node is `file`, the file's
    // `file.file`.
    let nested = driver.as_deref() != Some("raw") && text("file.driver")?.as_deref() == Some("raw");
    let file = if nested { "file.file." } else { "file." };
    let (filename, format) = match driver.as_deref() {
        // A protocol node at the top: its bytes are the disk.
        Some(d) if LOCAL.contains(&d) => (text("filename")?, Some("raw".to_owned())),
        _ => {
            if let Some(p) = text(&format!("{file}driver"))? {
                if !LOCAL.contains(&p.as_str()) {
                    return Err(format!(
                        "Unsupported protocol '{p}' (only local files can be opened)"
                    ));
                }
            }
            let name = text(&format!("{file}filename"))?;
            let name = if nested {
                name
            } else {
                name.or(text("filename")?)
            };
            (name, driver.clone())
        }
    };
    let filename = filename.ok_or("A block device must be specified for \"filename\"")?;
    let offset = size_option(&flat, "offset")?;
    let size = size_option(&flat, "size")?;
    let window = (offset.is_some() || size.is_some()).then(|| crate::raw::Window {
        offset: offset.as_ref().map_or(0, |o| o.0),
        size: size.as_ref().map(|s| s.0),
        spelled: (offset.clone().map(|o| o.1), size.clone().map(|s| s.1)),
    });
    let file_window = if nested {
        let offset = size_option(&flat, "file.offset")?;
        let size = size_option(&flat, "file.size")?;
        Some(crate::raw::Window {
            offset: offset.as_ref().map_or(0, |o| o.0),
            size: size.as_ref().map(|s| s.0),
            spelled: (offset.map(|o| o.1), size.map(|s| s.1)),
        })
    } else {
        None
    };
    if let (Some(d), true) = (driver.as_deref(), window.is_some()) {
        if LOCAL.contains(&d) {
            let option = if offset.is_some() { "offset" } else { "size" };
            return Err(format!(
                "Block protocol '{d}' doesn't support the option '{option}'"
            ));
        }
    }
    for k in flat.keys() {
        let k = k.as_str();
        let known = [
            "driver",
            "filename",
            "file.driver",
            "encrypt.key-secret",
            "key-secret",
            "encrypt.format",
            "data-file.driver",
            "data-file.filename",
        ]
        .contains(&k)
            || (!nested && k == "file.filename")
            || (window.is_some() && ["offset", "size"].contains(&k))
            || (nested
                && [
                    "file.offset",
                    "file.size",
                    "file.file.driver",
                    "file.file.filename",
                ]
                .contains(&k))
            || IGNORED.contains(&k)
            || (nested
                && k.strip_prefix("file.")
                    .is_some_and(|k| IGNORED.contains(&k)));
        if !known {
            return Err(format!("Unsupported option '{k}' in a json: filename"));
        }
    }
    Ok(JsonName {
        filename: PathBuf::from(filename),
        driver: format,
        window,
        file_window,
        backing,
        key_secret,
        encrypt_format,
        data_file,
    })
}

/// Takes qemu's `backing` option out of the flattened options: `null` (or `""`, its old
/// spelling) for none, or a node's options, which become that node's own `json:` name. A
/// string names another node, which a command line cannot define: refused.
fn take_backing(flat: &mut Map<String, Value>) -> Result<Option<Option<String>>, String> {
    let keys: Vec<String> = flat
        .keys()
        .filter(|k| k.starts_with("backing."))
        .cloned()
        .collect();
    let whole = flat.remove("backing");
    if keys.is_empty() {
        return match whole {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(s)) if s.is_empty() => Ok(Some(None)),
            Some(Value::String(s)) => Err(format!(
                "Could not open backing file: Cannot find device='{s}' nor node-name='{s}'"
            )),
            Some(other) => Err(format!("Invalid value for option 'backing': {other}")),
        };
    }
    if whole.is_some() {
        return Err("Duplicate option 'backing'".into());
    }
    let mut node = Map::new();
    for k in keys {
        if let (Some(v), Some(inner)) = (flat.remove(&k), k.strip_prefix("backing.")) {
            node.insert(inner.to_owned(), v);
        }
    }
    Ok(Some(Some(format!("json:{}", Value::Object(node)))))
}

/// A size option (raw's `offset` and `size`): a JSON number, or a string in qemu's size syntax
/// (`1M`, `0x200`), with qemu's messages; with the value as JSON text.
fn size_option(flat: &Map<String, Value>, key: &str) -> Result<Option<(u64, String)>, String> {
    let value = flat.get(key);
    let spelled = value.map(Value::to_string).unwrap_or_default();
    let text = match value {
        None => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => return Ok(Some((v, spelled))),
            None => n.to_string(),
        },
        Some(other) => {
            return Err(format!(
                "Invalid parameter type for '{key}', expected: integer, got: {other}"
            ))
        }
    };
    crate::options::parse_size_opt(key, &text)
        .map(|v| Some((v, spelled)))
        .map_err(|e| e.to_string())
}

/// Flattens nested objects into dotted keys; a key given both ways is an error, as in qemu.
fn flatten(
    prefix: &str,
    obj: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<(), String> {
    for (k, v) in obj {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(inner) => flatten(&key, inner, out)?,
            other => {
                if out.insert(key.clone(), other.clone()).is_some() {
                    return Err(format!("Duplicate option '{key}'"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(name: &str) -> JsonName {
        parse(name).expect("a json: name").expect("parses")
    }

    #[test]
    fn plain_names_are_not_json() {
        assert!(parse("/img/base.qcow2").is_none());
        assert!(parse("json").is_none());
    }

    #[test]
    fn nested_and_dotted_forms_agree() {
        let nested =
            ok(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/a/b.qcow2"}}"#);
        let dotted =
            ok(r#"json:{"driver":"qcow2","file.driver":"file","file.filename":"/a/b.qcow2"}"#);
        assert_eq!(nested, dotted);
        assert_eq!(nested.filename, PathBuf::from("/a/b.qcow2"));
        assert_eq!(nested.driver.as_deref(), Some("qcow2"));
    }

    #[test]
    fn a_protocol_node_reads_as_raw_and_no_driver_probes() {
        let p = ok(r#"json:{"driver":"file","filename":"x.img"}"#);
        assert_eq!(p.driver.as_deref(), Some("raw"));
        let probe = ok(r#"json:{"file":{"driver":"file","filename":"x.img"}}"#);
        assert_eq!(probe.driver, None);
        let ignored =
            ok(r#"json:{"driver":"raw","node-name":"n","file":{"filename":"x","locking":"off"}}"#);
        assert_eq!(ignored.filename, PathBuf::from("x"));
    }

    #[test]
    fn what_is_not_a_local_file_is_refused_by_name() {
        let err = |n: &str| parse(n).unwrap().unwrap_err();
        assert!(
            err(r#"json:{"driver":"qcow2","file":{"driver":"nbd","host":"h"}}"#).contains("'nbd'")
        );
        assert!(
            err(r#"json:{"driver":"qcow2","file":{"filename":"x"},"backing":"node0"}"#)
                .contains("'node0'")
        );
        assert!(err(r#"json:{"driver":"qcow2"}"#).contains("filename"));
        assert!(err("json:{").contains("json"));
        assert!(err("json:[1]").contains("object"));
        assert!(err(r#"json:{"file":{"filename":"a"},"file.filename":"b"}"#).contains("Duplicate"));
    }

    #[test]
    fn backing_null_drops_the_chain_and_a_backing_node_replaces_it() {
        let file = r#""driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"}"#;
        assert_eq!(ok(&format!("json:{{{file}}}")).backing, None);
        assert_eq!(
            ok(&format!(r#"json:{{{file},"backing":null}}"#)).backing,
            Some(None)
        );
        assert_eq!(
            ok(&format!(r#"json:{{{file},"backing":""}}"#)).backing,
            Some(None)
        );
        let sub = ok(&format!(
            r#"json:{{{file},"backing":{{"driver":"qcow2","file":{{"driver":"file","filename":"b.qcow2"}},"backing":null}}}}"#
        ));
        assert_eq!(sub.filename, PathBuf::from("t.qcow2"));
        let node = sub.backing.flatten().expect("a backing node");
        let inner = ok(&node);
        assert_eq!(inner.filename, PathBuf::from("b.qcow2"));
        assert_eq!(inner.driver.as_deref(), Some("qcow2"));
        assert_eq!(inner.backing, Some(None));
        // Dotted keys mean the same.
        let dotted = ok(&format!(
            r#"json:{{{file},"backing.driver":"qcow2","backing.file.filename":"b.qcow2"}}"#
        ));
        assert_eq!(
            ok(&dotted.backing.flatten().unwrap()).filename,
            PathBuf::from("b.qcow2")
        );
    }

    #[test]
    fn encryption_options_name_their_secret_and_format() {
        let j = ok(
            r#"json:{"driver":"qcow2","encrypt":{"format":"luks","key-secret":"s0"},"file":{"filename":"e.qcow2"},"backing.encrypt.key-secret":"s1","backing.file.filename":"b.qcow2"}"#,
        );
        assert_eq!(j.key_secret.as_deref(), Some("s0"));
        assert_eq!(j.encrypt_format.as_deref(), Some("luks"));
        let b = ok(&j.backing.flatten().expect("a backing node"));
        assert_eq!(b.key_secret.as_deref(), Some("s1"));
        assert_eq!(b.encrypt_format, None);
        let luks = ok(r#"json:{"driver":"luks","key-secret":"k","file":{"filename":"d.luks"}}"#);
        assert_eq!(luks.key_secret.as_deref(), Some("k"));
    }

    #[test]
    fn raw_offset_and_size_make_a_window_spelled_as_given() {
        let w = ok(r#"json:{"driver":"raw","offset":1048576,"size":"2M","file":{"filename":"d"}}"#)
            .window
            .expect("a window");
        assert_eq!((w.offset, w.size), (1 << 20, Some(2 << 20)));
        assert_eq!(w.spelled, (Some("1048576".into()), Some("\"2M\"".into())));
        assert_eq!(
            w.json_name(Some("raw"), std::path::Path::new("d")),
            r#"json:{"offset": 1048576, "driver": "raw", "size": "2M", "file": {"driver": "file", "filename": "d"}}"#
        );
        let probed = ok(r#"json:{"size":512,"file":{"filename":"d"}}"#);
        assert_eq!(
            probed.window.map(|w| (w.offset, w.size)),
            Some((0, Some(512)))
        );
        assert_eq!(ok(r#"json:{"file":{"filename":"d"}}"#).window, None);
    }

    #[test]
    fn a_format_over_a_raw_window_reads_the_window_of_the_file() {
        let j = ok(
            r#"json:{"driver":"vmdk","file":{"driver":"raw","offset":3072,"size":"1M","file":{"driver":"file","filename":"a.ova","locking":"off"}}}"#,
        );
        assert_eq!(j.filename, PathBuf::from("a.ova"));
        assert_eq!(j.driver.as_deref(), Some("vmdk"));
        assert_eq!(j.window, None);
        let w = j.file_window.expect("a window under the format");
        assert_eq!((w.offset, w.size), (3072, Some(1 << 20)));
        let err = |n: &str| parse(n).unwrap().unwrap_err();
        assert!(
            err(r#"json:{"driver":"vmdk","file":{"driver":"raw","file":{"driver":"nbd"}}}"#)
                .contains("'nbd'")
        );
        assert!(
            err(r#"json:{"driver":"vmdk","file":{"driver":"raw","filename":"a"}}"#)
                .contains("filename")
        );
    }

    #[test]
    fn bad_window_values_get_qemus_messages() {
        let err = |n: &str| parse(n).unwrap().unwrap_err();
        assert!(err(r#"json:{"offset":-5,"file":{"filename":"d"}}"#)
            .contains("Value '-5' is out of range for parameter 'offset'"));
        assert!(err(r#"json:{"size":1.5,"file":{"filename":"d"}}"#)
            .contains("Parameter 'size' expects a non-negative number"));
        assert!(err(r#"json:{"offset":"x","file":{"filename":"d"}}"#).contains("'offset'"));
        assert!(err(r#"json:{"offset":[1],"file":{"filename":"d"}}"#).contains("'offset'"));
        assert_eq!(
            err(r#"json:{"driver":"file","filename":"d","offset":512}"#),
            "Block protocol 'file' doesn't support the option 'offset'"
        );
    }
}
