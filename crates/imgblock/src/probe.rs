//! Format probing by magic, the way qemu-img does it, with raw as the fallback.

use crate::error::IoContext;
use crate::storage::Storage;
use crate::{Format, Result};

/// How many bytes probing looks at.
pub const PROBE_LEN: usize = 2048;

/// Guesses the format of a sector-0 (and a little more) sample, as qemu's drivers' probes do
/// when the file's name is not known (qemu's check of writes to sector 0 of a raw image).
pub fn probe_bytes(buf: &[u8]) -> Format {
    let at = |off: usize, magic: &[u8]| buf.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        let version = buf
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return if version == Some(1) {
            Format::Foreign("qcow")
        } else {
            Format::Qcow2
        };
    }
    if at(0, b"KDMV") || at(0, b"COWD") || is_vmdk_descriptor(buf) {
        return Format::Vmdk;
    }
    if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        return Format::Vdi;
    }
    if at(0, b"LUKS\xba\xbe") {
        return Format::Luks;
    }
    // Formats qemu reads and this block layer does not: refused by name, never read as raw.
    if at(0, b"conectix") {
        return Format::Foreign("vpc");
    }
    if at(0, b"vhdxfile") {
        return Format::Foreign("vhdx");
    }
    if at(0, b"QED\0") {
        return Format::Foreign("qed");
    }
    if (at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt")) && at(16, &2u32.to_le_bytes()) {
        return Format::Foreign("parallels");
    }
    if at(0, b"Bochs Virtual HD Image\0") && at(32, b"Redolog\0") {
        return Format::Foreign("bochs");
    }
    if at(0, CLOOP_MAGIC) {
        return Format::Foreign("cloop");
    }
    Format::Raw
}

/// The start of a cloop image (a shell script that mounts it).
const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// Whether `buf` starts as a VMDK text descriptor does for qemu: comment lines and lines of
/// spaces, then `version=1`, `2` or `3` on a line of its own (LF or CRLF).
fn is_vmdk_descriptor(buf: &[u8]) -> bool {
    let mut p = 0;
    while p < buf.len() {
        match buf[p] {
            b'#' => {
                while p < buf.len() && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < buf.len() && buf[p] == b' ' {
                    p += 1;
                }
                if buf.get(p) == Some(&b'\r') {
                    p += 1;
                }
                if buf.get(p) != Some(&b'\n') {
                    return false;
                }
                p += 1;
            }
            _ => {
                let line = &buf[p..];
                return [b'1', b'2', b'3'].iter().any(|&v| {
                    let lf = [b"version=".as_slice(), &[v, b'\n']].concat();
                    let crlf = [b"version=".as_slice(), &[v, b'\r', b'\n']].concat();
                    line.starts_with(&lf) || line.starts_with(&crlf)
                });
            }
        }
    }
    false
}

/// Guesses the format of a file. As in qemu, a file named `*.dmg` that no magic claims is taken
/// for an Apple disk image.
///
/// # Errors
/// When the file cannot be read.
pub fn probe(s: &dyn Storage) -> Result<Format> {
    let mut buf = vec![0u8; PROBE_LEN];
    let len = s.size().ctx(s.path())?;
    let n = usize::try_from(len).unwrap_or(PROBE_LEN).min(PROBE_LEN);
    s.read_at(&mut buf[..n], 0).ctx(s.path())?;
    let f = probe_bytes(&buf[..n]);
    let dmg = s.path().extension().is_some_and(|e| e == "dmg");
    Ok(if f == Format::Raw && dmg {
        Format::Foreign("dmg")
    } else {
        f
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_qcow2_magic_gives_qcow2() {
        let mut b = vec![0u8; 512];
        b[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        assert_eq!(probe_bytes(&b), Format::Qcow2);
    }

    #[test]
    fn probe_zeroes_gives_raw() {
        assert_eq!(probe_bytes(&[0u8; 512]), Format::Raw);
    }

    #[test]
    fn probe_vdi_signature_gives_vdi() {
        let mut b = vec![0u8; 512];
        b[0x40..0x44].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        assert_eq!(probe_bytes(&b), Format::Vdi);
    }

    #[test]
    fn probe_foreign_magics_name_their_format() {
        let cases: [(&[u8], usize, &str); 7] = [
            (b"QFI\xfb\0\0\0\x01", 0, "qcow"),
            (b"conectix", 0, "vpc"),
            (b"vhdxfile", 0, "vhdx"),
            (b"QED\0", 0, "qed"),
            (b"WithoutFreeSpace\x02\0\0\0", 0, "parallels"),
            (b"Bochs Virtual HD Image\0", 0, "bochs"),
            (CLOOP_MAGIC, 0, "cloop"),
        ];
        for (magic, off, name) in cases {
            let mut b = vec![0u8; 512];
            b[off..off + magic.len()].copy_from_slice(magic);
            if name == "bochs" {
                b[32..40].copy_from_slice(b"Redolog\0");
            }
            assert_eq!(probe_bytes(&b), Format::Foreign(name), "{name}");
        }
        // parallels needs its version, bochs its type.
        let mut b = vec![0u8; 512];
        b[..16].copy_from_slice(b"WithoutFreeSpace");
        assert_eq!(probe_bytes(&b), Format::Raw);
        b[..23].copy_from_slice(b"Bochs Virtual HD Image\0");
        assert_eq!(probe_bytes(&b), Format::Raw);
    }

    #[test]
    fn probe_vmdk_descriptor_as_qemu_does() {
        for d in [
            &b"# Disk DescriptorFile\nversion=1\n"[..],
            b"# Disk DescriptorFile\r\nversion=1\r\n",
            b"# another comment\n#\n   \nversion=3\nCID=1\n",
            b"version=2\n",
            b"  \r\nversion=1\n",
        ] {
            assert_eq!(
                probe_bytes(d),
                Format::Vmdk,
                "{:?}",
                String::from_utf8_lossy(d)
            );
        }
        for d in [
            &b"# Disk DescriptorFile\n\nversion=1\n"[..],
            b"# Disk DescriptorFile\nversion=4\n",
            b"# Disk DescriptorFile\nversion=1",
            b" x\nversion=1\n",
            b"# Disk DescriptorFile",
            b"",
        ] {
            assert_eq!(
                probe_bytes(d),
                Format::Raw,
                "{:?}",
                String::from_utf8_lossy(d)
            );
        }
    }
}
