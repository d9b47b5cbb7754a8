//! Format probing by magic, the way qemu-img does it, with raw as the fallback.

use crate::error::IoContext;
use crate::storage::Storage;
use crate::{Format, Result};

/// How many bytes probing looks at.
pub const PROBE_LEN: usize = 2048;

/// Guesses the format of a sector-0 (and a little more) sample.
pub fn probe_bytes(buf: &[u8]) -> Format {
    let at = |off: usize, magic: &[u8]| buf.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        let version = buf
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return if version == Some(1) {
            Format::Qcow
        } else {
            Format::Qcow2
        };
    }
    if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") {
        return Format::Vmdk;
    }
    if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        return Format::Vdi;
    }
    if at(0, b"LUKS\xba\xbe") {
        return Format::Luks;
    }
    Format::Raw
}

/// Guesses the format of a file.
///
/// # Errors
/// When the file cannot be read.
pub fn probe(s: &dyn Storage) -> Result<Format> {
    let mut buf = vec![0u8; PROBE_LEN];
    s.read_at(&mut buf, 0).ctx(s.path())?;
    Ok(probe_bytes(&buf))
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
}
