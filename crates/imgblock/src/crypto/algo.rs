//! The algorithms qemu's LUKS and qcow AES use, by the names qemu and the LUKS header give them.

use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

use super::Error;

/// Block ciphers (AES only: qemu's other LUKS ciphers — serpent, twofish — are not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl CipherAlg {
    /// qemu's option name (`aes-256`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The AES variant whose key is `len` bytes long.
    pub fn aes_with_key_len(len: usize) -> Option<CipherAlg> {
        match len {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }

    /// Parses qemu's `cipher-alg` option.
    ///
    /// # Errors
    /// [`Error::UnsupportedCipher`] for anything but the three AES variants.
    pub fn parse(s: &str) -> Result<CipherAlg, Error> {
        match s {
            "aes-128" => Ok(CipherAlg::Aes128),
            "aes-192" => Ok(CipherAlg::Aes192),
            "aes-256" => Ok(CipherAlg::Aes256),
            _ => Err(Error::UnsupportedCipher(s.to_owned())),
        }
    }
}

/// Block cipher modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// Electronic codebook (no IV).
    Ecb,
    /// Cipher block chaining, the IV from the IV generator.
    Cbc,
    /// XEX with ciphertext stealing; the key is two cipher keys, the tweak from the IV generator.
    Xts,
}

impl CipherMode {
    /// qemu's and LUKS's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }

    /// Parses a mode name.
    ///
    /// # Errors
    /// [`Error::UnsupportedMode`] for ctr and unknown names.
    pub fn parse(s: &str) -> Result<CipherMode, Error> {
        match s {
            "ecb" => Ok(CipherMode::Ecb),
            "cbc" => Ok(CipherMode::Cbc),
            "xts" => Ok(CipherMode::Xts),
            _ => Err(Error::UnsupportedMode(s.to_owned())),
        }
    }

    /// How many cipher keys the mode's key holds.
    pub fn keys(self) -> usize {
        if self == CipherMode::Xts {
            2
        } else {
            1
        }
    }
}

/// IV generators: how a sector number becomes an IV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The low 32 bits of the sector number, little-endian, zero-padded.
    Plain,
    /// The 64-bit sector number, little-endian, zero-padded.
    Plain64,
    /// The plain64 block encrypted with a key that is the hash of the data key.
    Essiv,
}

impl IvGenAlg {
    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }

    /// Parses qemu's `ivgen-alg` option.
    ///
    /// # Errors
    /// [`Error::UnsupportedIvGen`] for other names.
    pub fn parse(s: &str) -> Result<IvGenAlg, Error> {
        match s {
            "plain" => Ok(IvGenAlg::Plain),
            "plain64" => Ok(IvGenAlg::Plain64),
            "essiv" => Ok(IvGenAlg::Essiv),
            _ => Err(Error::UnsupportedIvGen(s.to_owned())),
        }
    }
}

/// Hash algorithms for PBKDF2, the anti-forensic splitter and ESSIV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1 (20-byte digest).
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256 (qemu's default).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// qemu's and LUKS's name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Parses a hash name.
    ///
    /// # Errors
    /// [`Error::UnsupportedHash`] for md5, ripemd160 and unknown names.
    pub fn parse(s: &str) -> Result<HashAlg, Error> {
        match s {
            "sha1" => Ok(HashAlg::Sha1),
            "sha224" => Ok(HashAlg::Sha224),
            "sha256" => Ok(HashAlg::Sha256),
            "sha384" => Ok(HashAlg::Sha384),
            "sha512" => Ok(HashAlg::Sha512),
            _ => Err(Error::UnsupportedHash(s.to_owned())),
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts),
            HashAlg::Sha224 => run::<Sha224>(parts),
            HashAlg::Sha256 => run::<Sha256>(parts),
            HashAlg::Sha384 => run::<Sha384>(parts),
            HashAlg::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2 with HMAC over this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }

    /// PBKDF2 iterations per second producing `out_len` bytes on this machine (qemu's
    /// `qcrypto_pbkdf2_count_iters`, timed over about 50 ms instead of 500 ms, and remembered
    /// per hash and output length for the life of the process).
    pub fn pbkdf2_iterations_per_second(self, out_len: usize) -> u64 {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        use std::time::Instant;
        static CACHE: OnceLock<Mutex<HashMap<(&'static str, usize), u64>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let key = (self.name(), out_len);
        if let Some(&v) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return v;
        }
        let mut out = vec![0u8; out_len];
        let mut iters: u32 = 1 << 10;
        let rate = loop {
            let t = Instant::now();
            self.pbkdf2(b"benchmark passphrase", &[0x5a; 32], iters, &mut out);
            let ns = t.elapsed().as_nanos().max(1);
            if ns >= 50_000_000 || iters >= 1 << 30 {
                break u64::try_from(u128::from(iters) * 1_000_000_000 / ns).unwrap_or(u64::MAX);
            }
            iters = iters.saturating_mul(4);
        };
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, rate);
        rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_sha1_rfc6070_vector() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
    }

    #[test]
    fn digest_lengths_match_names() {
        for h in [
            HashAlg::Sha1,
            HashAlg::Sha224,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
        ] {
            assert_eq!(h.digest(&[b"a", b"b"]).len(), h.digest_len());
            assert_eq!(HashAlg::parse(h.name()).unwrap(), h);
        }
        assert!(matches!(
            HashAlg::parse("md5"),
            Err(Error::UnsupportedHash(_))
        ));
    }
}
