//! The algorithms qemu's LUKS and qcow AES use, by the names qemu and the LUKS header give them.

use sha2::Digest;

use super::Error;

/// Block ciphers: every one qemu's LUKS driver offers (`aes`, `twofish`, `serpent` in three key
/// sizes, `cast5` in one). qemu's `sm4` is not here: qemu-img 10 as Debian builds it has no SM4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
    /// Twofish with a 128-bit key.
    Twofish128,
    /// Twofish with a 192-bit key.
    Twofish192,
    /// Twofish with a 256-bit key.
    Twofish256,
    /// Serpent with a 128-bit key.
    Serpent128,
    /// Serpent with a 192-bit key.
    Serpent192,
    /// Serpent with a 256-bit key.
    Serpent256,
    /// CAST-128 (RFC 2144) with a 128-bit key: a 64-bit block, so no XTS.
    Cast5_128,
}

impl CipherAlg {
    /// Every algorithm, in qemu's order.
    pub const ALL: [CipherAlg; 10] = [
        CipherAlg::Aes128,
        CipherAlg::Aes192,
        CipherAlg::Aes256,
        CipherAlg::Twofish128,
        CipherAlg::Twofish192,
        CipherAlg::Twofish256,
        CipherAlg::Serpent128,
        CipherAlg::Serpent192,
        CipherAlg::Serpent256,
        CipherAlg::Cast5_128,
    ];

    /// qemu's option name (`aes-256`), also what `info` shows.
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
            CipherAlg::Twofish128 => "twofish-128",
            CipherAlg::Twofish192 => "twofish-192",
            CipherAlg::Twofish256 => "twofish-256",
            CipherAlg::Serpent128 => "serpent-128",
            CipherAlg::Serpent192 => "serpent-192",
            CipherAlg::Serpent256 => "serpent-256",
            CipherAlg::Cast5_128 => "cast5-128",
        }
    }

    /// The LUKS header's `cipher_name` (`aes`): the family, the key size being `key_bytes`.
    pub fn luks_name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256 => "aes",
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => "twofish",
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => "serpent",
            CipherAlg::Cast5_128 => "cast5",
        }
    }

    /// The family as qemu's ESSIV messages name it (`AES`, `Twofish`).
    fn family_title(self) -> &'static str {
        match self.luks_name() {
            "aes" => "AES",
            "twofish" => "Twofish",
            "serpent" => "Serpent",
            _ => "CAST5",
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128
            | CipherAlg::Twofish128
            | CipherAlg::Serpent128
            | CipherAlg::Cast5_128 => 16,
            CipherAlg::Aes192 | CipherAlg::Twofish192 | CipherAlg::Serpent192 => 24,
            CipherAlg::Aes256 | CipherAlg::Twofish256 | CipherAlg::Serpent256 => 32,
        }
    }

    /// Block length in bytes: 16, or 8 for CAST5.
    pub fn block_len(self) -> usize {
        if self == CipherAlg::Cast5_128 {
            8
        } else {
            16
        }
    }

    /// The algorithm a LUKS header names: family `name` (`aes`) with a `key_len`-byte key
    /// (qemu's `qcrypto_block_luks_cipher_name_lookup`, after halving an XTS key).
    pub fn from_luks(name: &str, key_len: usize) -> Option<CipherAlg> {
        CipherAlg::ALL
            .into_iter()
            .find(|a| a.luks_name() == name && a.key_len() == key_len)
    }

    /// Whether the cipher works in `mode`: XTS needs a 128-bit block, so not CAST5.
    pub fn supports(self, mode: CipherMode) -> bool {
        mode != CipherMode::Xts || self.block_len() == 16
    }

    /// The cipher ESSIV uses with this data cipher and `hash` (qemu's
    /// `qcrypto_block_luks_essiv_cipher`, after dm-crypt): this one when its key is as long as
    /// the digest, otherwise the same family with the digest's key length.
    ///
    /// # Errors
    /// [`Error::NoEssivCipher`] when the family has no such key size (AES with sha1, say);
    /// [`Error::EssivUnsupported`] for CAST5 with any hash but one whose digest is 16 bytes.
    pub fn essiv_cipher(self, hash: HashAlg) -> Result<CipherAlg, Error> {
        let len = hash.digest_len();
        if len == self.key_len() {
            return Ok(self);
        }
        if self == CipherAlg::Cast5_128 {
            return Err(Error::EssivUnsupported(self.name()));
        }
        CipherAlg::from_luks(self.luks_name(), len).ok_or(Error::NoEssivCipher {
            family: self.family_title(),
            key_len: len,
        })
    }

    /// Parses qemu's `cipher-alg` option.
    ///
    /// # Errors
    /// [`Error::UnsupportedCipher`] for names qemu's LUKS does not offer.
    pub fn parse(s: &str) -> Result<CipherAlg, Error> {
        CipherAlg::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| Error::UnsupportedCipher(s.to_owned()))
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
    /// Counter mode: the IV generator's output is each sector's first counter block, counted
    /// up big-endian over the whole block per block (nettle's and gcrypt's `ctr`, which qemu
    /// uses).
    Ctr,
}

impl CipherMode {
    /// qemu's and LUKS's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }

    /// Every mode.
    pub const ALL: [CipherMode; 4] = [
        CipherMode::Ecb,
        CipherMode::Cbc,
        CipherMode::Xts,
        CipherMode::Ctr,
    ];

    /// Parses a mode name.
    ///
    /// # Errors
    /// [`Error::UnsupportedMode`] for names other than ecb, cbc, xts and ctr.
    pub fn parse(s: &str) -> Result<CipherMode, Error> {
        match s {
            "ecb" => Ok(CipherMode::Ecb),
            "cbc" => Ok(CipherMode::Cbc),
            "xts" => Ok(CipherMode::Xts),
            "ctr" => Ok(CipherMode::Ctr),
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
    /// The low 32 bits of the sector number, little-endian, zero-padded to the block.
    Plain,
    /// The 64-bit sector number, little-endian, zero-padded to the block.
    Plain64,
    /// The plain64 block encrypted with a key that is the hash of the data key (see
    /// [`CipherAlg::essiv_cipher`] for which cipher).
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

/// Hash algorithms for PBKDF2, the anti-forensic splitter and ESSIV: every one qemu-img 10
/// accepts for `hash-alg` and `ivgen-hash-alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// MD5 (16-byte digest).
    Md5,
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
    /// RIPEMD-160 (20-byte digest).
    Ripemd160,
    /// SM3 (GB/T 32905, 32-byte digest); qemu-img 10 accepts it though qemu's docs do not list it.
    Sm3,
}

/// Runs `$body` with `$d` the RustCrypto type of `$hash`.
macro_rules! with_hash {
    ($hash:expr, $d:ident => $body:expr) => {
        match $hash {
            HashAlg::Md5 => {
                type $d = md5::Md5;
                $body
            }
            HashAlg::Sha1 => {
                type $d = sha1::Sha1;
                $body
            }
            HashAlg::Sha224 => {
                type $d = sha2::Sha224;
                $body
            }
            HashAlg::Sha256 => {
                type $d = sha2::Sha256;
                $body
            }
            HashAlg::Sha384 => {
                type $d = sha2::Sha384;
                $body
            }
            HashAlg::Sha512 => {
                type $d = sha2::Sha512;
                $body
            }
            HashAlg::Ripemd160 => {
                type $d = ripemd::Ripemd160;
                $body
            }
            HashAlg::Sm3 => {
                type $d = sm3::Sm3;
                $body
            }
        }
    };
}

impl HashAlg {
    /// Every hash, in qemu's order.
    pub const ALL: [HashAlg; 8] = [
        HashAlg::Md5,
        HashAlg::Sha1,
        HashAlg::Sha224,
        HashAlg::Sha256,
        HashAlg::Sha384,
        HashAlg::Sha512,
        HashAlg::Ripemd160,
        HashAlg::Sm3,
    ];

    /// qemu's and LUKS's name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Md5 => "md5",
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
            HashAlg::Sm3 => "sm3",
        }
    }

    /// Parses a hash name.
    ///
    /// # Errors
    /// [`Error::UnsupportedHash`] for names qemu does not know.
    pub fn parse(s: &str) -> Result<HashAlg, Error> {
        HashAlg::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| Error::UnsupportedHash(s.to_owned()))
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        with_hash!(self, D => <D as Digest>::output_size())
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        with_hash!(self, D => {
            let mut d = D::new();
            for p in parts {
                Digest::update(&mut d, p);
            }
            d.finalize().to_vec()
        })
    }

    /// PBKDF2 with HMAC over this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        with_hash!(self, D => pbkdf2::pbkdf2_hmac::<D>(password, salt, iterations, out));
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

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn every_hash_matches_its_abc_vector_and_length() {
        // The "abc" vectors of each hash's specification (FIPS 180-4, RFC 1321, the RIPEMD-160
        // and SM3 papers): a wrong type behind a name cannot pass.
        let want = [
            (HashAlg::Md5, "900150983cd24fb0d6963f7d28e17f72"),
            (HashAlg::Sha1, "a9993e364706816aba3e25717850c26c9cd0d89d"),
            (
                HashAlg::Sha224,
                "23097d223405d8228642a477bda255b32aadbce4bda0b3f7e36c9da7",
            ),
            (
                HashAlg::Sha256,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                HashAlg::Sha384,
                "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed\
                 8086072ba1e7cc2358baeca134c825a7",
            ),
            (
                HashAlg::Sha512,
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                 2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
            ),
            (
                HashAlg::Ripemd160,
                "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc",
            ),
            (
                HashAlg::Sm3,
                "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0",
            ),
        ];
        assert_eq!(want.len(), HashAlg::ALL.len());
        for (h, hexd) in want {
            let d = h.digest(&[b"a", b"bc"]);
            assert_eq!(hex(&d), hexd, "{}", h.name());
            assert_eq!(d.len(), h.digest_len(), "{}", h.name());
            assert_eq!(HashAlg::parse(h.name()).unwrap(), h);
        }
        assert!(matches!(
            HashAlg::parse("whirlpool"),
            Err(Error::UnsupportedHash(_))
        ));
    }

    #[test]
    fn pbkdf2_md5_matches_reference() {
        // Python's hashlib.pbkdf2_hmac('md5', b'password', b'salt', 2, 16).
        let mut out = [0u8; 16];
        HashAlg::Md5.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(hex(&out), "042407b552be345ad6eee2cf2f7ed01d");
    }

    #[test]
    fn cipher_names_parse_and_map_to_luks_fields() {
        for a in CipherAlg::ALL {
            assert_eq!(CipherAlg::parse(a.name()).unwrap(), a);
            assert_eq!(CipherAlg::from_luks(a.luks_name(), a.key_len()), Some(a));
        }
        assert_eq!(CipherAlg::from_luks("cast5", 32), None);
        assert_eq!(CipherAlg::from_luks("sm4", 16), None);
        assert!(matches!(
            CipherAlg::parse("sm4"),
            Err(Error::UnsupportedCipher(_))
        ));
        assert!(!CipherAlg::Cast5_128.supports(CipherMode::Xts));
        assert!(CipherAlg::Serpent192.supports(CipherMode::Xts));
    }

    #[test]
    fn essiv_cipher_follows_qemu() {
        use CipherAlg::*;
        assert_eq!(Aes128.essiv_cipher(HashAlg::Sha256).unwrap(), Aes256);
        assert_eq!(Aes256.essiv_cipher(HashAlg::Md5).unwrap(), Aes128);
        assert_eq!(Twofish192.essiv_cipher(HashAlg::Sm3).unwrap(), Twofish256);
        assert_eq!(Serpent256.essiv_cipher(HashAlg::Md5).unwrap(), Serpent128);
        // CAST5 only with a hash as long as its own key.
        assert_eq!(Cast5_128.essiv_cipher(HashAlg::Md5).unwrap(), Cast5_128);
        assert!(matches!(
            Cast5_128.essiv_cipher(HashAlg::Sha256),
            Err(Error::EssivUnsupported("cast5-128"))
        ));
        let e = Twofish128.essiv_cipher(HashAlg::Sha1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "No Twofish cipher with key size 20 available"
        );
    }
}
