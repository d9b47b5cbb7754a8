//! Sector encryption: a cipher, a mode and an IV generator keyed once, applied to 512-byte
//! sectors by number (qemu's `qcrypto_block_cipher_encrypt_helper`).

use std::fmt;
use std::sync::OnceLock;

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::{
    BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, BlockSizeUser,
    InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;

use super::{CipherAlg, CipherMode, Error, HashAlg, IvGenAlg, SECTOR_BYTES};

/// Buffers at least this long are split between two threads (sector encryption is independent
/// per sector, so the halves need no coordination).
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// What a [`DataCipher`] is: algorithm, mode and IV generator (with ESSIV's hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    /// The block cipher.
    pub alg: CipherAlg,
    /// The mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGenAlg,
    /// ESSIV's hash (ignored by the other generators).
    pub ivgen_hash: HashAlg,
}

impl CipherSpec {
    /// Bytes of key the spec needs (XTS takes two cipher keys).
    pub fn key_len(&self) -> usize {
        self.alg.key_len() * self.mode.keys()
    }
}

/// A keyed AES of any width.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

/// Runs `$body` with `$c` bound to the concrete AES inside `$aes`.
macro_rules! with_aes {
    ($aes:expr, $c:ident => $body:expr) => {
        match $aes {
            Aes::A128($c) => $body,
            Aes::A192($c) => $body,
            Aes::A256($c) => $body,
        }
    };
}

impl Aes {
    fn new(alg: CipherAlg, key: &[u8]) -> Result<Aes, Error> {
        let bad = |_| Error::BadKeyLength {
            cipher: alg.name().to_owned(),
            key_bytes: u32::try_from(key.len()).unwrap_or(u32::MAX),
        };
        Ok(match alg {
            CipherAlg::Aes128 => Aes::A128(Aes128::new_from_slice(key).map_err(bad)?),
            CipherAlg::Aes192 => Aes::A192(Aes192::new_from_slice(key).map_err(bad)?),
            CipherAlg::Aes256 => Aes::A256(Aes256::new_from_slice(key).map_err(bad)?),
        })
    }

    fn encrypt_block(&self, block: &mut Array<u8, U16>) {
        with_aes!(self, c => c.encrypt_block(block));
    }
}

enum Engine {
    Ecb(Aes),
    Cbc(Aes),
    Xts128(Box<Xts128<Aes128>>),
    Xts192(Box<Xts128<Aes192>>),
    Xts256(Box<Xts128<Aes256>>),
}

enum IvGen {
    Plain,
    Plain64,
    Essiv(Box<Aes>),
}

impl IvGen {
    fn iv(&self, sector: u64) -> Array<u8, U16> {
        let mut iv = Array([0u8; 16]);
        match self {
            // plain truncates the sector number to 32 bits, as dm-crypt and qemu do.
            IvGen::Plain => iv[..4].copy_from_slice(&sector.to_le_bytes()[..4]),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut iv);
            }
        }
        iv
    }
}

/// Encrypts and decrypts 512-byte sectors given the number of the first one. Key schedules are
/// zeroed when it is dropped (the `aes` crate's `zeroize` feature).
pub struct DataCipher {
    spec: CipherSpec,
    engine: Engine,
    ivgen: IvGen,
}

impl fmt::Debug for DataCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataCipher")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

fn split_blocks(sector: &mut [u8]) -> &mut [Array<u8, U16>] {
    Array::<u8, U16>::slice_as_chunks_mut(sector).0
}

fn cbc_encrypt<C>(c: &C, iv: &Array<u8, U16>, sector: &mut [u8])
where
    C: BlockCipherEncrypt + BlockSizeUser<BlockSize = U16> + Clone,
{
    let mut m = cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv);
    m.encrypt_blocks(split_blocks(sector));
}

fn cbc_decrypt<C>(c: &C, iv: &Array<u8, U16>, sector: &mut [u8])
where
    C: BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + Clone,
{
    let mut m = cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv);
    m.decrypt_blocks(split_blocks(sector));
}

fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl DataCipher {
    /// Keys a cipher.
    ///
    /// # Errors
    /// When the key length does not fit the spec, or ESSIV has no AES variant for its hash.
    pub fn new(spec: CipherSpec, key: &[u8]) -> Result<DataCipher, Error> {
        if key.len() != spec.key_len() {
            return Err(Error::BadKeyLength {
                cipher: format!("{}-{}", spec.alg.name(), spec.mode.name()),
                key_bytes: u32::try_from(key.len()).unwrap_or(u32::MAX),
            });
        }
        let half = spec.alg.key_len();
        let xts = |alg| -> Result<(Aes, Aes), Error> {
            Ok((Aes::new(alg, &key[..half])?, Aes::new(alg, &key[half..])?))
        };
        let engine = match spec.mode {
            CipherMode::Ecb => Engine::Ecb(Aes::new(spec.alg, key)?),
            CipherMode::Cbc => Engine::Cbc(Aes::new(spec.alg, key)?),
            CipherMode::Xts => match xts(spec.alg)? {
                (Aes::A128(a), Aes::A128(b)) => Engine::Xts128(Box::new(Xts128::new(a, b))),
                (Aes::A192(a), Aes::A192(b)) => Engine::Xts192(Box::new(Xts128::new(a, b))),
                (Aes::A256(a), Aes::A256(b)) => Engine::Xts256(Box::new(Xts128::new(a, b))),
                _ => unreachable!("both halves use the same algorithm"),
            },
        };
        let ivgen = match spec.ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let salt = zeroize::Zeroizing::new(spec.ivgen_hash.digest(&[key]));
                let alg = essiv_cipher(spec.ivgen_hash)?;
                IvGen::Essiv(Box::new(Aes::new(alg, &salt)?))
            }
        };
        Ok(DataCipher {
            spec,
            engine,
            ivgen,
        })
    }

    /// What the cipher is.
    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    /// Encrypts whole sectors in place; the first is sector number `first_sector`.
    ///
    /// # Errors
    /// [`Error::Unaligned`] when `buf` is not a whole number of sectors.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.run(first_sector, buf, true)
    }

    /// Decrypts whole sectors in place; the first is sector number `first_sector`.
    ///
    /// # Errors
    /// [`Error::Unaligned`] when `buf` is not a whole number of sectors.
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.run(first_sector, buf, false)
    }

    fn run(&self, first: u64, buf: &mut [u8], enc: bool) -> Result<(), Error> {
        let ss = SECTOR_BYTES;
        if buf.len() % ss != 0 {
            return Err(Error::Unaligned(buf.len()));
        }
        if buf.len() >= PARALLEL_MIN_BYTES && threads() > 1 {
            let sectors = buf.len() / ss;
            let (a, b) = buf.split_at_mut(sectors / 2 * ss);
            std::thread::scope(|s| {
                s.spawn(|| self.run_serial(first, a, enc));
                self.run_serial(first.wrapping_add((sectors / 2) as u64), b, enc);
            });
        } else {
            self.run_serial(first, buf, enc);
        }
        Ok(())
    }

    fn run_serial(&self, first: u64, buf: &mut [u8], enc: bool) {
        for (i, sector) in buf.chunks_exact_mut(SECTOR_BYTES).enumerate() {
            let iv = self.ivgen.iv(first.wrapping_add(i as u64));
            match (&self.engine, enc) {
                (Engine::Ecb(c), true) => {
                    with_aes!(c, c => c.encrypt_blocks(split_blocks(sector)))
                }
                (Engine::Ecb(c), false) => {
                    with_aes!(c, c => c.decrypt_blocks(split_blocks(sector)))
                }
                (Engine::Cbc(c), true) => with_aes!(c, c => cbc_encrypt(c, &iv, sector)),
                (Engine::Cbc(c), false) => with_aes!(c, c => cbc_decrypt(c, &iv, sector)),
                (Engine::Xts128(x), true) => x.encrypt_sector(sector, iv),
                (Engine::Xts128(x), false) => x.decrypt_sector(sector, iv),
                (Engine::Xts192(x), true) => x.encrypt_sector(sector, iv),
                (Engine::Xts192(x), false) => x.decrypt_sector(sector, iv),
                (Engine::Xts256(x), true) => x.encrypt_sector(sector, iv),
                (Engine::Xts256(x), false) => x.decrypt_sector(sector, iv),
            }
        }
    }
}

/// The AES variant ESSIV uses with `hash`: the one whose key is as long as the digest (qemu's
/// `qcrypto_block_luks_essiv_cipher`).
///
/// # Errors
/// [`Error::NoEssivCipher`] when no AES key has the digest's length (sha1, sha384, sha512).
pub fn essiv_cipher(hash: HashAlg) -> Result<CipherAlg, Error> {
    CipherAlg::aes_with_key_len(hash.digest_len()).ok_or(Error::NoEssivCipher(hash.digest_len()))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test patterns
mod tests {
    use super::*;

    fn spec(alg: CipherAlg, mode: CipherMode, ivgen: IvGenAlg) -> CipherSpec {
        CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash: HashAlg::Sha256,
        }
    }

    #[test]
    fn every_combination_round_trips_and_changes_data() {
        for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
            for mode in [CipherMode::Ecb, CipherMode::Cbc, CipherMode::Xts] {
                for iv in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
                    let s = spec(alg, mode, iv);
                    let key: Vec<u8> = (0..s.key_len()).map(|i| i as u8).collect();
                    let c = DataCipher::new(s, &key).unwrap();
                    let plain: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
                    let mut buf = plain.clone();
                    c.encrypt(7, &mut buf).unwrap();
                    assert_ne!(buf, plain, "{s:?}");
                    c.decrypt(7, &mut buf).unwrap();
                    assert_eq!(buf, plain, "{s:?}");
                }
            }
        }
    }

    #[test]
    fn sector_number_changes_ciphertext_except_ecb() {
        let s = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64);
        let c = DataCipher::new(s, &[3u8; 64]).unwrap();
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        c.encrypt(1, &mut a).unwrap();
        c.encrypt(2, &mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn xts_plain64_matches_ieee_1619_vector_2() {
        // IEEE P1619 XTS-AES-128 vector 2: key1 = 11.., key2 = 22.., sector 0x3333333333,
        // plaintext 44.. (32 bytes). Our sectors are 512 bytes; check the first 32 bytes of a
        // 512-byte sector whose first two blocks are the vector's (XTS blocks depend only on the
        // tweak and their position).
        let mut key = vec![0x11u8; 16];
        key.extend_from_slice(&[0x22u8; 16]);
        let c = DataCipher::new(
            spec(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64),
            &key,
        )
        .unwrap();
        let mut buf = vec![0x44u8; 512];
        c.encrypt(0x33_3333_3333, &mut buf).unwrap();
        let want = [
            0xc4, 0x54, 0x18, 0x5e, 0x6a, 0x16, 0x93, 0x6e, 0x39, 0x33, 0x40, 0x38, 0xac, 0xef,
            0x83, 0x8b, 0xfb, 0x18, 0x6f, 0xff, 0x74, 0x80, 0xad, 0xc4, 0x28, 0x93, 0x82, 0xec,
            0xd6, 0xd3, 0x94, 0xf0,
        ];
        assert_eq!(&buf[..32], &want);
    }

    #[test]
    fn unaligned_buffer_is_refused() {
        let s = spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Plain64);
        let c = DataCipher::new(s, &[0u8; 16]).unwrap();
        assert!(matches!(
            c.encrypt(0, &mut [0u8; 100]),
            Err(Error::Unaligned(100))
        ));
    }

    #[test]
    fn essiv_with_sha1_has_no_cipher() {
        let mut s = spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv);
        s.ivgen_hash = HashAlg::Sha1;
        assert!(matches!(
            DataCipher::new(s, &[0u8; 16]),
            Err(Error::NoEssivCipher(20))
        ));
    }

    #[test]
    fn parallel_and_serial_paths_agree() {
        let s = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64);
        let c = DataCipher::new(s, &[9u8; 64]).unwrap();
        let mut big = vec![0x5au8; PARALLEL_MIN_BYTES * 2];
        c.encrypt(100, &mut big).unwrap();
        let mut piece = vec![0x5au8; 512];
        c.encrypt(100 + (PARALLEL_MIN_BYTES * 2 / 512 - 1) as u64, &mut piece)
            .unwrap();
        assert_eq!(&big[big.len() - 512..], &piece[..]);
    }
}
