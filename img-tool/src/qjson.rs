//! qemu's JSON, byte for byte: its pretty printer and its dictionary order.
//!
//! qemu-img builds its JSON output as a `QDict`, a hash table of 512 buckets, and prints it in
//! bucket order; entries that share a bucket come out newest first. So the order users' scripts
//! see is a hash order, not the QAPI field order. Values here are built in QAPI field order
//! (serde_json with `preserve_order`) and [`qdict_order`] reproduces qemu's order from that.
//! The human `info` output walks the same dictionaries, so it shares the order.

use serde_json::{Map, Value};

/// Buckets in a qemu `QDict` (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// qemu's `tdb_hash` of a dictionary key, reduced to its bucket.
fn qdict_bucket(key: &str) -> u32 {
    let len = u32::try_from(key.len()).unwrap_or(u32::MAX);
    let mut value = 0x238F_13AF_u32.wrapping_mul(len);
    for (i, b) in key.bytes().enumerate() {
        let shift = u32::try_from(i * 5 % 24).unwrap_or(0);
        value = value.wrapping_add(u32::from(b) << shift);
    }
    1_103_515_243_u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// The entries of `map` (inserted in QAPI field order) in the order qemu prints them.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<(usize, (&String, &Value))> = map.iter().enumerate().collect();
    v.sort_by_key(|(i, (k, _))| (qdict_bucket(k), std::cmp::Reverse(*i)));
    v.into_iter().map(|(_, e)| e).collect()
}

/// Pretty-prints `v` as qemu's `qobject_to_json_pretty` does (no trailing newline).
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0);
    out
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, v: &Value, level: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                indent(out, level + 1);
                write_value(out, e, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, e)) in qdict_order(m).into_iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                indent(out, level + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, e, level + 1);
            }
            out.push('\n');
            indent(out, level);
            out.push('}');
        }
    }
}

/// A JSON string with qemu's escapes: control and non-ASCII characters as `\uXXXX`.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

/// Dumps a dictionary the way qemu's human output does (`dump_qdict`): `key: value` lines,
/// dashes in keys shown as spaces, nested values indented by four more.
pub fn dump_human(out: &mut String, map: &Map<String, Value>, level: usize) {
    for (k, v) in qdict_order(map) {
        let key = k.replace('-', " ");
        let composite = matches!(v, Value::Object(_) | Value::Array(_));
        out.push_str(&format!(
            "{:level$}{key}:{}",
            "",
            if composite { '\n' } else { ' ' }
        ));
        dump_human_value(out, v, level + 4);
    }
}

fn dump_human_value(out: &mut String, v: &Value, level: usize) {
    match v {
        Value::Object(m) => dump_human(out, m, level),
        Value::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                let composite = matches!(e, Value::Object(_) | Value::Array(_));
                out.push_str(&format!(
                    "{:level$}[{i}]:{}",
                    "",
                    if composite { '\n' } else { ' ' }
                ));
                dump_human_value(out, e, level + 4);
            }
        }
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Null => out.push_str("null\n"),
        Value::Bool(b) => out.push_str(if *b { "true\n" } else { "false\n" }),
        Value::Number(n) => {
            out.push_str(&n.to_string());
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qdict_order_matches_qemu_info_keys() {
        // Inserted in QAPI field order; printed in the order qemu-img 10 prints them.
        let v = json!({
            "filename": "o.qcow2", "format": "qcow2", "dirty-flag": false, "actual-size": 1,
            "virtual-size": 2, "cluster-size": 3, "backing-filename": "b", "full-backing-filename": "b",
            "backing-filename-format": "raw", "format-specific": {}, "children": []
        });
        let keys: Vec<&str> = qdict_order(v.as_object().unwrap())
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "children",
                "backing-filename-format",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "full-backing-filename",
                "backing-filename",
                "dirty-flag"
            ]
        );
    }

    #[test]
    fn to_string_empty_containers_span_two_lines() {
        let v = json!({"type": "file", "data": {}, "children": []});
        assert_eq!(
            to_string(&v),
            "{\n    \"children\": [\n    ],\n    \"type\": \"file\",\n    \"data\": {\n    }\n}"
        );
    }

    #[test]
    fn to_string_escapes_non_ascii_as_uppercase_utf16() {
        assert_eq!(
            to_string(&json!("a\"é😀")),
            "\"a\\\"\\u00E9\\uD83D\\uDE00\""
        );
    }

    #[test]
    fn dump_human_replaces_dashes_and_nests() {
        let v = json!({"compat": "1.1", "lazy-refcounts": false, "refcount-bits": 16});
        let mut s = String::new();
        dump_human(&mut s, v.as_object().unwrap(), 4);
        assert_eq!(
            s,
            "    compat: 1.1\n    lazy refcounts: false\n    refcount bits: 16\n"
        );
    }
}
