//! Sector encryption: a cipher, a mode and an IV generator keyed once, applied to 512-byte
//! sectors by number (qemu's `qcrypto_block_cipher_encrypt_helper`).
//!
//! Each mode is a small generic type over the RustCrypto block cipher, so every cipher × mode
//! pair is its own monomorphised sector routine (AES keeps the `aes` crate's AES-NI backend,
//! chosen at run time); [`DataCipher`] holds one behind a trait object, one call per buffer,
//! which the mode walks sector by sector (XTS, LUKS's usual mode, in batches of sectors).

use std::fmt;
use std::marker::PhantomData;
use std::sync::OnceLock;

use aes::cipher::array::{Array, ArraySize};
use aes::cipher::common::InnerInit;
use aes::cipher::consts::{U16, U8};
use aes::cipher::{
    BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, BlockSizeUser,
    InnerIvInit, KeyInit, StreamCipherCore,
};
use aes::{Aes128, Aes192, Aes256};
use cast5::Cast5;
use ctr::flavors::{Ctr128BE, Ctr64BE, CtrFlavor};
use serpent::Serpent;
use twofish::Twofish;

use super::{CipherAlg, CipherMode, Error, HashAlg, IvGenAlg, SECTOR_BYTES};

/// Buffers at least this long are split between two threads (sector encryption is independent
/// per sector, so the halves need no coordination).
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// The longest cipher block (AES, Twofish, Serpent); IVs are generated at this length and cut
/// to the cipher's block (CAST5's 8 bytes).
type MaxBlock = Array<u8, U16>;

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

    /// Checks the combination as qemu does when it creates or opens a LUKS volume: the mode
    /// must suit the cipher's block, and ESSIV must have a cipher for its hash.
    ///
    /// # Errors
    /// [`Error::ModeNotForCipher`] (CAST5 with XTS), [`Error::NoEssivCipher`],
    /// [`Error::EssivUnsupported`].
    pub fn validate(&self) -> Result<(), Error> {
        if !self.alg.supports(self.mode) {
            return Err(Error::ModeNotForCipher {
                cipher: self.alg.name(),
                mode: self.mode.name(),
            });
        }
        if self.ivgen == IvGenAlg::Essiv {
            self.alg.essiv_cipher(self.ivgen_hash)?;
        }
        Ok(())
    }
}

/// Keys a RustCrypto cipher, naming the algorithm when the key does not fit.
fn keyed<C: KeyInit>(alg: CipherAlg, key: &[u8]) -> Result<C, Error> {
    C::new_from_slice(key).map_err(|_| Error::BadKeyLength {
        cipher: alg.name().to_owned(),
        key_bytes: u32::try_from(key.len()).unwrap_or(u32::MAX),
    })
}

/// A keyed block cipher of any algorithm (ESSIV's IV cipher).
enum Keyed {
    Aes128(Aes128),
    Aes192(Aes192),
    Aes256(Aes256),
    Twofish(Twofish),
    Serpent(Serpent),
    Cast5(Cast5),
}

impl Keyed {
    fn new(alg: CipherAlg, key: &[u8]) -> Result<Keyed, Error> {
        Ok(match alg {
            CipherAlg::Aes128 => Keyed::Aes128(keyed(alg, key)?),
            CipherAlg::Aes192 => Keyed::Aes192(keyed(alg, key)?),
            CipherAlg::Aes256 => Keyed::Aes256(keyed(alg, key)?),
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
                Keyed::Twofish(keyed(alg, key)?)
            }
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
                Keyed::Serpent(keyed(alg, key)?)
            }
            CipherAlg::Cast5_128 => Keyed::Cast5(keyed(alg, key)?),
        })
    }

    /// Encrypts the first block of `iv` (all of it, or the first 8 bytes for CAST5, whose
    /// IVs are 8 bytes long).
    fn encrypt_iv(&self, iv: &mut MaxBlock) {
        match self {
            Keyed::Aes128(c) => c.encrypt_block(iv),
            Keyed::Aes192(c) => c.encrypt_block(iv),
            Keyed::Aes256(c) => c.encrypt_block(iv),
            Keyed::Twofish(c) => c.encrypt_block(iv),
            Keyed::Serpent(c) => c.encrypt_block(iv),
            Keyed::Cast5(c) => {
                let mut b = Array::<u8, U8>::from_fn(|i| iv[i]);
                c.encrypt_block(&mut b);
                iv[..8].copy_from_slice(&b);
            }
        }
    }
}

enum IvGen {
    Plain,
    Plain64,
    Essiv(Box<Keyed>),
}

impl IvGen {
    /// The IV of `sector`, zero-padded to 16 bytes (qemu's ivgen-plain.c, ivgen-plain64.c,
    /// ivgen-essiv.c: the little-endian sector number, zero-filled to the block; ESSIV
    /// encrypts that block).
    fn iv(&self, sector: u64) -> MaxBlock {
        let mut iv = Array([0u8; 16]);
        match self {
            // plain truncates the sector number to 32 bits, as dm-crypt and qemu do.
            IvGen::Plain => iv[..4].copy_from_slice(&sector.to_le_bytes()[..4]),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_iv(&mut iv);
            }
        }
        iv
    }
}

/// `sector` as whole blocks of `B` bytes (sectors are 512 bytes: no remainder for 8 or 16).
fn blocks<B: ArraySize>(sector: &mut [u8]) -> &mut [Array<u8, B>] {
    Array::<u8, B>::slice_as_chunks_mut(sector).0
}

/// The first block of a generated IV, at the cipher's block length.
fn iv_block<B: ArraySize>(iv: &MaxBlock) -> Array<u8, B> {
    Array::from_fn(|i| iv.get(i).copied().unwrap_or(0))
}

/// One mode over one keyed cipher, applied sector by sector.
trait SectorMode: Send + Sync {
    /// Encrypts (`enc`) or decrypts one sector with its IV (the first block's worth is used).
    fn sector(&self, iv: &MaxBlock, sector: &mut [u8], enc: bool);

    /// Whether the mode uses an IV at all (ECB does not, so none is generated).
    fn uses_iv(&self) -> bool {
        true
    }

    /// Encrypts or decrypts whole sectors, the first numbered `first`, with IVs from `ivgen`;
    /// one sector at a time unless the mode batches them.
    fn sectors(&self, ivgen: &IvGen, first: u64, buf: &mut [u8], enc: bool) {
        let no_iv = Array([0u8; 16]);
        for (i, sector) in buf.chunks_exact_mut(SECTOR_BYTES).enumerate() {
            if self.uses_iv() {
                self.sector(&ivgen.iv(first.wrapping_add(i as u64)), sector, enc);
            } else {
                self.sector(&no_iv, sector, enc);
            }
        }
    }
}

/// Electronic codebook: every block alone, no IV.
struct Ecb<C>(C);

impl<C> SectorMode for Ecb<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + Send + Sync,
{
    fn sector(&self, _iv: &MaxBlock, sector: &mut [u8], enc: bool) {
        if enc {
            ecb::Encryptor::<&C>::inner_init(&self.0).encrypt_blocks(blocks(sector));
        } else {
            ecb::Decryptor::<&C>::inner_init(&self.0).decrypt_blocks(blocks(sector));
        }
    }

    fn uses_iv(&self) -> bool {
        false
    }
}

/// Cipher block chaining from the sector's IV.
struct Cbc<C>(C);

impl<C> SectorMode for Cbc<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + Send + Sync,
{
    fn sector(&self, iv: &MaxBlock, sector: &mut [u8], enc: bool) {
        let iv = iv_block::<C::BlockSize>(iv);
        if enc {
            cbc::Encryptor::<&C>::inner_iv_init(&self.0, &iv).encrypt_blocks(blocks(sector));
        } else {
            cbc::Decryptor::<&C>::inner_iv_init(&self.0, &iv).decrypt_blocks(blocks(sector));
        }
    }
}

/// Counter mode: the sector's IV is its first counter block, incremented big-endian across
/// the whole block (`F`: [`Ctr128BE`] for 16-byte blocks, [`Ctr64BE`] for CAST5's 8), as
/// nettle's `ctr_crypt`, which qemu uses, counts. Encryption and decryption are the same.
struct Ctr<C, F>(C, PhantomData<fn() -> F>);

impl<C, F> SectorMode for Ctr<C, F>
where
    C: BlockCipherEncrypt + Send + Sync,
    F: CtrFlavor<C::BlockSize>,
{
    fn sector(&self, iv: &MaxBlock, sector: &mut [u8], _enc: bool) {
        let iv = iv_block::<C::BlockSize>(iv);
        ctr::CtrCore::<&C, F>::inner_iv_init(&self.0, &iv).apply_keystream_blocks(blocks(sector));
    }
}

/// XTS (IEEE 1619): the key's first half keys the data cipher, the second the tweak cipher
/// (for every 128-bit cipher, as for AES); the tweak is the sector's IV.
///
/// Written out here rather than through `xts_mode`, which calls the cipher one block at a time:
/// the tweaks of a batch of sectors are computed first, so the data cipher sees the whole
/// batch in one call and its wide backends (AES's VAES and AES-NI pipelines) keep their round
/// keys loaded across it. The unit tests hold it to `xts_mode`'s output.
struct Xts<C> {
    data: C,
    tweak: C,
}

/// 16-byte blocks per sector. Sectors are whole blocks, so XTS never needs ciphertext stealing
/// here; a sector length that broke this would leave a tail unencrypted, hence the check.
const XTS_BLOCKS: usize = SECTOR_BYTES / 16;
const _: () = assert!(SECTOR_BYTES % 16 == 0);

/// Sectors per call of the data cipher. Their tweaks (8 KiB for 16) and data stay in L1
/// between the XOR passes and the cipher pass.
const XTS_BATCH: usize = 16;

/// Multiplies an XTS tweak by alpha in GF(2^128), the little-endian convention of IEEE 1619:
/// shift left by one and fold the carried-out bit back in as x^7 + x^2 + x + 1.
fn xts_double(t: u128) -> u128 {
    let carry = 0u128.wrapping_sub(t >> 127) & 0x87;
    (t << 1) ^ carry
}

/// XORs each block with its tweak.
fn xor_blocks(blocks: &mut [Array<u8, U16>], tweaks: &[[u8; 16]]) {
    for (b, t) in blocks.iter_mut().zip(tweaks) {
        for (x, y) in b.iter_mut().zip(t) {
            *x ^= y;
        }
    }
}

impl<C> Xts<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
{
    /// Encrypts or decrypts `data`, whole sectors whose IVs are `ivs` (at most [`XTS_BATCH`];
    /// the IVs are encrypted into the sectors' first tweaks in place).
    fn batch(&self, ivs: &mut [MaxBlock], data: &mut [u8], enc: bool) {
        debug_assert!(ivs.len() <= XTS_BATCH && data.len() == ivs.len() * SECTOR_BYTES);
        let mut tweaks = [[0u8; 16]; XTS_BATCH * XTS_BLOCKS];
        self.tweak.encrypt_blocks(ivs);
        for (iv, run) in ivs.iter().zip(tweaks.chunks_exact_mut(XTS_BLOCKS)) {
            let mut t = u128::from_le_bytes(iv.0);
            for slot in run {
                *slot = t.to_le_bytes();
                t = xts_double(t);
            }
        }
        let blocks = blocks::<U16>(data);
        xor_blocks(blocks, &tweaks);
        if enc {
            self.data.encrypt_blocks(blocks);
        } else {
            self.data.decrypt_blocks(blocks);
        }
        xor_blocks(blocks, &tweaks);
    }
}

impl<C> SectorMode for Xts<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn sector(&self, iv: &MaxBlock, sector: &mut [u8], enc: bool) {
        self.batch(&mut [*iv], sector, enc);
    }

    fn sectors(&self, ivgen: &IvGen, first: u64, buf: &mut [u8], enc: bool) {
        let mut ivs = [Array([0u8; 16]); XTS_BATCH];
        let mut n = first;
        for run in buf.chunks_mut(XTS_BATCH * SECTOR_BYTES) {
            let ivs = &mut ivs[..run.len() / SECTOR_BYTES];
            for iv in ivs.iter_mut() {
                *iv = ivgen.iv(n);
                n = n.wrapping_add(1);
            }
            self.batch(ivs, run, enc);
        }
    }
}

/// A mode over a 128-bit block cipher `C`.
fn wide<C>(spec: CipherSpec, key: &[u8]) -> Result<Box<dyn SectorMode>, Error>
where
    C: KeyInit
        + BlockCipherEncrypt
        + BlockCipherDecrypt
        + BlockSizeUser<BlockSize = U16>
        + Send
        + Sync
        + 'static,
{
    let alg = spec.alg;
    Ok(match spec.mode {
        CipherMode::Ecb => Box::new(Ecb(keyed::<C>(alg, key)?)),
        CipherMode::Cbc => Box::new(Cbc(keyed::<C>(alg, key)?)),
        CipherMode::Ctr => Box::new(Ctr::<C, Ctr128BE>(keyed(alg, key)?, PhantomData)),
        CipherMode::Xts => {
            let (data, tweak) =
                key.split_at_checked(alg.key_len())
                    .ok_or_else(|| Error::BadKeyLength {
                        cipher: alg.name().to_owned(),
                        key_bytes: u32::try_from(key.len()).unwrap_or(u32::MAX),
                    })?;
            Box::new(Xts {
                data: keyed::<C>(alg, data)?,
                tweak: keyed::<C>(alg, tweak)?,
            })
        }
    })
}

/// A mode over a 64-bit block cipher `C` (CAST5): no XTS.
fn narrow<C>(spec: CipherSpec, key: &[u8]) -> Result<Box<dyn SectorMode>, Error>
where
    C: KeyInit
        + BlockCipherEncrypt
        + BlockCipherDecrypt
        + BlockSizeUser<BlockSize = U8>
        + Send
        + Sync
        + 'static,
{
    let alg = spec.alg;
    Ok(match spec.mode {
        CipherMode::Ecb => Box::new(Ecb(keyed::<C>(alg, key)?)),
        CipherMode::Cbc => Box::new(Cbc(keyed::<C>(alg, key)?)),
        CipherMode::Ctr => Box::new(Ctr::<C, Ctr64BE>(keyed(alg, key)?, PhantomData)),
        CipherMode::Xts => {
            return Err(Error::ModeNotForCipher {
                cipher: alg.name(),
                mode: spec.mode.name(),
            })
        }
    })
}

/// Encrypts and decrypts 512-byte sectors given the number of the first one. Key schedules are
/// zeroed when it is dropped (the cipher crates' `zeroize` feature).
pub struct DataCipher {
    spec: CipherSpec,
    mode: Box<dyn SectorMode>,
    ivgen: IvGen,
}

impl fmt::Debug for DataCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataCipher")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl DataCipher {
    /// Keys a cipher.
    ///
    /// # Errors
    /// When the key length does not fit the spec, the mode does not suit the cipher, or ESSIV
    /// has no cipher for its hash ([`CipherSpec::validate`]).
    pub fn new(spec: CipherSpec, key: &[u8]) -> Result<DataCipher, Error> {
        spec.validate()?;
        if key.len() != spec.key_len() {
            return Err(Error::BadKeyLength {
                cipher: format!("{}-{}", spec.alg.name(), spec.mode.name()),
                key_bytes: u32::try_from(key.len()).unwrap_or(u32::MAX),
            });
        }
        let mode = match spec.alg {
            CipherAlg::Aes128 => wide::<Aes128>(spec, key)?,
            CipherAlg::Aes192 => wide::<Aes192>(spec, key)?,
            CipherAlg::Aes256 => wide::<Aes256>(spec, key)?,
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
                wide::<Twofish>(spec, key)?
            }
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
                wide::<Serpent>(spec, key)?
            }
            CipherAlg::Cast5_128 => narrow::<Cast5>(spec, key)?,
        };
        let ivgen = match spec.ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                // The ESSIV key is the hash of the whole key (both XTS halves), as in qemu.
                let salt = zeroize::Zeroizing::new(spec.ivgen_hash.digest(&[key]));
                let alg = spec.alg.essiv_cipher(spec.ivgen_hash)?;
                IvGen::Essiv(Box::new(Keyed::new(alg, &salt)?))
            }
        };
        Ok(DataCipher { spec, mode, ivgen })
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
        self.mode.sectors(&self.ivgen, first, buf, enc);
    }
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
            // CAST5 takes ESSIV only with a 16-byte digest.
            ivgen_hash: if alg == CipherAlg::Cast5_128 {
                HashAlg::Md5
            } else {
                HashAlg::Sha256
            },
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn every_combination_round_trips_and_changes_data() {
        let mut n = 0;
        for alg in CipherAlg::ALL {
            for mode in CipherMode::ALL {
                if !alg.supports(mode) {
                    continue;
                }
                for iv in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
                    let s = spec(alg, mode, iv);
                    let key: Vec<u8> = (0..s.key_len()).map(|i| i as u8).collect();
                    let c = DataCipher::new(s, &key).unwrap();
                    let plain: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
                    let mut buf = plain.clone();
                    c.encrypt(7, &mut buf).unwrap();
                    assert_ne!(buf, plain, "{s:?}");
                    // Another sector number gives another ciphertext, except in ECB.
                    let mut other = plain.clone();
                    c.encrypt(8, &mut other).unwrap();
                    assert_eq!(mode == CipherMode::Ecb, other == buf, "{s:?}");
                    c.decrypt(7, &mut buf).unwrap();
                    assert_eq!(buf, plain, "{s:?}");
                    n += 1;
                }
            }
        }
        // 9 ciphers with 4 modes and 1 (CAST5) with 3, each with 3 IV generators.
        assert_eq!(n, (9 * 4 + 3) * 3);
    }

    #[test]
    fn cast5_xts_is_refused_with_the_mode_named() {
        let s = spec(CipherAlg::Cast5_128, CipherMode::Xts, IvGenAlg::Plain64);
        let e = DataCipher::new(s, &[0u8; 32]).unwrap_err();
        assert!(matches!(
            e,
            Error::ModeNotForCipher {
                cipher: "cast5-128",
                mode: "xts"
            }
        ));
        assert!(
            e.to_string().starts_with("Unsupported cipher mode xts"),
            "{e}"
        );
    }

    #[test]
    fn ctr_matches_sp800_38a_f51() {
        // NIST SP 800-38A F.5.1 CTR-AES128.Encrypt, first two blocks: the counter's last byte
        // wraps from 0xff into the byte before it.
        let key = unhex("2b7e151628aed2a6abf7158809cf4f3c");
        let iv = Array::try_from(&unhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")[..]).unwrap();
        let s = spec(CipherAlg::Aes128, CipherMode::Ctr, IvGenAlg::Plain64);
        let m = wide::<Aes128>(s, &key).unwrap();
        let mut sector = vec![0u8; 512];
        sector[..32].copy_from_slice(&unhex(
            "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51",
        ));
        m.sector(&iv, &mut sector, true);
        assert_eq!(
            sector[..32],
            unhex("874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff")[..]
        );
    }

    #[test]
    fn ctr_counter_carries_across_all_128_bits() {
        // Low 64 bits all ones: the second block's counter is 0..01 00..00 (nettle's ctr, which
        // qemu uses), not a 64-bit counter wrapped to zero.
        let key = [7u8; 16];
        let c = Aes128::new_from_slice(&key).unwrap();
        let mut iv = Array([0u8; 16]);
        iv[8..].fill(0xff);
        let s = spec(CipherAlg::Aes128, CipherMode::Ctr, IvGenAlg::Plain64);
        let m = wide::<Aes128>(s, &key).unwrap();
        let mut sector = vec![0u8; 512];
        m.sector(&iv, &mut sector, true);
        let mut want = Array([0u8; 16]);
        want[7] = 1;
        c.encrypt_block(&mut want);
        assert_eq!(sector[16..32], want[..]);
    }

    #[test]
    fn cast5_and_twofish_ecb_match_published_vectors() {
        // RFC 2144 B.1, 128-bit key.
        let s = spec(CipherAlg::Cast5_128, CipherMode::Ecb, IvGenAlg::Plain64);
        let c = DataCipher::new(s, &unhex("0123456712345678234567893456789a")).unwrap();
        let mut buf = unhex("0123456789abcdef").repeat(64);
        c.encrypt(0, &mut buf).unwrap();
        assert_eq!(buf[..8], unhex("238b4fe5847e44b2")[..]);
        assert_eq!(buf[504..], unhex("238b4fe5847e44b2")[..]);
        // Twofish paper, 128-bit zero key, zero plaintext.
        let s = spec(CipherAlg::Twofish128, CipherMode::Ecb, IvGenAlg::Plain64);
        let c = DataCipher::new(s, &[0u8; 16]).unwrap();
        let mut buf = vec![0u8; 512];
        c.encrypt(0, &mut buf).unwrap();
        assert_eq!(buf[..16], unhex("9f589f5cf6122c32b6bfec2f2ae8c35a")[..]);
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

    /// `xts_mode`'s sector routine over `buf`, sector by sector from `first` with plain or
    /// plain64 IVs: the reference for the batched XTS path.
    fn xts_mode_reference<C>(key: &[u8], ivgen: IvGenAlg, first: u64, buf: &mut [u8], enc: bool)
    where
        C: KeyInit + BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
    {
        let (k1, k2) = key.split_at(key.len() / 2);
        let xts = xts_mode::Xts128::new(
            C::new_from_slice(k1).unwrap(),
            C::new_from_slice(k2).unwrap(),
        );
        for (i, sector) in buf.chunks_exact_mut(SECTOR_BYTES).enumerate() {
            let n = first.wrapping_add(i as u64);
            let mut tweak = Array([0u8; 16]);
            match ivgen {
                IvGenAlg::Plain => tweak[..4].copy_from_slice(&(n as u32).to_le_bytes()),
                IvGenAlg::Plain64 => tweak[..8].copy_from_slice(&n.to_le_bytes()),
                IvGenAlg::Essiv => unreachable!("the reference takes plain IVs"),
            }
            if enc {
                xts.encrypt_sector(sector, tweak);
            } else {
                xts.decrypt_sector(sector, tweak);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 64,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// The batched XTS path gives `xts_mode`'s bytes in both directions, for batches cut
        /// short, whole and spilling over, across the two-thread split, and round-trips.
        #[test]
        fn xts_matches_xts_mode(
            alg in proptest::sample::select(vec![
                CipherAlg::Aes128,
                CipherAlg::Aes192,
                CipherAlg::Aes256,
                CipherAlg::Serpent256,
            ]),
            ivgen in proptest::sample::select(vec![IvGenAlg::Plain, IvGenAlg::Plain64]),
            key in proptest::collection::vec(proptest::prelude::any::<u8>(), 64),
            // Some runs cross the wrap of the sector number (plain's at 2^32 as well).
            first in proptest::prop_oneof![
                proptest::prelude::any::<u64>(),
                u64::MAX - 600..,
                0xffff_fc00u64..0x1_0000_0000,
            ],
            sectors in proptest::sample::select(vec![
                1usize,
                2,
                XTS_BATCH - 1,
                XTS_BATCH,
                XTS_BATCH + 1,
                3 * XTS_BATCH + 5,
                PARALLEL_MIN_BYTES / SECTOR_BYTES + 3,
            ]),
            seed in 1u64..,
        ) {
            let s = spec(alg, CipherMode::Xts, ivgen);
            let key = &key[..s.key_len()];
            let c = DataCipher::new(s, key).unwrap();
            let mut x = seed;
            let data: Vec<u8> = (0..sectors * SECTOR_BYTES)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let reference = match alg {
                CipherAlg::Aes128 => xts_mode_reference::<Aes128>,
                CipherAlg::Aes192 => xts_mode_reference::<Aes192>,
                CipherAlg::Aes256 => xts_mode_reference::<Aes256>,
                _ => xts_mode_reference::<Serpent>,
            };
            for enc in [true, false] {
                let mut ours = data.clone();
                let mut theirs = data.clone();
                if enc {
                    c.encrypt(first, &mut ours).unwrap();
                } else {
                    c.decrypt(first, &mut ours).unwrap();
                }
                reference(key, ivgen, first, &mut theirs, enc);
                proptest::prop_assert!(ours == theirs, "{s:?} enc={enc}");
            }
            let mut buf = data.clone();
            c.encrypt(first, &mut buf).unwrap();
            c.decrypt(first, &mut buf).unwrap();
            proptest::prop_assert!(buf == data);
        }
    }

    #[test]
    fn xts_single_sector_matches_the_batched_path() {
        // `sector` (one sector, its own IV) and `sectors` are the same routine.
        let key: Vec<u8> = (0..64u8).collect();
        let s = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64);
        let m = wide::<Aes256>(s, &key).unwrap();
        let c = DataCipher::new(s, &key).unwrap();
        let mut one = vec![0x3cu8; SECTOR_BYTES];
        let mut iv = Array([0u8; 16]);
        iv[..8].copy_from_slice(&41u64.to_le_bytes());
        m.sector(&iv, &mut one, true);
        let mut batched = vec![0x3cu8; SECTOR_BYTES * 2];
        c.encrypt(40, &mut batched).unwrap();
        assert_eq!(&batched[SECTOR_BYTES..], &one[..]);
    }

    #[test]
    fn xts_double_carries_into_the_low_byte() {
        assert_eq!(xts_double(1), 2);
        assert_eq!(xts_double(1 << 127), 0x87);
        assert_eq!(xts_double(u128::MAX), (u128::MAX << 1) ^ 0x87);
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
    fn essiv_without_a_cipher_for_the_digest_is_refused() {
        let mut s = spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv);
        s.ivgen_hash = HashAlg::Sha1;
        assert!(matches!(
            DataCipher::new(s, &[0u8; 16]),
            Err(Error::NoEssivCipher {
                family: "AES",
                key_len: 20
            })
        ));
        let mut s = spec(CipherAlg::Cast5_128, CipherMode::Cbc, IvGenAlg::Essiv);
        s.ivgen_hash = HashAlg::Sha256;
        assert!(matches!(
            DataCipher::new(s, &[0u8; 16]),
            Err(Error::EssivUnsupported("cast5-128"))
        ));
    }

    #[test]
    fn wrong_key_length_is_refused() {
        let s = spec(CipherAlg::Serpent256, CipherMode::Xts, IvGenAlg::Plain64);
        assert!(matches!(
            DataCipher::new(s, &[0u8; 32]),
            Err(Error::BadKeyLength { key_bytes: 32, .. })
        ));
    }

    #[test]
    fn parallel_and_serial_paths_agree() {
        for alg in [
            CipherAlg::Aes256,
            CipherAlg::Serpent128,
            CipherAlg::Cast5_128,
        ] {
            let mode = if alg == CipherAlg::Cast5_128 {
                CipherMode::Ctr
            } else {
                CipherMode::Xts
            };
            let s = spec(alg, mode, IvGenAlg::Essiv);
            let c = DataCipher::new(s, &vec![9u8; s.key_len()]).unwrap();
            let mut big = vec![0x5au8; PARALLEL_MIN_BYTES * 2];
            c.encrypt(100, &mut big).unwrap();
            let mut piece = vec![0x5au8; 512];
            c.encrypt(100 + (PARALLEL_MIN_BYTES * 2 / 512 - 1) as u64, &mut piece)
                .unwrap();
            assert_eq!(&big[big.len() - 512..], &piece[..], "{s:?}");
        }
    }
}
