//! Disk encryption as qemu does it, over the RustCrypto crates (no cipher or KDF here is
//! written by hand): LUKS1 headers with key slots and the anti-forensic splitter, the legacy
//! qcow AES scheme, and [`DataCipher`], which encrypts 512-byte sectors by number.
//!
//! ```text
//!  passphrase --PBKDF2(slot salt)--> slot key --decrypt--> key material --AF merge--> master key
//!                                                                                      |
//!                                  PBKDF2(master key, digest salt) == stored digest? <--+
//!  master key --> DataCipher: aes, twofish, serpent (128/192/256), cast5-128
//!                             x ecb/cbc/ctr/xts x plain/plain64/essiv
//! ```
//!
//! Which offset numbers a sector (the host offset for LUKS inside qcow2, the guest offset for
//! legacy AES and the `luks` format) is the format's business; see
//! [`crate::driver::Driver::data_cipher`].
//!
//! Secrets and keys live in [`zeroize::Zeroizing`] buffers and cipher key schedules are zeroed
//! on drop. Legacy AES cannot tell a wrong passphrase from a right one: it decrypts to garbage.

mod af;
pub mod algo;
mod cipher;
mod error;
pub mod luks;
mod secret;

pub use algo::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
pub use cipher::{CipherSpec, DataCipher};
pub use error::Error;
pub use luks::{LuksInfo, LuksSlotInfo};
pub use secret::{parse_secret_object, Secret, Secrets};

/// Encryption works on 512-byte sectors in LUKS1 and in qcow's AES.
pub const SECTOR_SIZE: u64 = 512;
/// [`SECTOR_SIZE`] as a buffer length.
pub const SECTOR_BYTES: usize = 512;

/// Key length of legacy qcow AES (AES-128).
pub const LEGACY_AES_KEY_LEN: usize = 16;

/// Fills `buf` from the operating system's random source.
///
/// # Errors
/// [`Error::Random`] when the source fails.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|e| Error::Random(e.to_string()))
}

/// The cipher of a legacy AES-encrypted qcow/qcow2 image: AES-128-CBC, IV plain64 of the guest
/// sector, the key the passphrase's bytes up to its first NUL, truncated or zero-padded to 16
/// (qemu's crypto/block-qcow.c). Insecure: the key has no KDF and the IV is predictable.
///
/// # Errors
/// Only if the cipher cannot be keyed, which cannot happen for 16 bytes.
pub fn legacy_aes_cipher(passphrase: &[u8]) -> Result<DataCipher, Error> {
    let mut key = zeroize::Zeroizing::new([0u8; LEGACY_AES_KEY_LEN]);
    let end = passphrase
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(passphrase.len());
    let n = end.min(LEGACY_AES_KEY_LEN);
    key[..n].copy_from_slice(&passphrase[..n]);
    DataCipher::new(
        CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: HashAlg::Sha256,
        },
        &key[..],
    )
}

/// How a format encrypts its data, for `info`'s `encrypt` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptionInfo {
    /// Legacy qcow AES (qcow2 crypt_method 1).
    Aes,
    /// LUKS1.
    Luks(LuksInfo),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_key_is_padded_and_truncated() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        legacy_aes_cipher(b"0123456789abcdefXYZ")
            .unwrap()
            .encrypt(0, &mut a)
            .unwrap();
        legacy_aes_cipher(b"0123456789abcdef")
            .unwrap()
            .encrypt(0, &mut b)
            .unwrap();
        assert_eq!(a, b);
        let mut c = vec![0u8; 512];
        legacy_aes_cipher(b"pw\0ignored")
            .unwrap()
            .encrypt(0, &mut c)
            .unwrap();
        let mut d = vec![0u8; 512];
        legacy_aes_cipher(b"pw")
            .unwrap()
            .encrypt(0, &mut d)
            .unwrap();
        assert_eq!(c, d);
    }
}
