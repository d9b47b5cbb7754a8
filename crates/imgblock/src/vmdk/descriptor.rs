//! The text descriptor (Virtual Disk Format 5.0, "The Descriptor File"): header keys, extent
//! lines and the disk database. Accepts what VMware, VirtualBox and ovftool write: comments,
//! blank lines, CRLF, quoted or bare values, spaces around `=`, any `ddb.*` keys, and text in
//! the legacy code page Windows hosts write (`encoding="windows-1252"`, Shift_JIS, ...), which
//! is read byte for byte so that the file names it holds still name their files.

use super::{Error, MAX_DESCRIPTOR_BYTES, MAX_EXTENTS};

/// CID value meaning "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// Extent access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-write.
    Rw,
    /// Read-only.
    RdOnly,
    /// No access (data reads as zeroes).
    NoAccess,
}

/// Extent types from the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Plain data at an offset in a file.
    Flat,
    /// A hosted sparse extent (KDMV header).
    Sparse,
    /// Reads as zeroes, no file.
    Zero,
    /// ESX flat extent.
    Vmfs,
    /// ESX sparse extent (COWD header).
    VmfsSparse,
    /// ESXi space-efficient sparse extent (seSparse snapshots; read only).
    SeSparse,
    /// ESX raw device map (read like flat).
    VmfsRdm,
    /// ESX raw device (read like flat).
    VmfsRaw,
}

impl ExtentType {
    /// The descriptor's spelling.
    pub fn name(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
        }
    }
    fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            other => return Err(Error::UnsupportedExtentType(other.to_owned())),
        })
    }
}

/// One extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Type.
    pub kind: ExtentType,
    /// File name (none for ZERO).
    pub filename: Option<String>,
    /// Start sector in the file (flat extents).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `version=`.
    pub version: u32,
    /// Content ID.
    pub cid: u32,
    /// Parent content ID ([`NO_PARENT_CID`] when none).
    pub parent_cid: u32,
    /// `createType=`.
    pub create_type: String,
    /// `parentFileNameHint=`.
    pub parent_hint: Option<String>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` keys in order, values unquoted.
    pub ddb: Vec<(String, String)>,
    /// The text was not UTF-8 and was read as Latin-1, one char per byte: file names turn back
    /// into their bytes with [`Descriptor::file_name`].
    pub latin1: bool,
}

/// A value: the text between its quotes when it is quoted (as qemu takes it, so that a
/// `# comment` after the closing quote is not part of it), else the trimmed text.
fn unquote(v: &str) -> &str {
    let v = v.trim();
    match v.strip_prefix('"') {
        Some(s) => s.split_once('"').map_or(s, |(inner, _)| inner),
        None => v,
    }
}

/// A CID: the hex digits at the start of the value, as qemu reads it (`sscanf("%x")`), so that
/// `CID=fffffffe # comment` reads.
fn parse_hex(key: &'static str, v: &str) -> Result<u32, Error> {
    let t = unquote(v);
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let end = t.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(t.len());
    u32::from_str_radix(&t[..end], 16).map_err(|_| Error::BadValue {
        key,
        value: v.to_owned(),
    })
}

/// The text of descriptor bytes: UTF-8 when they are, else Latin-1 (every byte one char), and
/// which it was.
fn decode(bytes: &[u8]) -> (std::borrow::Cow<'_, str>, bool) {
    match std::str::from_utf8(bytes) {
        Ok(t) => (t.into(), false),
        Err(_) => (bytes.iter().map(|&b| char::from(b)).collect(), true),
    }
}

fn parse_extent(line: &str) -> Result<ExtentLine, Error> {
    let bad = || Error::BadExtentLine(line.to_owned());
    let mut rest = line.trim();
    let mut word = || -> Option<&str> {
        let r = rest.trim_start();
        let end = r.find(char::is_whitespace).unwrap_or(r.len());
        let (w, tail) = r.split_at(end);
        rest = tail;
        (!w.is_empty()).then_some(w)
    };
    let access = match word().ok_or_else(bad)? {
        "RW" => Access::Rw,
        "RDONLY" => Access::RdOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Err(bad()),
    };
    let sectors: u64 = word().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    let kind = ExtentType::parse(word().ok_or_else(bad)?)?;
    let r = rest.trim_start();
    let (filename, tail) = if let Some(q) = r.strip_prefix('"') {
        let end = q.find('"').ok_or_else(bad)?;
        (Some(q[..end].to_owned()), &q[end + 1..])
    } else if r.is_empty() {
        (None, "")
    } else {
        // VirtualBox sometimes writes names unquoted.
        let end = r.find(char::is_whitespace).unwrap_or(r.len());
        (Some(r[..end].to_owned()), &r[end..])
    };
    let tail = tail.trim();
    let offset = if tail.is_empty() {
        0
    } else {
        tail.split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(bad)?
    };
    if filename.is_none() && kind != ExtentType::Zero {
        return Err(bad());
    }
    if filename
        .as_deref()
        .is_some_and(|f| f.is_empty() || f.contains('\0'))
    {
        return Err(bad());
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        filename,
        offset,
    })
}

impl Descriptor {
    /// Parses the text of a descriptor file (up to the first NUL): its extent lines say where
    /// the data is, so each must parse.
    ///
    /// # Errors
    /// [`Error::DescriptorTooLarge`], [`Error::MissingKey`], [`Error::BadValue`],
    /// [`Error::BadExtentLine`], [`Error::UnsupportedExtentType`], [`Error::TooManyExtents`].
    pub fn parse(bytes: &[u8]) -> Result<Descriptor, Error> {
        Self::parse_with(bytes, false)
    }

    /// Parses the descriptor embedded in a sparse file, whose header says where the data is:
    /// as in qemu, only the CIDs and the parent hint matter, so extent lines that do not parse
    /// are left out and a missing `createType` reads as `monolithicSparse`.
    ///
    /// # Errors
    /// [`Error::DescriptorTooLarge`], [`Error::BadValue`] for a CID, [`Error::MissingKey`] for
    /// a missing `CID`.
    pub fn parse_embedded(bytes: &[u8]) -> Result<Descriptor, Error> {
        Self::parse_with(bytes, true)
    }

    /// The descriptor `bytes` (up to a NUL) with the value of its `CID` line replaced by `cid`
    /// in eight hex digits, everything else kept byte for byte; `None` without a `CID` line.
    pub fn with_cid(bytes: &[u8], cid: u32) -> Option<Vec<u8>> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = &bytes[..end];
        let mut at = 0;
        for line in text.split_inclusive(|&b| b == b'\n') {
            let start = at;
            at += line.len();
            let Some(eq) = line.iter().position(|&b| b == b'=') else {
                continue;
            };
            if line[..eq].trim_ascii() != b"CID" {
                continue;
            }
            let mut v = eq + 1;
            while line
                .get(v)
                .is_some_and(|b| matches!(b, b' ' | b'\t' | b'"'))
            {
                v += 1;
            }
            let mut e = v;
            while line.get(e).is_some_and(u8::is_ascii_hexdigit) {
                e += 1;
            }
            let mut out = text[..start + v].to_vec();
            out.extend_from_slice(format!("{cid:08x}").as_bytes());
            out.extend_from_slice(&text[start + e..]);
            return Some(out);
        }
        None
    }

    /// A file name from this descriptor as the bytes it was written with.
    pub fn file_name(&self, name: &str) -> std::path::PathBuf {
        if !self.latin1 {
            return name.into();
        }
        // Every char came from one byte (decode), so none is above U+00FF.
        let bytes: Vec<u8> = name
            .chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
            .collect();
        let name: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(bytes);
        name.into()
    }

    fn parse_with(bytes: &[u8], embedded: bool) -> Result<Descriptor, Error> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        if end as u64 > MAX_DESCRIPTOR_BYTES {
            return Err(Error::DescriptorTooLarge(end as u64));
        }
        let (text, latin1) = decode(&bytes[..end]);
        let mut d = Descriptor {
            version: 1,
            cid: 0,
            parent_cid: NO_PARENT_CID,
            create_type: String::new(),
            parent_hint: None,
            extents: Vec::new(),
            ddb: Vec::new(),
            latin1,
        };
        let mut have_type = false;
        let mut have_cid = false;
        for raw in text.split('\n') {
            let line = raw.trim_end_matches('\r').trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") && !line.starts_with("RW=") {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(Error::TooManyExtents(d.extents.len() + 1));
                }
                match parse_extent(line) {
                    Ok(e) => d.extents.push(e),
                    Err(_) if embedded => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                // Unknown free-form lines are ignored, as VMware does.
                continue;
            };
            let k = k.trim();
            match k {
                // Informational only (qemu does not read it): `version=1.0` is version 1.
                "version" => {
                    let t = unquote(v);
                    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                    d.version = t[..digits].parse().unwrap_or(1);
                }
                "CID" => {
                    d.cid = parse_hex("CID", v)?;
                    have_cid = true;
                }
                "parentCID" => d.parent_cid = parse_hex("parentCID", v)?,
                "createType" => {
                    d.create_type = unquote(v).to_owned();
                    have_type = true;
                }
                "parentFileNameHint" => {
                    let h = unquote(v);
                    if !h.is_empty() {
                        d.parent_hint = Some(h.to_owned());
                    }
                }
                _ if k.starts_with("ddb.") => d.ddb.push((k.to_owned(), unquote(v).to_owned())),
                _ => {}
            }
        }
        if !have_type {
            if !embedded {
                return Err(Error::MissingKey("createType"));
            }
            d.create_type = "monolithicSparse".into();
        }
        if !have_cid {
            return Err(Error::MissingKey("CID"));
        }
        Ok(d)
    }

    /// A `ddb.*` value.
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The text qemu-img writes for this descriptor.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        s.push_str("# Disk DescriptorFile\n");
        s.push_str(&format!("version={}\n", self.version));
        s.push_str(&format!("CID={:x}\n", self.cid));
        s.push_str(&format!("parentCID={:x}\n", self.parent_cid));
        s.push_str(&format!("createType=\"{}\"\n", self.create_type));
        // qemu (and VMware) put the extents straight after a parent hint, after a blank line
        // otherwise.
        match &self.parent_hint {
            Some(p) => s.push_str(&format!("parentFileNameHint=\"{p}\"\n")),
            None => s.push('\n'),
        }
        s.push_str("# Extent description\n");
        for e in &self.extents {
            let access = match e.access {
                Access::Rw => "RW",
                Access::RdOnly => "RDONLY",
                Access::NoAccess => "NOACCESS",
            };
            s.push_str(&format!("{access} {} {}", e.sectors, e.kind.name()));
            if let Some(f) = &e.filename {
                s.push_str(&format!(" \"{f}\""));
            }
            if matches!(e.kind, ExtentType::Flat) {
                s.push_str(&format!(" {}", e.offset));
            }
            s.push('\n');
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        for (k, v) in &self.ddb {
            s.push_str(&format!("{k} = \"{v}\"\n"));
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test constants are small
mod tests {
    use super::*;

    #[test]
    fn with_cid_replaces_only_the_cid_value() {
        let t = b"# Disk DescriptorFile\r\nversion=1\r\nCID = 1234\r\nparentCID=ffffffff\r\n\
                  createType=\"monolithicFlat\"\r\nRW 8 FLAT \"f.bin\" 0\r\n\0\0\0";
        let out = Descriptor::with_cid(t, 0xdead_beef).unwrap();
        assert_eq!(
            out,
            b"# Disk DescriptorFile\r\nversion=1\r\nCID = deadbeef\r\nparentCID=ffffffff\r\n\
              createType=\"monolithicFlat\"\r\nRW 8 FLAT \"f.bin\" 0\r\n"
        );
        assert_eq!(Descriptor::parse(&out).unwrap().cid, 0xdead_beef);
        assert!(Descriptor::with_cid(b"parentCID=ffffffff\n", 1).is_none());
    }

    const QEMU: &str = "# Disk DescriptorFile\nversion=1\nCID=3eb3dcfa\nparentCID=ffffffff\n\
createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n\
RW 4194304 SPARSE \"t-s001.vmdk\"\nRW 2097152 SPARSE \"t-s002.vmdk\"\n\n\
# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"10402\"\n\
ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n\
ddb.toolsVersion = \"2147483647\"\n";

    #[test]
    fn descriptor_qemu_text_parses_and_round_trips() {
        let d = Descriptor::parse(QEMU.as_bytes()).unwrap();
        assert_eq!(d.cid, 0x3eb3_dcfa);
        assert_eq!(d.parent_cid, NO_PARENT_CID);
        assert_eq!(d.create_type, "twoGbMaxExtentSparse");
        assert_eq!(d.extents.len(), 2);
        assert_eq!(d.extents[1].sectors, 2_097_152);
        assert_eq!(d.ddb("ddb.adapterType"), Some("ide"));
        assert_eq!(d.to_text(), QEMU);
    }

    #[test]
    fn descriptor_vmware_crlf_comments_and_odd_spacing_parse() {
        let t = "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\n\
parentCID=ffffffff\r\nisNativeSnapshot=\"no\"\r\ncreateType=\"vmfs\"\r\n\r\n\
# Extent description\r\nRW 2048 VMFS \"disk with space-flat.vmdk\"\r\n\
RDONLY 100 FLAT \"x.img\" 7\r\nNOACCESS 10 ZERO\r\n\r\n# The Disk Data Base \r\n#DDB\r\n\r\n\
ddb.adapterType = \"lsilogic\"\r\nddb.uuid = \"60 00 C2 9b\"\r\nddb.longContentID=\"abc\"\r\n";
        let d = Descriptor::parse(t.as_bytes()).unwrap();
        assert_eq!(d.cid, 0xffff_fffe);
        assert_eq!(d.create_type, "vmfs");
        assert_eq!(
            d.extents[0].filename.as_deref(),
            Some("disk with space-flat.vmdk")
        );
        assert_eq!(d.extents[1].access, Access::RdOnly);
        assert_eq!(d.extents[1].offset, 7);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.extents[2].filename, None);
        assert_eq!(d.ddb("ddb.uuid"), Some("60 00 C2 9b"));
        assert_eq!(d.ddb("ddb.longContentID"), Some("abc"));
    }

    #[test]
    fn descriptor_parent_hint_is_read() {
        let t = QEMU.replace(
            "createType=\"twoGbMaxExtentSparse\"\n",
            "createType=\"monolithicSparse\"\nparentFileNameHint=\"base.vmdk\"\n",
        );
        let d = Descriptor::parse(t.as_bytes()).unwrap();
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
    }

    /// qemu-img 10's descriptor of a twoGbMaxExtentSparse overlay: no blank line between the
    /// parent hint and the extents.
    const QEMU_OVERLAY: &str = "# Disk DescriptorFile\nversion=1\nCID=e79c054a\n\
parentCID=afb368db\ncreateType=\"twoGbMaxExtentSparse\"\nparentFileNameHint=\"base.vmdk\"\n\
# Extent description\nRW 8192 SPARSE \"p-s001.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"8\"\nddb.geometry.heads = \"16\"\n\
ddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\nddb.toolsVersion = \"2147483647\"\n";

    #[test]
    fn descriptor_qemu_overlay_text_round_trips() {
        let d = Descriptor::parse(QEMU_OVERLAY.as_bytes()).unwrap();
        assert_eq!(d.parent_cid, 0xafb3_68db);
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
        assert_eq!(d.to_text(), QEMU_OVERLAY);
    }

    #[test]
    fn descriptor_too_large_is_refused() {
        let big = vec![b'#'; MAX_DESCRIPTOR_BYTES as usize + 1];
        assert!(matches!(
            Descriptor::parse(&big),
            Err(Error::DescriptorTooLarge(_))
        ));
    }

    #[test]
    fn descriptor_missing_create_type_is_refused() {
        let t = QEMU.replace("createType=\"twoGbMaxExtentSparse\"\n", "");
        assert!(matches!(
            Descriptor::parse(t.as_bytes()),
            Err(Error::MissingKey("createType"))
        ));
    }

    #[test]
    fn descriptor_bad_cid_is_refused() {
        let t = QEMU.replace("CID=3eb3dcfa", "CID=zz");
        assert!(matches!(
            Descriptor::parse(t.as_bytes()),
            Err(Error::BadValue { key: "CID", .. })
        ));
    }

    #[test]
    fn descriptor_bad_extent_lines_are_refused() {
        for l in [
            "RW x SPARSE \"a\"",
            "RW 10 SPARSE \"unterminated",
            "RW 10 FLAT \"a\" notanumber",
            "RW 10 SPARSE",
        ] {
            let t = QEMU.replace("RW 2097152 SPARSE \"t-s002.vmdk\"", l);
            assert!(
                matches!(
                    Descriptor::parse(t.as_bytes()),
                    Err(Error::BadExtentLine(_))
                ),
                "{l}"
            );
        }
        let t = QEMU.replace("RW 2097152 SPARSE", "RW 2097152 VSANSPARSE");
        assert!(matches!(
            Descriptor::parse(t.as_bytes()),
            Err(Error::UnsupportedExtentType(_))
        ));
    }

    #[test]
    fn embedded_descriptors_leave_out_what_they_need_not_say() {
        let t = QEMU
            .replace("createType=\"twoGbMaxExtentSparse\"\n", "")
            .replace("version=1", "version=1.0")
            .replace("CID=3eb3dcfa", "CID=3eb3dcfa # written by a tool")
            .replace("RW 2097152 SPARSE", "RW 2097152 VSANSPARSE")
            .replace("RW 4194304 SPARSE \"t-s001.vmdk\"", "RW x SPARSE \"a\"");
        let d = Descriptor::parse_embedded(t.as_bytes()).unwrap();
        assert_eq!(d.create_type, "monolithicSparse");
        assert_eq!((d.version, d.cid), (1, 0x3eb3_dcfa));
        assert!(d.extents.is_empty());
        // A descriptor file still needs them: its extent lines say where the data is.
        assert!(Descriptor::parse(t.as_bytes()).is_err());
        // A CID is still needed, and read as qemu reads it.
        let no_cid = QEMU.replace("CID=3eb3dcfa\n", "");
        assert!(matches!(
            Descriptor::parse_embedded(no_cid.as_bytes()),
            Err(Error::MissingKey("CID"))
        ));
    }

    #[test]
    fn descriptors_in_a_legacy_code_page_keep_their_file_name_bytes() {
        let mut t = QEMU
            .replace("\"t-s001.vmdk\"", "\"D\u{e9}mo.vmdk\"")
            .into_bytes();
        // windows-1252's é is one byte, not UTF-8's two.
        let at = t.windows(2).position(|w| w == "\u{e9}".as_bytes()).unwrap();
        t.splice(at..at + 2, [0xe9]);
        let d = Descriptor::parse(&t).unwrap();
        assert!(d.latin1);
        let name = d.extents[0].filename.as_deref().unwrap();
        assert_eq!(name, "D\u{e9}mo.vmdk");
        assert_eq!(
            std::os::unix::ffi::OsStrExt::as_bytes(d.file_name(name).as_os_str()),
            b"D\xe9mo.vmdk"
        );
        let utf8 = Descriptor::parse(QEMU.as_bytes()).unwrap();
        assert!(!utf8.latin1);
        assert_eq!(
            utf8.file_name("t-s001.vmdk"),
            std::path::PathBuf::from("t-s001.vmdk")
        );
    }

    #[test]
    fn descriptor_sesparse_extent_parses_and_round_trips() {
        let t = QEMU
            .replace("twoGbMaxExtentSparse", "seSparse")
            .replace("RW 2097152 SPARSE \"t-s002.vmdk\"\n", "")
            .replace(
                "RW 4194304 SPARSE \"t-s001.vmdk\"",
                "RW 4194304 SESPARSE \"t-sesparse.vmdk\"",
            );
        let d = Descriptor::parse(t.as_bytes()).unwrap();
        assert_eq!(d.create_type, "seSparse");
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].kind, ExtentType::SeSparse);
        assert_eq!(d.extents[0].filename.as_deref(), Some("t-sesparse.vmdk"));
        assert_eq!(d.to_text(), t);
    }
}
