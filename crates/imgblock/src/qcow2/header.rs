//! The qcow2 header and its extensions (qcow2.rst, "Header" and "Header extensions").

use super::Error;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Header length qemu writes for version 3 (with the compression type byte, padded).
pub const V3_HEADER_LEN: u32 = 112;
/// Longest backing file name qemu accepts.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Byte offset of the 64-bit incompatible_features field (version 3 headers).
pub const INCOMPATIBLE_OFFSET: u64 = 72;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The compression type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this driver understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit: bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

/// The smallest cluster (2^13 bytes) whose header gets a feature name table. qemu leaves the
/// table (384 bytes) out of smaller header clusters, where it would leave no room for a backing
/// file name, a data file name or the crypto header.
pub const FEATURE_TABLE_MIN_CLUSTER_BITS: u32 = 13;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// crypt_method: no encryption.
pub const CRYPT_NONE: u32 = 0;
/// crypt_method: legacy AES-128-CBC (insecure, deprecated).
pub const CRYPT_AES: u32 = 1;
/// crypt_method: LUKS, its header inside the image (see [`EXT_CRYPTO`]).
pub const CRYPT_LUKS: u32 = 2;

/// Compression types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate, 4 KiB window.
    #[default]
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// The name qemu uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A header extension kept as bytes, so that a rewrite preserves what it does not understand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Payload (without padding).
    pub data: Vec<u8>,
}

/// A validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 when none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible: u64,
    /// Compatible feature bits (v3).
    pub compatible: u64,
    /// Autoclear feature bits (v3).
    pub autoclear: u64,
    /// log2 of the refcount width in bits (v2: always 4).
    pub refcount_order: u32,
    /// Header length (v2: 72).
    pub header_length: u32,
    /// Compression type (v3 with header_length > 104).
    pub compression: CompressionType,
    /// Header extensions in file order.
    pub extensions: Vec<Extension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (128-bit).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// The payload of the first extension of `kind`.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// The backing format from its extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The LUKS header's (offset, length) in the image file, from the crypto extension
    /// (two big-endian u64).
    pub fn crypto_header(&self) -> Option<(u64, u64)> {
        let d = self.extension(EXT_CRYPTO)?;
        if d.len() != 16 {
            return None;
        }
        Some((be64(d, 0), be64(d, 8)))
    }

    /// Sets the crypto extension, placing it before the feature table as qemu does.
    pub fn set_crypto_header(&mut self, offset: u64, length: u64) {
        let mut d = offset.to_be_bytes().to_vec();
        d.extend_from_slice(&length.to_be_bytes());
        self.set_extension(EXT_CRYPTO, None);
        let at = self
            .extensions
            .iter()
            .position(|e| e.kind == EXT_FEATURE_TABLE)
            .unwrap_or(self.extensions.len());
        self.extensions.insert(
            at,
            Extension {
                kind: EXT_CRYPTO,
                data: d,
            },
        );
    }

    /// The external data file name from its extension.
    pub fn data_file(&self) -> Option<String> {
        self.extension(EXT_DATA_FILE)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// Names the given incompatible bits from the feature name table, or by number.
    fn name_incompatible(&self, bits: u64) -> String {
        let table = self.extension(EXT_FEATURE_TABLE).unwrap_or(&[]);
        let mut names = Vec::new();
        for bit in 0..64u8 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            let name = table
                .chunks_exact(48)
                .find(|e| e[0] == 0 && e[1] == bit)
                .map(|e| {
                    let n = &e[2..];
                    let end = n.iter().position(|&c| c == 0).unwrap_or(n.len());
                    String::from_utf8_lossy(&n[..end]).into_owned()
                });
            names.push(name.unwrap_or_else(|| format!("unknown incompatible feature bit {bit}")));
        }
        names.join(", ")
    }

    /// Parses and validates a header from the start of the file (`buf` holds at least the first
    /// cluster, or the whole file if shorter). `file_len` bounds the backing name.
    ///
    /// # Errors
    /// The specific [`Error`] for the first field found wrong.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, Error> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::Truncated(file_len));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::BadClusterBits(cluster_bits));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: CompressionType::Zlib,
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::Truncated(file_len));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN || u64::from(h.header_length) > cs {
                return Err(Error::BadHeaderLength(h.header_length));
            }
            if h.header_length > 104 {
                let byte = *buf.get(104).ok_or(Error::Truncated(file_len))?;
                h.compression = match byte {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    other => return Err(Error::BadCompressionType(other)),
                };
            }
        }
        if h.refcount_order > 6 || (version == 2 && h.refcount_order != 4) {
            return Err(Error::BadRefcountOrder(h.refcount_order));
        }
        h.parse_extensions(buf)?;
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::UnknownIncompatible(h.name_incompatible(unknown)));
        }
        if h.incompatible & INCOMPAT_COMPRESSION == 0 && h.compression != CompressionType::Zlib {
            return Err(Error::BadCompressionType(1));
        }
        if h.crypt_method > CRYPT_LUKS {
            return Err(Error::Encrypted(h.crypt_method));
        }
        match (h.crypt_method, h.extension(EXT_CRYPTO)) {
            (CRYPT_LUKS, None) => return Err(Error::MissingCryptoHeader),
            (CRYPT_LUKS, Some(_)) if h.crypto_header().is_none() => {
                return Err(Error::BadCryptoHeader {
                    offset: 0,
                    length: 0,
                })
            }
            (m, Some(_)) if m != CRYPT_LUKS => return Err(Error::UnexpectedCryptoHeader),
            _ => {}
        }
        if h.size > i64::MAX as u64 {
            return Err(Error::SizeTooLarge(h.size));
        }
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset;
            let len = h.backing_file_size;
            let bad = Error::BadBackingName { offset: off, len };
            if len > MAX_BACKING_NAME || off.checked_add(u64::from(len)).is_none_or(|e| e > cs) {
                return Err(bad);
            }
            // off + len <= cs, which is at most 2 MiB: fits usize.
            let (o, l) = (
                usize::try_from(off).map_err(|_| Error::Truncated(file_len))?,
                len as usize,
            );
            let bytes = buf.get(o..o + l).ok_or(Error::Truncated(file_len))?;
            let name = std::str::from_utf8(bytes).map_err(|_| bad)?;
            if !name.is_empty() {
                h.backing_file = Some(name.to_owned());
            }
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), Error> {
        let cs = usize::try_from(self.cluster_size()).unwrap_or(usize::MAX);
        let limit = buf.len().min(cs);
        let mut off = self.header_length as usize;
        // Extensions end at the backing name when it follows them, else at the cluster end.
        loop {
            if off + 8 > limit {
                // Old images may end the header without an end marker when nothing follows.
                if self.version == 2 {
                    return Ok(());
                }
                return Err(Error::BadExtension(off as u64));
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let start = off + 8;
            let end = start
                .checked_add(len)
                .filter(|&e| e <= limit)
                .ok_or(Error::BadExtension(off as u64))?;
            self.extensions.push(Extension {
                kind,
                data: buf[start..end].to_vec(),
            });
            off = start + len.div_ceil(8) * 8;
        }
    }

    /// Serialises the header, its extensions and the backing name into one header cluster,
    /// updating `header_length`, `backing_file_offset` and `backing_file_size`.
    ///
    /// # Errors
    /// When everything does not fit in the first cluster.
    pub fn serialize(&mut self) -> Result<Vec<u8>, Error> {
        let cs = usize::try_from(self.cluster_size()).unwrap_or(usize::MAX);
        let mut b = Vec::with_capacity(cs.min(4096));
        if self.version == 2 {
            self.header_length = V2_HEADER_LEN;
        } else if self.header_length < V3_HEADER_LEN {
            self.header_length = V3_HEADER_LEN;
        }
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            let ct: u8 = match self.compression {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
            b.push(ct);
            b.resize(self.header_length as usize, 0);
        }
        let small = self.cluster_bits < FEATURE_TABLE_MIN_CLUSTER_BITS;
        for e in self
            .extensions
            .iter()
            .filter(|e| !(small && e.kind == EXT_FEATURE_TABLE))
        {
            b.extend_from_slice(&e.kind.to_be_bytes());
            let len =
                u32::try_from(e.data.len()).map_err(|_| Error::BadExtension(b.len() as u64))?;
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        match &self.backing_file {
            Some(name) => {
                let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
                if len > MAX_BACKING_NAME {
                    return Err(Error::BadBackingName {
                        offset: b.len() as u64,
                        len,
                    });
                }
                self.backing_file_offset = b.len() as u64;
                self.backing_file_size = len;
                b.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        if b.len() > cs {
            return Err(Error::BadExtension(b.len() as u64));
        }
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        Ok(b)
    }

    /// Replaces (or removes, with `None`) the extension of `kind`.
    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        let pos = self.extensions.iter().position(|e| e.kind == kind);
        match (pos, data) {
            (Some(i), Some(d)) => self.extensions[i].data = d,
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(d)) => self.extensions.push(Extension { kind, data: d }),
            (None, None) => {}
        }
    }
}

/// The feature name table qemu writes into new v3 images.
pub fn feature_table() -> Vec<u8> {
    let entries: &[(u8, u8, &str)] = &[
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut v = Vec::with_capacity(entries.len() * 48);
    for &(kind, bit, name) in entries {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression: CompressionType::Zlib,
            extensions: vec![
                Extension {
                    kind: EXT_BACKING_FORMAT,
                    data: b"qcow2".to_vec(),
                },
                Extension {
                    kind: EXT_FEATURE_TABLE,
                    data: feature_table(),
                },
            ],
            backing_file: Some("base.qcow2".into()),
        }
    }

    #[test]
    fn serialize_then_parse_round_trips() {
        let mut h = sample();
        let mut b = h.serialize().unwrap();
        b.resize(65536, 0);
        let p = Header::parse(&b, 65536).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.backing_format().as_deref(), Some("qcow2"));
    }

    fn bytes() -> Vec<u8> {
        let mut b = sample().serialize().unwrap();
        b.resize(65536, 0);
        b
    }

    #[test]
    fn parse_bad_magic_is_bad_magic() {
        let mut b = bytes();
        b[0] = 0;
        assert!(matches!(
            Header::parse(&b, 65536),
            Err(Error::BadMagic(0x0046_49fb))
        ));
    }

    #[test]
    fn parse_version_4_is_unsupported() {
        let mut b = bytes();
        b[7] = 4;
        assert!(matches!(
            Header::parse(&b, 65536),
            Err(Error::UnsupportedVersion(4))
        ));
    }

    #[test]
    fn parse_cluster_bits_22_is_refused() {
        let mut b = bytes();
        b[23] = 22;
        assert!(matches!(
            Header::parse(&b, 65536),
            Err(Error::BadClusterBits(22))
        ));
    }

    #[test]
    fn parse_refcount_order_7_is_refused() {
        let mut b = bytes();
        b[99] = 7;
        assert!(matches!(
            Header::parse(&b, 65536),
            Err(Error::BadRefcountOrder(7))
        ));
    }

    #[test]
    fn parse_unknown_incompatible_bit_is_named() {
        let mut b = bytes();
        b[79] |= 1 << 5;
        match Header::parse(&b, 65536) {
            Err(Error::UnknownIncompatible(s)) => assert!(s.contains("bit 5"), "{s}"),
            other => panic!("{other:?}"),
        }
        // A name from the feature table is used when present.
        let mut h = sample();
        let mut t = feature_table();
        let mut e = [0u8; 48];
        e[1] = 6;
        e[2..9].copy_from_slice(b"shiny x");
        t.extend_from_slice(&e);
        h.set_extension(EXT_FEATURE_TABLE, Some(t));
        let mut b = h.serialize().unwrap();
        b.resize(65536, 0);
        b[79] |= 1 << 6;
        match Header::parse(&b, 65536) {
            Err(Error::UnknownIncompatible(s)) => assert_eq!(s, "shiny x"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_short_file_is_truncated() {
        let b = bytes();
        assert!(matches!(
            Header::parse(&b[..50], 50),
            Err(Error::Truncated(50))
        ));
        assert!(matches!(
            Header::parse(&b[..80], 80),
            Err(Error::Truncated(80))
        ));
    }

    #[test]
    fn parse_header_length_past_cluster_is_refused() {
        let mut b = bytes();
        b[100..104].copy_from_slice(&70000u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 65536),
            Err(Error::BadHeaderLength(70000))
        ));
    }

    #[test]
    fn parse_extension_overrunning_cluster_is_refused() {
        let mut b = bytes();
        let off = V3_HEADER_LEN as usize;
        b[off + 4..off + 8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 65536),
            Err(Error::BadExtension(_))
        ));
    }

    #[test]
    fn parse_unknown_crypt_method_is_refused() {
        let mut b = bytes();
        b[35] = 5;
        assert!(matches!(Header::parse(&b, 65536), Err(Error::Encrypted(5))));
    }

    #[test]
    fn parse_luks_without_crypto_extension_is_refused() {
        let mut b = bytes();
        b[35] = 2;
        assert!(matches!(
            Header::parse(&b, 65536),
            Err(Error::MissingCryptoHeader)
        ));
    }

    #[test]
    fn crypto_extension_round_trips_before_feature_table() {
        let mut h = Header::parse(&bytes(), 65536).unwrap();
        h.crypt_method = CRYPT_LUKS;
        h.set_crypto_header(0x40000, 2_068_480);
        let b = h.serialize().unwrap();
        let back = Header::parse(&b, 65536).unwrap();
        assert_eq!(back.crypto_header(), Some((0x40000, 2_068_480)));
        let kinds: Vec<u32> = back.extensions.iter().map(|e| e.kind).collect();
        let c = kinds.iter().position(|&k| k == EXT_CRYPTO).unwrap();
        if let Some(f) = kinds.iter().position(|&k| k == EXT_FEATURE_TABLE) {
            assert!(c < f);
        }
    }
}
