//! LUKS1 (the on-disk format of cryptsetup's LUKS version 1, as qemu reads and writes it): the
//! header, eight key slots whose key material is the master key split by the anti-forensic
//! splitter and encrypted with a PBKDF2-derived key, and a PBKDF2 digest of the master key that
//! tells a right passphrase from a wrong one.
//!
//! Everything here works on the *header area*: the bytes from the LUKS header to the end of
//! the last key slot's material, read into memory by the caller (the plain `luks` format or
//! qcow2's crypto header extension) and written back after a change. Offsets inside are
//! relative to the header's start.

use zeroize::Zeroizing;

use super::cipher::CipherSpec;
use super::{
    af, CipherAlg, CipherMode, DataCipher, Error, HashAlg, IvGenAlg, SECTOR_BYTES, SECTOR_SIZE,
};

/// `LUKS\xba\xbe`.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The only version implemented.
pub const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const NUM_KEY_SLOTS: usize = 8;
/// Salt length of the master-key digest and of each key slot.
pub const SALT_LEN: usize = 32;
/// Master-key digest length (LUKS1 fixes 20 bytes whatever the hash).
pub const DIGEST_LEN: usize = 20;
/// Length of the UUID field (a NUL-padded string).
pub const UUID_LEN: usize = 40;
/// Anti-forensic stripes per key slot; qemu and cryptsetup accept no other value.
pub const STRIPES: u32 = 4000;
/// Key slot state word: in use.
pub const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// Key slot state word: free.
pub const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// Key material of slot 0 starts here; the header sector rounded up to 4 KiB.
pub const KEY_SLOT_OFFSET: u64 = 4096;
/// Each slot's key material is rounded up to this (qemu and cryptsetup align to 4 KiB).
pub const KEY_SLOT_ALIGN: u64 = 4096;
/// Fewest PBKDF2 iterations qemu gives a key slot.
pub const MIN_SLOT_ITERS: u64 = 1000;
/// Fewest PBKDF2 iterations qemu gives the master-key digest.
pub const MIN_MASTER_KEY_ITERS: u64 = 1000;
/// qemu's default `iter-time`: milliseconds of PBKDF2 per key slot.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;
/// qemu (after cryptsetup) gives the master-key digest an eighth of the slot time.
const DIGEST_TIME_DIVISOR: u64 = 8;
/// Largest header area accepted on open: eight slots of 64-byte keys need about 2 MiB; this
/// bounds what a hostile header can make us read and hash.
pub const MAX_HEADER_AREA: u64 = 16 << 20;
/// Most PBKDF2 iterations one passphrase may cost: those of every active key slot and of the
/// master-key digest checked after each. A header may ask for 2^32 - 1 iterations in each of
/// eight slots, hours of hashing before a wrong passphrase is refused (qemu-img runs them);
/// slots made by qemu or cryptsetup take about two seconds each, a few million iterations. At
/// 2^28 the worst case is minutes on slow hashes.
#[cfg(not(fuzzing))]
pub const MAX_UNLOCK_ITERATIONS: u64 = 1 << 28;
/// Fuzzing builds try slots only as dear as a fixture's, which take a few thousand iterations, so
/// that each input stays fast.
#[cfg(fuzzing)]
pub const MAX_UNLOCK_ITERATIONS: u64 = 1 << 15;
/// Largest master key accepted (a 256-bit cipher in XTS needs 64 bytes).
pub const MAX_KEY_BYTES: usize = 64;

/// A master key: zeroed when dropped.
pub type MasterKey = Zeroizing<Vec<u8>>;

/// One key slot as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSlot {
    /// [`SLOT_ACTIVE`] or [`SLOT_INACTIVE`].
    pub active: u32,
    /// PBKDF2 iterations for the slot key.
    pub iterations: u32,
    /// PBKDF2 salt for the slot key.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors from the header.
    pub key_material_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// The LUKS1 header exactly as stored (numbers big-endian on disk, strings NUL-padded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHeader {
    /// `LUKS\xba\xbe`.
    pub magic: [u8; 6],
    /// 1.
    pub version: u16,
    /// Cipher family (`aes`, `twofish`, `serpent`, `cast5`); `key_bytes` gives the size.
    pub cipher_name: [u8; 32],
    /// Mode and IV generator (`xts-plain64`, `cbc-essiv:sha256`).
    pub cipher_mode: [u8; 32],
    /// Hash for PBKDF2 and the splitter (`sha256`).
    pub hash_spec: [u8; 32],
    /// Start of the encrypted payload in 512-byte sectors.
    pub payload_offset: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that PBKDF2.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of that PBKDF2.
    pub mk_digest_iterations: u32,
    /// The volume UUID as text.
    pub uuid: [u8; UUID_LEN],
    /// The key slots.
    pub key_slots: [RawSlot; NUM_KEY_SLOTS],
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn arr<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

impl RawHeader {
    /// Reads the fields from the first [`HEADER_LEN`] bytes.
    ///
    /// # Errors
    /// [`Error::Truncated`] when `b` is shorter.
    pub fn parse(b: &[u8]) -> Result<RawHeader, Error> {
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated(b.len()));
        }
        let mut key_slots = [RawSlot {
            active: 0,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset: 0,
            stripes: 0,
        }; NUM_KEY_SLOTS];
        for (i, s) in key_slots.iter_mut().enumerate() {
            let o = 208 + i * 48;
            *s = RawSlot {
                active: be32(b, o),
                iterations: be32(b, o + 4),
                salt: arr(b, o + 8),
                key_material_offset: be32(b, o + 40),
                stripes: be32(b, o + 44),
            };
        }
        Ok(RawHeader {
            magic: arr(b, 0),
            version: u16::from_be_bytes(arr(b, 6)),
            cipher_name: arr(b, 8),
            cipher_mode: arr(b, 40),
            hash_spec: arr(b, 72),
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: arr(b, 112),
            mk_digest_salt: arr(b, 132),
            mk_digest_iterations: be32(b, 164),
            uuid: arr(b, 168),
            key_slots,
        })
    }

    /// The [`HEADER_LEN`] bytes of the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..6].copy_from_slice(&self.magic);
        b[6..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..40].copy_from_slice(&self.cipher_name);
        b[40..72].copy_from_slice(&self.cipher_mode);
        b[72..104].copy_from_slice(&self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, s) in self.key_slots.iter().enumerate() {
            let o = 208 + i * 48;
            b[o..o + 4].copy_from_slice(&s.active.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_material_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }
}

/// A NUL-padded string field as text.
fn field_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn str_field<const N: usize>(s: &str) -> [u8; N] {
    let mut a = [0u8; N];
    let n = s.len().min(N - 1);
    a[..n].copy_from_slice(&s.as_bytes()[..n]);
    a
}

/// One key slot, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// In use.
    pub active: bool,
    /// PBKDF2 iterations (0 when inactive).
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material in bytes from the header.
    pub key_offset: u64,
    /// Anti-forensic stripes (always [`STRIPES`]).
    pub stripes: u32,
}

/// A checked LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Cipher, mode and IV generator of the payload (and of the key material).
    pub spec: CipherSpec,
    /// Hash for PBKDF2 and the splitter.
    pub hash: HashAlg,
    /// Start of the payload in bytes from the header.
    pub payload_offset: u64,
    /// Master key length.
    pub key_bytes: usize,
    /// PBKDF2 of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_salt: [u8; SALT_LEN],
    /// Its iterations.
    pub mk_iterations: u32,
    /// Volume UUID.
    pub uuid: String,
    /// The key slots.
    pub slots: [Slot; NUM_KEY_SLOTS],
}

/// Parses the LUKS `cipher_mode` field: `MODE-IVGEN[:HASH]`.
fn parse_mode(s: &str) -> Result<(CipherMode, IvGenAlg, HashAlg), Error> {
    let (mode, iv) = s
        .split_once('-')
        .ok_or_else(|| Error::BadCipherModeString(s.to_owned()))?;
    let mode = CipherMode::parse(mode)?;
    let (ivgen, hash) = match iv.split_once(':') {
        Some((g, h)) => (IvGenAlg::parse(g)?, HashAlg::parse(h)?),
        None => (IvGenAlg::parse(iv)?, HashAlg::Sha256),
    };
    if ivgen == IvGenAlg::Essiv && !iv.contains(':') {
        return Err(Error::BadCipherModeString(s.to_owned()));
    }
    Ok((mode, ivgen, hash))
}

/// What the header stores in `cipher_mode` for a spec.
fn mode_string(spec: &CipherSpec) -> String {
    match spec.ivgen {
        IvGenAlg::Essiv => format!("{}-essiv:{}", spec.mode.name(), spec.ivgen_hash.name()),
        g => format!("{}-{}", spec.mode.name(), g.name()),
    }
}

/// Key material bytes for `key_bytes` and `stripes`, rounded up to whole 4 KiB (qemu's
/// `qcrypto_block_luks_splitkeylen_sectors`).
fn material_span(key_bytes: usize, stripes: u32) -> u64 {
    (key_bytes as u64 * u64::from(stripes)).div_ceil(KEY_SLOT_ALIGN) * KEY_SLOT_ALIGN
}

/// Options for a new LUKS header (qemu's `encrypt.*` create options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateParams {
    /// Cipher, mode, IV generator.
    pub spec: CipherSpec,
    /// PBKDF2 hash.
    pub hash: HashAlg,
    /// Milliseconds of PBKDF2 per key slot (qemu's `iter-time`).
    pub iter_time_ms: u64,
}

impl Default for CreateParams {
    /// qemu's defaults: aes-256-xts-plain64, sha256, 2 s.
    fn default() -> Self {
        CreateParams {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: HashAlg::Sha256,
            },
            hash: HashAlg::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
        }
    }
}

impl CreateParams {
    /// Bytes of the header area a new volume with these parameters has: the header, then eight
    /// slots of key material (qemu's payload offset, which `measure` counts too).
    pub fn header_area_len(&self) -> u64 {
        KEY_SLOT_OFFSET + NUM_KEY_SLOTS as u64 * material_span(self.spec.key_len(), STRIPES)
    }

    /// Applies one option (name without any `encrypt.` prefix); returns false for names that
    /// are not LUKS creation options.
    ///
    /// # Errors
    /// When the value is not one qemu accepts for the option.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, Error> {
        // A name outside qemu's enumeration is refused as its option parser refuses it; a name
        // qemu knows but this build cannot use keeps the crypto layer's own message.
        let not_accepted =
            |_| Error::InvalidOption(format!("Parameter '{key}' does not accept value '{value}'"));
        match key {
            "cipher-alg" if QEMU_CIPHER_ALGS.contains(&value) => {
                self.spec.alg = CipherAlg::parse(value)?;
            }
            "cipher-alg" => self.spec.alg = CipherAlg::parse(value).map_err(not_accepted)?,
            "cipher-mode" => self.spec.mode = CipherMode::parse(value).map_err(not_accepted)?,
            "ivgen-alg" => self.spec.ivgen = IvGenAlg::parse(value).map_err(not_accepted)?,
            "ivgen-hash-alg" => {
                self.spec.ivgen_hash = HashAlg::parse(value).map_err(not_accepted)?;
            }
            "hash-alg" => self.hash = HashAlg::parse(value).map_err(not_accepted)?,
            "iter-time" => self.iter_time_ms = parse_iter_time(value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks that the options make a volume qemu can use, before anything is written: the
    /// cipher suits the mode, ESSIV has a cipher for its hash ([`CipherSpec::validate`]), and
    /// the key material is whole sectors.
    ///
    /// # Errors
    /// As [`CipherSpec::validate`]; [`Error::InvalidOption`] for a 192-bit key outside XTS.
    pub fn validate(&self) -> Result<(), Error> {
        self.spec.validate()?;
        if (self.spec.key_len() * STRIPES as usize) % SECTOR_BYTES != 0 {
            // A 192-bit key outside XTS: 96000 bytes of key material, half a sector short,
            // which qemu-img cannot encrypt either (it aborts on an assertion).
            return Err(Error::InvalidOption(format!(
                "{}-{} key material is not a whole number of sectors; use xts or another key size",
                self.spec.alg.name(),
                self.spec.mode.name()
            )));
        }
        Ok(())
    }
}

/// The cipher names qemu's `cipher-alg` option takes (QCryptoCipherAlgo), whether or not a
/// build of it can use them.
const QEMU_CIPHER_ALGS: &[&str] = &[
    "aes-128",
    "aes-192",
    "aes-256",
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
];

/// Parses `iter-time` (milliseconds). 0, as in qemu, asks for no time at all: the key slot and
/// the master key digest get the minimum iterations.
///
/// # Errors
/// When it is not a number.
pub fn parse_iter_time(value: &str) -> Result<u64, Error> {
    value.parse::<u64>().map_err(|_| {
        Error::InvalidOption(format!(
            "Parameter 'iter-time' expects a number of milliseconds, not '{value}'"
        ))
    })
}

/// PBKDF2 iterations that take `ms` milliseconds producing `out_len` bytes, divided by
/// `divisor`, at least `min` (qemu's arithmetic; no time at all is the minimum, unmeasured).
fn iterations_for(hash: HashAlg, out_len: usize, ms: u64, divisor: u64, min: u64) -> u32 {
    if ms == 0 {
        return u32::try_from(min).unwrap_or(u32::MAX);
    }
    let per_sec = hash.pbkdf2_iterations_per_second(out_len);
    let n = u128::from(per_sec) * u128::from(ms) / 1000 / u128::from(divisor.max(1));
    u32::try_from(n.max(u128::from(min))).unwrap_or(u32::MAX)
}

fn random_uuid() -> Result<String, Error> {
    let mut b = [0u8; 16];
    super::random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

impl Header {
    /// Checks a raw header as qemu's `qcrypto_block_luks_check_header` does.
    ///
    /// # Errors
    /// The specific [`Error`] for the first field found wrong.
    pub fn from_raw(r: &RawHeader) -> Result<Header, Error> {
        if r.magic != MAGIC {
            return Err(Error::BadMagic);
        }
        if r.version != VERSION {
            return Err(Error::UnsupportedVersion(r.version));
        }
        let cipher_name = field_str(&r.cipher_name);
        let (mode, ivgen, ivgen_hash) = parse_mode(&field_str(&r.cipher_mode))?;
        let hash = HashAlg::parse(&field_str(&r.hash_spec))?;
        let key_bytes = usize::try_from(r.key_bytes).unwrap_or(usize::MAX);
        let bad_len = || Error::BadKeyLength {
            cipher: cipher_name.clone(),
            key_bytes: r.key_bytes,
        };
        if !CipherAlg::ALL.iter().any(|a| a.luks_name() == cipher_name) {
            return Err(Error::UnsupportedCipher(cipher_name));
        }
        if key_bytes > MAX_KEY_BYTES || key_bytes % mode.keys() != 0 {
            return Err(bad_len());
        }
        let alg =
            CipherAlg::from_luks(&cipher_name, key_bytes / mode.keys()).ok_or_else(bad_len)?;
        let spec = CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash,
        };
        spec.validate()?;
        if r.mk_digest_iterations == 0 {
            return Err(Error::ZeroIterations("the master key digest"));
        }
        let payload_offset = u64::from(r.payload_offset) * SECTOR_SIZE;
        let mut slots = [Slot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: STRIPES,
        }; NUM_KEY_SLOTS];
        for (i, (s, raw)) in slots.iter_mut().zip(&r.key_slots).enumerate() {
            if raw.stripes != STRIPES {
                return Err(Error::BadStripes {
                    slot: i,
                    stripes: raw.stripes,
                });
            }
            let active = match raw.active {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                state => return Err(Error::BadSlotState { slot: i, state }),
            };
            if active && raw.iterations == 0 {
                return Err(Error::ZeroIterations("a key slot"));
            }
            let start = u64::from(raw.key_material_offset) * SECTOR_SIZE;
            if start < KEY_SLOT_OFFSET {
                return Err(Error::SlotOverlapsHeader(i));
            }
            if start + material_span(key_bytes, STRIPES) > payload_offset {
                return Err(Error::SlotOverlapsPayload(i));
            }
            *s = Slot {
                active,
                iterations: raw.iterations,
                salt: raw.salt,
                key_offset: start,
                stripes: raw.stripes,
            };
        }
        let span = material_span(key_bytes, STRIPES);
        for i in 0..NUM_KEY_SLOTS {
            for j in i + 1..NUM_KEY_SLOTS {
                let (a, b) = (slots[i].key_offset, slots[j].key_offset);
                if a < b + span && b < a + span {
                    return Err(Error::SlotsOverlap(i, j));
                }
            }
        }
        let h = Header {
            spec,
            hash,
            payload_offset,
            key_bytes,
            mk_digest: r.mk_digest,
            mk_salt: r.mk_digest_salt,
            mk_iterations: r.mk_digest_iterations,
            uuid: field_str(&r.uuid),
            slots,
        };
        if h.key_area_len() > MAX_HEADER_AREA {
            return Err(Error::HeaderTooLarge(h.key_area_len()));
        }
        Ok(h)
    }

    /// The stored form.
    pub fn to_raw(&self) -> RawHeader {
        let sectors = |b: u64| u32::try_from(b / SECTOR_SIZE).unwrap_or(u32::MAX);
        let mut key_slots = [RawSlot {
            active: SLOT_INACTIVE,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset: 0,
            stripes: STRIPES,
        }; NUM_KEY_SLOTS];
        for (raw, s) in key_slots.iter_mut().zip(&self.slots) {
            *raw = RawSlot {
                active: if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE },
                iterations: s.iterations,
                salt: s.salt,
                key_material_offset: sectors(s.key_offset),
                stripes: s.stripes,
            };
        }
        RawHeader {
            magic: MAGIC,
            version: VERSION,
            cipher_name: str_field(self.spec.alg.luks_name()),
            cipher_mode: str_field(&mode_string(&self.spec)),
            hash_spec: str_field(self.hash.name()),
            payload_offset: sectors(self.payload_offset),
            key_bytes: u32::try_from(self.key_bytes).unwrap_or(u32::MAX),
            mk_digest: self.mk_digest,
            mk_digest_salt: self.mk_salt,
            mk_digest_iterations: self.mk_iterations,
            uuid: str_field(&self.uuid),
            key_slots,
        }
    }

    /// Parses and checks the header at the start of `b`.
    ///
    /// # Errors
    /// As [`RawHeader::parse`] and [`Header::from_raw`].
    pub fn parse(b: &[u8]) -> Result<Header, Error> {
        Header::from_raw(&RawHeader::parse(b)?)
    }

    /// Bytes of one slot's key material (before rounding to sectors).
    fn material_len(&self) -> usize {
        self.key_bytes * STRIPES as usize
    }

    /// Bytes of one slot's key material rounded up to whole sectors, as it is encrypted.
    fn material_sectors_len(&self) -> usize {
        self.material_len().div_ceil(SECTOR_BYTES) * SECTOR_BYTES
    }

    /// How many bytes from the header's start the caller must read for [`Header::unlock`]: to
    /// the end of the last slot's key material.
    pub fn key_area_len(&self) -> u64 {
        let span = self.material_sectors_len() as u64;
        self.slots
            .iter()
            .map(|s| s.key_offset + span)
            .max()
            .unwrap_or(HEADER_LEN as u64)
            .max(HEADER_LEN as u64)
    }

    /// Whether `mk` is the master key (its PBKDF2 equals the stored digest).
    pub fn check_master_key(&self, mk: &[u8]) -> bool {
        let mut d = [0u8; DIGEST_LEN];
        self.hash
            .pbkdf2(mk, &self.mk_salt, self.mk_iterations, &mut d);
        d.iter()
            .zip(&self.mk_digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    fn slot_range(&self, slot: usize, area_len: usize) -> Result<std::ops::Range<usize>, Error> {
        let s = &self.slots[slot];
        let start = usize::try_from(s.key_offset).map_err(|_| Error::SlotOverlapsPayload(slot))?;
        let end = start + self.material_sectors_len();
        if end > area_len {
            return Err(Error::Truncated(area_len));
        }
        Ok(start..end)
    }

    /// Tries the passphrase on one slot; the master key when it opens.
    fn try_slot(&self, area: &[u8], slot: usize, pass: &[u8]) -> Result<Option<MasterKey>, Error> {
        let s = &self.slots[slot];
        if !s.active {
            return Ok(None);
        }
        let mut slot_key = Zeroizing::new(vec![0u8; self.key_bytes]);
        self.hash.pbkdf2(pass, &s.salt, s.iterations, &mut slot_key);
        let range = self.slot_range(slot, area.len())?;
        let mut material = Zeroizing::new(area[range].to_vec());
        DataCipher::new(self.spec, &slot_key)?.decrypt(0, &mut material)?;
        let mk = af::merge(
            self.hash,
            &material[..self.material_len()],
            self.key_bytes,
            s.stripes,
        );
        Ok(self.check_master_key(&mk).then_some(mk))
    }

    /// Refuses a header whose slots would cost more than [`MAX_UNLOCK_ITERATIONS`] to try, before
    /// any is tried.
    fn check_unlock_cost(&self) -> Result<(), Error> {
        let total: u64 = self
            .slots
            .iter()
            .filter(|s| s.active)
            .map(|s| u64::from(s.iterations) + u64::from(self.mk_iterations))
            .sum();
        if total > MAX_UNLOCK_ITERATIONS {
            return Err(Error::TooManyIterations(total));
        }
        Ok(())
    }

    /// Finds the slot the passphrase opens; returns the master key and the slot number.
    ///
    /// # Errors
    /// [`Error::WrongPassphrase`] when no active slot opens; [`Error::Truncated`] when `area`
    /// ends before the key material; [`Error::TooManyIterations`] when trying the slots would
    /// cost more than [`MAX_UNLOCK_ITERATIONS`].
    pub fn unlock(&self, area: &[u8], pass: &[u8]) -> Result<(MasterKey, usize), Error> {
        self.check_unlock_cost()?;
        for i in 0..NUM_KEY_SLOTS {
            if let Some(mk) = self.try_slot(area, i, pass)? {
                return Ok((mk, i));
            }
        }
        Err(Error::WrongPassphrase)
    }

    /// Every active slot the passphrase opens.
    ///
    /// # Errors
    /// As [`Header::unlock`], except that no match is an empty list.
    pub fn slots_opened_by(&self, area: &[u8], pass: &[u8]) -> Result<Vec<usize>, Error> {
        self.check_unlock_cost()?;
        let mut v = Vec::new();
        for i in 0..NUM_KEY_SLOTS {
            if self.try_slot(area, i, pass)?.is_some() {
                v.push(i);
            }
        }
        Ok(v)
    }

    /// The payload cipher for a master key.
    ///
    /// # Errors
    /// When the key does not fit the cipher.
    pub fn data_cipher(&self, mk: &[u8]) -> Result<DataCipher, Error> {
        DataCipher::new(self.spec, mk)
    }

    /// A new header with a random master key in slot 0, laid out as qemu does (slot material
    /// from 4 KiB, each slot's rounded to 4 KiB, the payload right after slot 7). Returns the
    /// header, the header area (`payload_offset` bytes: header, then key material; unused
    /// slots are zeroes) and the master key.
    ///
    /// # Errors
    /// When the options make no usable volume, or the random source fails.
    pub fn create(p: &CreateParams, pass: &[u8]) -> Result<(Header, MasterKey, MasterKey), Error> {
        p.validate()?;
        let key_bytes = p.spec.key_len();
        let mut mk = Zeroizing::new(vec![0u8; key_bytes]);
        super::random_bytes(&mut mk)?;
        let mut mk_salt = [0u8; SALT_LEN];
        super::random_bytes(&mut mk_salt)?;
        let mk_iterations = iterations_for(
            p.hash,
            DIGEST_LEN,
            p.iter_time_ms,
            DIGEST_TIME_DIVISOR,
            MIN_MASTER_KEY_ITERS,
        );
        let mut mk_digest = [0u8; DIGEST_LEN];
        p.hash.pbkdf2(&mk, &mk_salt, mk_iterations, &mut mk_digest);
        let span = material_span(key_bytes, STRIPES);
        let mut slots = [Slot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: STRIPES,
        }; NUM_KEY_SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            s.key_offset = KEY_SLOT_OFFSET + i as u64 * span;
        }
        let payload_offset = p.header_area_len();
        let mut h = Header {
            spec: p.spec,
            hash: p.hash,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid: random_uuid()?,
            slots,
        };
        let len =
            usize::try_from(payload_offset).map_err(|_| Error::HeaderTooLarge(payload_offset))?;
        let mut area = Zeroizing::new(vec![0u8; len]);
        h.store_key(&mut area, 0, pass, &mk, p.iter_time_ms)?;
        Ok((h, area, mk))
    }

    /// Fills slot `slot` with the master key under a new passphrase and writes the header into
    /// the area's first bytes.
    ///
    /// # Errors
    /// When the area is too short or the random source fails.
    pub fn store_key(
        &mut self,
        area: &mut [u8],
        slot: usize,
        pass: &[u8],
        mk: &[u8],
        iter_time_ms: u64,
    ) -> Result<(), Error> {
        let range = self.slot_range(slot, area.len())?;
        let mut salt = [0u8; SALT_LEN];
        super::random_bytes(&mut salt)?;
        let iterations = iterations_for(self.hash, self.key_bytes, iter_time_ms, 1, MIN_SLOT_ITERS);
        let mut slot_key = Zeroizing::new(vec![0u8; self.key_bytes]);
        self.hash.pbkdf2(pass, &salt, iterations, &mut slot_key);
        let split = af::split(self.hash, mk, STRIPES)?;
        let mut material = Zeroizing::new(vec![0u8; range.len()]);
        material[..split.len()].copy_from_slice(&split);
        DataCipher::new(self.spec, &slot_key)?.encrypt(0, &mut material)?;
        area[range].copy_from_slice(&material);
        self.slots[slot] = Slot {
            active: true,
            iterations,
            salt,
            key_offset: self.slots[slot].key_offset,
            stripes: STRIPES,
        };
        area[..HEADER_LEN].copy_from_slice(&self.to_raw().to_bytes());
        Ok(())
    }

    /// Destroys slot `slot`: its key material is overwritten with random bytes and the slot is
    /// marked free (qemu's `qcrypto_block_luks_erase_key`).
    ///
    /// # Errors
    /// When the area is too short or the random source fails.
    pub fn erase_key(&mut self, area: &mut [u8], slot: usize) -> Result<(), Error> {
        let range = self.slot_range(slot, area.len())?;
        super::random_bytes(&mut area[range])?;
        self.slots[slot].active = false;
        self.slots[slot].iterations = 0;
        self.slots[slot].salt = [0; SALT_LEN];
        area[..HEADER_LEN].copy_from_slice(&self.to_raw().to_bytes());
        Ok(())
    }

    /// What `info` shows.
    pub fn info(&self) -> LuksInfo {
        LuksInfo {
            cipher_alg: self.spec.alg.name(),
            cipher_mode: self.spec.mode.name(),
            ivgen_alg: self.spec.ivgen.name(),
            ivgen_hash_alg: (self.spec.ivgen == IvGenAlg::Essiv)
                .then_some(self.spec.ivgen_hash.name()),
            hash_alg: self.hash.name(),
            detached_header: false,
            payload_offset: self.payload_offset,
            master_key_iters: self.mk_iterations,
            uuid: self.uuid.clone(),
            slots: self
                .slots
                .iter()
                .map(|s| LuksSlotInfo {
                    active: s.active,
                    iters: s.active.then_some(s.iterations),
                    stripes: s.active.then_some(s.stripes),
                    key_offset: s.key_offset,
                })
                .collect(),
        }
    }
}

/// A LUKS header as `info` shows it (qemu's `QCryptoBlockInfoLUKS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksInfo {
    /// `aes-256`.
    pub cipher_alg: &'static str,
    /// `xts`.
    pub cipher_mode: &'static str,
    /// `plain64`.
    pub ivgen_alg: &'static str,
    /// ESSIV's hash.
    pub ivgen_hash_alg: Option<&'static str>,
    /// `sha256`.
    pub hash_alg: &'static str,
    /// The header is in a separate file (never, here).
    pub detached_header: bool,
    /// Start of the payload in bytes from the header.
    pub payload_offset: u64,
    /// Master-key digest iterations.
    pub master_key_iters: u32,
    /// Volume UUID.
    pub uuid: String,
    /// The eight key slots.
    pub slots: Vec<LuksSlotInfo>,
}

/// One key slot in `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksSlotInfo {
    /// In use.
    pub active: bool,
    /// PBKDF2 iterations (active slots).
    pub iters: Option<u32>,
    /// Stripes (active slots).
    pub stripes: Option<u32>,
    /// Offset of the key material in bytes.
    pub key_offset: u64,
}

/// Key-slot changes `amend` asks for (qemu's `encrypt.state`, `keyslot`, `new-secret`,
/// `old-secret`, `iter-time`).
#[derive(Debug, Clone, Default)]
pub struct SlotChange {
    /// `active` adds a passphrase, `inactive` erases slots.
    pub state: Option<bool>,
    /// The slot to fill or erase.
    pub keyslot: Option<usize>,
    /// The passphrase to add.
    pub new_secret: Option<super::Secret>,
    /// The passphrase whose slots to erase.
    pub old_secret: Option<super::Secret>,
    /// PBKDF2 time for a new slot.
    pub iter_time_ms: Option<u64>,
    /// Allow erasing the last active slot (qemu-img amend --force).
    pub force: bool,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidOption(msg.into())
}

impl SlotChange {
    /// Applies one amend option (name without `encrypt.`); false for names it does not know.
    /// Secrets are looked up by the option's name in `secrets`.
    ///
    /// # Errors
    /// When a value is malformed.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, Error> {
        match key {
            "state" => {
                self.state = Some(match value {
                    "active" => true,
                    "inactive" => false,
                    _ => {
                        return Err(invalid(format!(
                            "Parameter 'state' does not accept value '{value}'"
                        )))
                    }
                })
            }
            "keyslot" => {
                let n: usize = value
                    .parse()
                    .ok()
                    .filter(|&n| n < NUM_KEY_SLOTS)
                    .ok_or_else(|| {
                        invalid(format!(
                            "Invalid keyslot {value} specified, must be between 0 and {}",
                            NUM_KEY_SLOTS - 1
                        ))
                    })?;
                self.keyslot = Some(n);
            }
            "iter-time" => self.iter_time_ms = Some(parse_iter_time(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Applies the change to a header area, with the master key (from unlocking the image).
    /// Returns the slots written.
    ///
    /// # Errors
    /// With qemu's messages for what it refuses.
    pub fn apply(&self, h: &mut Header, area: &mut [u8], mk: &[u8]) -> Result<Vec<usize>, Error> {
        let state = self
            .state
            .ok_or_else(|| invalid("Parameter 'encrypt.state' is required to amend key slots"))?;
        if state {
            let new = self
                .new_secret
                .as_ref()
                .ok_or_else(|| invalid("'new-secret' is required to activate a keyslot"))?;
            if self.old_secret.is_some() {
                return Err(invalid(
                    "'old-secret' must not be given when activating keyslots",
                ));
            }
            let slot = match self.keyslot {
                Some(s) if h.slots[s].active => {
                    return Err(invalid(format!(
                        "Refusing to overwrite active keyslot {s} - please erase it first"
                    )))
                }
                Some(s) => s,
                None => h
                    .slots
                    .iter()
                    .position(|s| !s.active)
                    .ok_or_else(|| invalid("Can't add a keyslot - all keyslots are in use"))?,
            };
            let it = self.iter_time_ms.unwrap_or(DEFAULT_ITER_TIME_MS);
            h.store_key(area, slot, new.bytes(), mk, it)?;
            return Ok(vec![slot]);
        }
        if self.new_secret.is_some() {
            return Err(invalid(
                "'new-secret' must not be given when erasing keyslots",
            ));
        }
        if self.iter_time_ms.is_some() {
            return Err(invalid(
                "'iter-time' must not be given when erasing keyslots",
            ));
        }
        let active = h.slots.iter().filter(|s| s.active).count();
        let victims = match (&self.old_secret, self.keyslot) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "'keyslot' and 'old-secret' must not be given together when erasing keyslots",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "'keyslot' or 'old-secret' is required when erasing keyslots",
                ))
            }
            (None, Some(s)) => {
                if !h.slots[s].active {
                    return Err(invalid(format!(
                        "Given keyslot {s} is already erased (inactive) "
                    )));
                }
                if active == 1 && !self.force {
                    return Err(invalid(format!(
                        "Attempt to erase the only active keyslot {s} which will erase all the data in the image irreversibly - refusing operation"
                    )));
                }
                vec![s]
            }
            (Some(old), None) => {
                let v = h.slots_opened_by(area, old.bytes())?;
                if v.is_empty() {
                    return Err(invalid(
                        "Didn't erase a keyslot, because no keyslots match the given (old) password for erase operation",
                    ));
                }
                if v.len() == active && !self.force {
                    return Err(invalid(
                        "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation",
                    ));
                }
                v
            }
        };
        for &s in &victims {
            h.erase_key(area, s)?;
        }
        Ok(victims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> CreateParams {
        CreateParams {
            iter_time_ms: 1,
            ..CreateParams::default()
        }
    }

    #[test]
    fn iter_time_zero_gives_the_minimum_iterations_as_in_qemu() {
        let p = CreateParams {
            iter_time_ms: parse_iter_time("0").unwrap(),
            ..CreateParams::default()
        };
        let (h, area, mk) = Header::create(&p, b"pw").unwrap();
        assert_eq!(u64::from(h.mk_iterations), MIN_MASTER_KEY_ITERS);
        assert_eq!(u64::from(h.slots[0].iterations), MIN_SLOT_ITERS);
        assert_eq!(&h.unlock(&area, b"pw").unwrap().0[..], &mk[..]);
        for bad in ["-1", "1.5", "abc", ""] {
            assert!(parse_iter_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_then_unlock_gives_the_master_key() {
        let (h, area, mk) = Header::create(&fast(), b"pw").unwrap();
        assert_eq!(h.payload_offset, 2_068_480);
        assert_eq!(h.slots[1].key_offset, 262_144);
        let (got, slot) = h.unlock(&area, b"pw").unwrap();
        assert_eq!(slot, 0);
        assert_eq!(&got[..], &mk[..]);
        assert!(matches!(
            h.unlock(&area, b"wrong"),
            Err(Error::WrongPassphrase)
        ));
    }

    #[test]
    fn every_cipher_mode_and_hash_creates_and_unlocks() {
        let mut made = 0;
        for alg in CipherAlg::ALL {
            for mode in CipherMode::ALL {
                let p = CreateParams {
                    spec: CipherSpec {
                        alg,
                        mode,
                        ..fast().spec
                    },
                    ..fast()
                };
                let r = Header::create(&p, b"pw");
                if !alg.supports(mode) {
                    assert!(matches!(r, Err(Error::ModeNotForCipher { .. })), "{p:?}");
                    continue;
                }
                if alg.key_len() == 24 && mode != CipherMode::Xts {
                    assert!(matches!(r, Err(Error::InvalidOption(_))), "{p:?}");
                    continue;
                }
                let (h, area, mk) = r.unwrap();
                assert_eq!(field_str(&area[8..40]), alg.luks_name());
                assert_eq!(Header::parse(&area).unwrap(), h);
                assert_eq!(&h.unlock(&area, b"pw").unwrap().0[..], &mk[..], "{p:?}");
                made += 1;
            }
        }
        // 30 = 10 ciphers x 4 modes, less cast5-xts and the nine 192-bit non-XTS pairs.
        assert_eq!(made, 30);
        for hash in HashAlg::ALL {
            let p = CreateParams { hash, ..fast() };
            let (h, area, mk) = Header::create(&p, b"pw").unwrap();
            assert_eq!(field_str(&area[72..104]), hash.name());
            assert_eq!(&h.unlock(&area, b"pw").unwrap().0[..], &mk[..], "{p:?}");
        }
    }

    #[test]
    fn create_refuses_essiv_without_a_cipher() {
        let mut p = fast();
        p.spec.ivgen = IvGenAlg::Essiv;
        p.spec.ivgen_hash = HashAlg::Sha512;
        assert!(matches!(
            Header::create(&p, b"pw"),
            Err(Error::NoEssivCipher { key_len: 64, .. })
        ));
    }

    #[test]
    fn raw_header_round_trips_bytes() {
        let (_, area, _) = Header::create(&fast(), b"pw").unwrap();
        let raw = RawHeader::parse(&area).unwrap();
        assert_eq!(raw.to_bytes()[..], area[..HEADER_LEN]);
        let h = Header::from_raw(&raw).unwrap();
        assert_eq!(h.to_raw(), raw);
    }

    fn flipped(patch: impl FnOnce(&mut [u8])) -> Error {
        let (_, mut area, _) = Header::create(&fast(), b"pw").unwrap();
        patch(&mut area);
        Header::parse(&area).unwrap_err()
    }

    #[test]
    fn corrupt_fields_give_specific_errors() {
        assert!(matches!(flipped(|b| b[0] = b'X'), Error::BadMagic));
        assert!(matches!(
            flipped(|b| b[7] = 2),
            Error::UnsupportedVersion(2)
        ));
        assert!(matches!(
            flipped(|b| b[8..11].copy_from_slice(b"xyz")),
            Error::UnsupportedCipher(_)
        ));
        assert!(matches!(
            flipped(|b| b[40..43].copy_from_slice(b"ofb")),
            Error::UnsupportedMode(_)
        ));
        // cast5 has no 256-bit key (the default header is a 64-byte XTS key)...
        assert!(matches!(
            flipped(|b| b[8..13].copy_from_slice(b"cast5")),
            Error::BadKeyLength { .. }
        ));
        // ...and with a 128-bit key, no XTS.
        assert!(matches!(
            flipped(|b| {
                b[8..13].copy_from_slice(b"cast5");
                b[108..112].copy_from_slice(&32u32.to_be_bytes());
            }),
            Error::ModeNotForCipher {
                cipher: "cast5-128",
                mode: "xts"
            }
        ));
        assert!(matches!(
            flipped(|b| b[72..75].copy_from_slice(b"xyz")),
            Error::UnsupportedHash(_)
        ));
        assert!(matches!(
            flipped(|b| b[108..112].copy_from_slice(&40u32.to_be_bytes())),
            Error::BadKeyLength { .. }
        ));
        assert!(matches!(
            flipped(|b| b[208 + 44..208 + 48].copy_from_slice(&3999u32.to_be_bytes())),
            Error::BadStripes { slot: 0, .. }
        ));
        assert!(matches!(
            flipped(|b| b[208..212].copy_from_slice(&7u32.to_be_bytes())),
            Error::BadSlotState { slot: 0, state: 7 }
        ));
        assert!(matches!(
            flipped(|b| b[208 + 48 + 40..208 + 48 + 44].copy_from_slice(&8u32.to_be_bytes())),
            Error::SlotsOverlap(0, 1)
        ));
        assert!(matches!(
            flipped(|b| b[104..108].copy_from_slice(&100u32.to_be_bytes())),
            Error::SlotOverlapsPayload(_)
        ));
        assert!(matches!(
            flipped(|b| b[164..168].copy_from_slice(&0u32.to_be_bytes())),
            Error::ZeroIterations(_)
        ));
    }

    #[test]
    fn amend_adds_then_erases_a_slot() {
        let (mut h, mut area, mk) = Header::create(&fast(), b"one").unwrap();
        let add = SlotChange {
            state: Some(true),
            new_secret: Some("two".into()),
            iter_time_ms: Some(1),
            ..SlotChange::default()
        };
        assert_eq!(add.apply(&mut h, &mut area, &mk).unwrap(), vec![1]);
        assert_eq!(h.unlock(&area, b"two").unwrap().1, 1);
        let erase = SlotChange {
            state: Some(false),
            old_secret: Some("one".into()),
            ..SlotChange::default()
        };
        assert_eq!(erase.apply(&mut h, &mut area, &mk).unwrap(), vec![0]);
        assert!(matches!(
            h.unlock(&area, b"one"),
            Err(Error::WrongPassphrase)
        ));
        // The last slot is protected.
        let last = SlotChange {
            state: Some(false),
            keyslot: Some(1),
            ..SlotChange::default()
        };
        assert!(last.apply(&mut h, &mut area, &mk).is_err());
        assert_eq!(Header::parse(&area).unwrap(), h);
    }
}
