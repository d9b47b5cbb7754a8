//! Presenting creation options as qemu-img does: the `-o help` listing and the
//! `Formatting 'F', fmt=... ` line.
//!
//! The option names and help texts come from the library (`CREATE_OPTIONS`). What the library
//! does not say yet is each option's value type, default and the position qemu prints it in
//! (the order of qemu's option lists, format options then the file protocol's); that is
//! [`PRINT_ORDER`] here, until the library carries it.

use imgblock::{CreateOptions, Format};

use crate::failure::{CliResult, Failure};

/// A value type as qemu's help names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Size,
    Num,
    Bool,
}

impl Kind {
    fn help_name(self) -> &'static str {
        match self {
            Kind::Str => "str",
            Kind::Size => "size",
            Kind::Num => "num",
            Kind::Bool => "bool (on/off)",
        }
    }
}

/// One option in the order qemu prints the `Formatting` line, with its default value there.
struct PrintSpec {
    name: &'static str,
    kind: Kind,
    default: Option<&'static str>,
}

const fn opt(name: &'static str, kind: Kind, default: Option<&'static str>) -> PrintSpec {
    PrintSpec {
        name,
        kind,
        default,
    }
}

/// Adds one `-o` argument to `opts`, refusing what qemu's `is_valid_option_list` refuses: an
/// empty list, a leading comma, or an unescaped trailing one.
///
/// # Errors
/// A malformed list or option.
pub fn add_option_list(opts: &mut CreateOptions, list: &str) -> CliResult<()> {
    check_option_list(list)?;
    opts.parse_opts(list)?;
    Ok(())
}

/// Refuses what qemu's `is_valid_option_list` refuses: an empty list, a leading comma, or an
/// unescaped trailing one.
///
/// # Errors
/// `Invalid option list: LIST`.
pub fn check_option_list(list: &str) -> CliResult<()> {
    let trailing = list.len() - list.trim_end_matches(',').len();
    if list.is_empty() || list.starts_with(',') || trailing % 2 == 1 {
        return Err(Failure::new(format!("Invalid option list: {list}")));
    }
    Ok(())
}

/// File-protocol options qemu appends after every format's own.
const PROTOCOL: [PrintSpec; 3] = [
    opt("nocow", Kind::Bool, None),
    opt("preallocation", Kind::Str, None),
    opt("extent_size_hint", Kind::Size, None),
];

/// raw's list: `size`, then the protocol's.
const RAW: [PrintSpec; 1] = [opt("size", Kind::Size, None)];

/// qcow2's list in qemu 10's order (encryption first, then `QCOW_COMMON_OPTIONS`).
const QCOW2: [PrintSpec; 21] = [
    opt("encryption", Kind::Bool, None),
    opt("encrypt.format", Kind::Str, None),
    opt("encrypt.key-secret", Kind::Str, None),
    opt("encrypt.cipher-alg", Kind::Str, None),
    opt("encrypt.cipher-mode", Kind::Str, None),
    opt("encrypt.ivgen-alg", Kind::Str, None),
    opt("encrypt.ivgen-hash-alg", Kind::Str, None),
    opt("encrypt.hash-alg", Kind::Str, None),
    opt("encrypt.iter-time", Kind::Num, None),
    opt("cluster_size", Kind::Size, Some("65536")),
    opt("extended_l2", Kind::Bool, Some("off")),
    opt("preallocation", Kind::Str, None),
    opt("compression_type", Kind::Str, Some("zlib")),
    opt("size", Kind::Size, None),
    opt("compat", Kind::Str, None),
    opt("backing_file", Kind::Str, None),
    opt("backing_fmt", Kind::Str, None),
    opt("data_file", Kind::Str, None),
    opt("data_file_raw", Kind::Bool, None),
    opt("lazy_refcounts", Kind::Bool, Some("off")),
    opt("refcount_bits", Kind::Num, Some("16")),
];

/// vmdk's list in qemu 10's order (`vmdk_create_opts`).
const VMDK: [PrintSpec; 9] = [
    opt("size", Kind::Size, None),
    opt("adapter_type", Kind::Str, None),
    opt("backing_file", Kind::Str, None),
    opt("backing_fmt", Kind::Str, None),
    opt("compat6", Kind::Bool, Some("off")),
    opt("hwversion", Kind::Str, Some("undefined")),
    opt("toolsversion", Kind::Str, None),
    opt("subformat", Kind::Str, None),
    opt("zeroed_grain", Kind::Bool, None),
];

/// vdi's list in qemu 10's order (`vdi_create_opts`).
const VDI: [PrintSpec; 2] = [
    opt("size", Kind::Size, None),
    opt("static", Kind::Bool, Some("off")),
];

/// luks's list in qemu 10's order (`block_crypto_create_opts_luks`).
const LUKS: [PrintSpec; 9] = [
    opt("size", Kind::Size, None),
    opt("key-secret", Kind::Str, None),
    opt("cipher-alg", Kind::Str, None),
    opt("cipher-mode", Kind::Str, None),
    opt("ivgen-alg", Kind::Str, None),
    opt("ivgen-hash-alg", Kind::Str, None),
    opt("hash-alg", Kind::Str, None),
    opt("iter-time", Kind::Num, None),
    opt("detached-header", Kind::Bool, None),
];

/// The format's own options, in qemu's order (without the protocol's).
fn own_specs(format: Format) -> &'static [PrintSpec] {
    match format {
        Format::Qcow2 => &QCOW2,
        Format::Vmdk => &VMDK,
        Format::Vdi => &VDI,
        Format::Luks => &LUKS,
        _ => &RAW,
    }
}

fn print_order(format: Format) -> impl Iterator<Item = &'static PrintSpec> {
    let own = own_specs(format);
    own.iter().chain(
        PROTOCOL
            .iter()
            .filter(move |p| !own.iter().any(|o| o.name == p.name)),
    )
}

fn kind_of(name: &str) -> Kind {
    QCOW2
        .iter()
        .chain(RAW.iter())
        .chain(VMDK.iter())
        .chain(VDI.iter())
        .chain(LUKS.iter())
        .chain(PROTOCOL.iter())
        .find(|s| s.name == name)
        .map_or(Kind::Str, |s| s.kind)
}

/// Checks a value against its option's type as qemu's option parser does (booleans, sizes,
/// numbers), giving qemu's message when it does not fit.
///
/// # Errors
/// The message, e.g. `Parameter 'nocow' expects 'on' or 'off'`.
pub fn check_value(name: &str, value: &str) -> Result<(), String> {
    let r = match kind_of(name) {
        Kind::Bool => imgblock::options::parse_bool(name, value).map(|_| ()),
        Kind::Size => imgblock::options::parse_size_opt(name, value).map(|_| ()),
        Kind::Num => {
            let n = match value
                .strip_prefix("0x")
                .or_else(|| value.strip_prefix("0X"))
            {
                Some(hex) => u64::from_str_radix(hex, 16).is_ok(),
                None => value.parse::<u64>().is_ok(),
            };
            return if n {
                Ok(())
            } else {
                Err(format!("Parameter '{name}' expects a number"))
            };
        }
        Kind::Str => Ok(()),
    };
    r.map_err(|e| match e {
        imgblock::Error::InvalidOption(m) => m,
        other => other.to_string(),
    })
}

/// The library's option list for a format.
pub fn library_options(format: Format) -> &'static [(&'static str, &'static str)] {
    match format {
        Format::Qcow2 => imgblock::qcow2::CREATE_OPTIONS,
        Format::Vmdk => imgblock::vmdk::CREATE_OPTIONS,
        Format::Vdi => imgblock::vdi::CREATE_OPTIONS,
        Format::Luks => imgblock::luks::CREATE_OPTIONS,
        _ => imgblock::raw::CREATE_OPTIONS,
    }
}

/// The help text of a protocol option, from whichever library table lists it.
fn protocol_help(name: &str) -> Option<&'static str> {
    [Format::Raw, Format::Qcow2, Format::Vmdk, Format::Vdi]
        .iter()
        .flat_map(|f| library_options(*f).iter())
        .find(|(n, _)| *n == name)
        .map(|(_, h)| *h)
}

/// Whether the user asked for `-o help` (or `-o ?`).
pub fn wants_help(opts: &[(String, String)]) -> bool {
    opts.iter().any(|(k, _)| k == "help" || k == "?")
}

/// The `-o help` text, sorted by name as qemu sorts it. Without a file name qemu lists the
/// format's own options and says the protocol may have more; with one it adds the protocol's.
pub fn help_text(format: Format, with_file: bool) -> String {
    let own = own_specs(format);
    let mut list: Vec<(&str, &str)> = library_options(format)
        .iter()
        .copied()
        .filter(|(n, _)| with_file || own.iter().any(|s| s.name == *n))
        .collect();
    if with_file {
        for p in &PROTOCOL {
            if !list.iter().any(|(n, _)| *n == p.name) {
                if let Some(h) = protocol_help(p.name) {
                    list.push((p.name, h));
                }
            }
        }
    }
    list.sort_by_key(|(n, _)| *n);
    let mut out = if with_file {
        String::from("Supported options:\n")
    } else {
        format!("Supported {} options:\n", format.name())
    };
    for (name, help) in list {
        let head = format!("  {name}=<{}>", kind_of(name).help_name());
        out.push_str(&format!("{head:<24} - {help}\n"));
    }
    if !with_file {
        out.push_str("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n");
    }
    out
}

/// A value as qemu prints it: sizes and numbers parsed to integers, strings with commas doubled.
fn print_value(kind: Kind, value: &str) -> String {
    match kind {
        Kind::Size => imgblock::options::parse_size(value)
            .map_or_else(|_| value.to_owned(), |n| n.to_string()),
        Kind::Num => value
            .parse::<i64>()
            .map_or_else(|_| value.to_owned(), |n| n.to_string()),
        Kind::Str => value.replace(',', ",,"),
        Kind::Bool => value.to_owned(),
    }
}

/// The value the user set for `name`, looking at the dedicated fields first.
fn given(opts: &CreateOptions, name: &str) -> Option<String> {
    match name {
        "size" => opts.size.map(|s| s.to_string()),
        "backing_file" => opts.backing_file.clone(),
        "backing_fmt" => opts.backing_fmt.clone(),
        _ => opts.get(name).map(str::to_owned),
    }
}

/// `Formatting 'F', fmt=raw size=1048576` (without the newline), as qemu's `bdrv_img_create`
/// prints it: every option that is set or has a default, in qemu's list order.
pub fn formatting_line(path: &str, format: Format, opts: &CreateOptions) -> String {
    let mut line = format!("Formatting '{path}', fmt={}", format.name());
    for spec in print_order(format) {
        if let Some(v) = given(opts, spec.name) {
            line.push_str(&format!(" {}={}", spec.name, print_value(spec.kind, &v)));
        } else if let Some(d) = spec.default {
            line.push_str(&format!(" {}={d}", spec.name));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_option_list_refuses_stray_commas_as_qemu_does() {
        for bad in ["", ",a=1", "a=1,", "a=1,,,"] {
            let mut o = CreateOptions::default();
            assert_eq!(
                add_option_list(&mut o, bad).unwrap_err().message,
                format!("Invalid option list: {bad}"),
                "{bad:?}"
            );
        }
        let mut o = CreateOptions::default();
        add_option_list(&mut o, "backing_file=x,,").unwrap();
        assert_eq!(o.backing_file.as_deref(), Some("x,"));
    }

    #[test]
    fn formatting_line_raw_lists_size_then_protocol_options() {
        let mut o = CreateOptions::new(102_400);
        o.set("preallocation", "full");
        assert_eq!(
            formatting_line("rr.raw", Format::Raw, &o),
            "Formatting 'rr.raw', fmt=raw size=102400 preallocation=full"
        );
    }

    #[test]
    fn formatting_line_qcow2_prints_defaults_in_qemu_order() {
        let mut o = CreateOptions::new(1 << 20);
        o.backing_file = Some("q.qcow2".into());
        o.backing_fmt = Some("qcow2".into());
        assert_eq!(
            formatting_line("o.qcow2", Format::Qcow2, &o),
            "Formatting 'o.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib \
             size=1048576 backing_file=q.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16"
        );
    }

    #[test]
    fn formatting_line_qcow2_user_values_replace_defaults() {
        let mut o = CreateOptions::new(1 << 20);
        o.parse_opts("cluster_size=128k,compat=1.1,refcount_bits=8,extent_size_hint=1M")
            .unwrap();
        assert_eq!(
            formatting_line("a.qcow2", Format::Qcow2, &o),
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=131072 extended_l2=off compression_type=zlib \
             size=1048576 compat=1.1 lazy_refcounts=off refcount_bits=8 extent_size_hint=1048576"
        );
    }

    #[test]
    fn help_text_raw_pads_to_column_24() {
        let h = help_text(Format::Raw, false);
        assert!(h.starts_with("Supported raw options:\n"));
        assert!(h.contains("\n  size=<size>            - Virtual disk size\n"));
        assert!(h.ends_with("Specify the target filename to include those options.\n"));
    }

    #[test]
    fn formatting_line_vmdk_prints_compat6_and_hwversion_defaults() {
        let mut o = CreateOptions::new(1 << 20);
        assert_eq!(
            formatting_line("x.vmdk", Format::Vmdk, &o),
            "Formatting 'x.vmdk', fmt=vmdk size=1048576 compat6=off hwversion=undefined"
        );
        o.parse_opts("subformat=twoGbMaxExtentFlat,preallocation=falloc")
            .unwrap();
        assert_eq!(
            formatting_line("z.vmdk", Format::Vmdk, &o),
            "Formatting 'z.vmdk', fmt=vmdk size=1048576 compat6=off hwversion=undefined \
             subformat=twoGbMaxExtentFlat preallocation=falloc"
        );
    }

    #[test]
    fn formatting_line_vdi_prints_static_default() {
        let o = CreateOptions::new(1 << 20);
        assert_eq!(
            formatting_line("x.vdi", Format::Vdi, &o),
            "Formatting 'x.vdi', fmt=vdi size=1048576 static=off"
        );
    }

    #[test]
    fn help_text_vmdk_without_file_lists_own_options_only() {
        let h = help_text(Format::Vmdk, false);
        assert!(h.starts_with("Supported vmdk options:\n"));
        assert!(h.contains("\n  compat6=<bool (on/off)> - VMDK version 6 image\n"));
        assert!(!h.contains("preallocation"));
        let h = help_text(Format::Vmdk, true);
        assert!(h.starts_with("Supported options:\n"));
        assert!(h.contains("\n  preallocation=<str>    - "));
        assert!(!h.contains("protocol level"));
    }

    #[test]
    fn wants_help_sees_help_and_question_mark() {
        assert!(wants_help(&[("help".into(), String::new())]));
        assert!(!wants_help(&[("size".into(), "1".into())]));
    }
}
