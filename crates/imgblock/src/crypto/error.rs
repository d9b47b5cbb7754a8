//! What can go wrong with an encryption header, a key or a cipher specification.

/// A malformed LUKS header, a refused cipher specification, or a key that does not fit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The header area is shorter than a LUKS1 header.
    #[error("LUKS header is truncated ({0} bytes)")]
    Truncated(usize),
    /// The first six bytes are not `LUKS\xba\xbe`.
    #[error("Volume is not in LUKS format")]
    BadMagic,
    /// Only LUKS version 1 is implemented (qemu reads only version 1 too).
    #[error("LUKS version {0} is not supported")]
    UnsupportedVersion(u16),
    /// A cipher algorithm qemu's LUKS does not offer (aes, twofish, serpent, cast5 are).
    #[error("Algorithm '{0}' not supported")]
    UnsupportedCipher(String),
    /// A cipher mode other than ecb, cbc, xts and ctr.
    #[error("Unsupported cipher mode {0}")]
    UnsupportedMode(String),
    /// A mode the cipher cannot run in: XTS needs a 128-bit block, which CAST5 does not have
    /// (qemu refuses it with "Unsupported cipher mode xts").
    #[error("Unsupported cipher mode {mode} for {cipher}: {mode} needs a 128-bit block cipher")]
    ModeNotForCipher {
        /// The cipher (`cast5-128`).
        cipher: &'static str,
        /// The mode (`xts`).
        mode: &'static str,
    },
    /// An IV generator other than plain, plain64 and essiv.
    #[error("Unsupported IV generator '{0}'")]
    UnsupportedIvGen(String),
    /// A hash other than md5, sha1, sha224, sha256, sha384, sha512, ripemd160 and sm3.
    #[error("Hash algorithm '{0}' not supported")]
    UnsupportedHash(String),
    /// The cipher mode field has no `-ivgen` part.
    #[error("Unexpected cipher mode string format '{0}'")]
    BadCipherModeString(String),
    /// ESSIV needs a cipher of the data cipher's family whose key is as long as the hash's
    /// digest (qemu's message).
    #[error("No {family} cipher with key size {key_len} available")]
    NoEssivCipher {
        /// The family (`AES`, `Twofish`, `Serpent`).
        family: &'static str,
        /// The digest length, in bytes, that no key size of the family has.
        key_len: usize,
    },
    /// ESSIV with a cipher qemu only allows with a hash as long as its key (CAST5).
    #[error("Cipher {0} not supported with essiv")]
    EssivUnsupported(&'static str),
    /// key_bytes disagrees with the cipher (`aes` with 40 bytes, `cast5` with 32, say).
    #[error("Invalid key length {key_bytes} for cipher '{cipher}'")]
    BadKeyLength {
        /// The cipher name from the header.
        cipher: String,
        /// The key length from the header.
        key_bytes: u32,
    },
    /// A key slot whose stripes are not 4000, as qemu and cryptsetup require.
    #[error("Keyslot {slot} is corrupted (stripes {stripes} != 4000)")]
    BadStripes {
        /// Slot number.
        slot: usize,
        /// Stripes found.
        stripes: u32,
    },
    /// A key slot that is neither active nor inactive.
    #[error("Keyslot {slot} state ({state:#x}) is corrupted")]
    BadSlotState {
        /// Slot number.
        slot: usize,
        /// The state word found.
        state: u32,
    },
    /// An active key slot with zero PBKDF2 iterations, or a zero master-key iteration count.
    #[error("{0} has an iteration count of zero")]
    ZeroIterations(&'static str),
    /// Key material that reaches into the payload or past the header area's limit.
    #[error("Keyslot {0} is overlapping with the encrypted payload")]
    SlotOverlapsPayload(usize),
    /// Key material that starts inside the 4 KiB header.
    #[error("Keyslot {0} is overlapping with the LUKS header")]
    SlotOverlapsHeader(usize),
    /// Two key slots share key material.
    #[error("Keyslots {0} and {1} are overlapping in the header")]
    SlotsOverlap(usize, usize),
    /// The header (with its key material) is larger than [`super::luks::MAX_HEADER_AREA`].
    #[error("LUKS header area of {0} bytes is too large")]
    HeaderTooLarge(u64),
    /// Trying the passphrase on every active key slot would run more PBKDF2 iterations than
    /// [`super::luks::MAX_UNLOCK_ITERATIONS`].
    #[error(
        "key slots ask for {0} PBKDF2 iterations in all, more than the {max} allowed",
        max = super::luks::MAX_UNLOCK_ITERATIONS
    )]
    TooManyIterations(u64),
    /// No active key slot opens with the passphrase (qemu's wording).
    #[error("Invalid password, cannot unlock any keyslot")]
    WrongPassphrase,
    /// A buffer handed to a cipher is not a whole number of sectors.
    #[error("encryption buffer of {0} bytes is not a whole number of 512-byte sectors")]
    Unaligned(usize),
    /// The operating system's random source failed.
    #[error("could not get random bytes: {0}")]
    Random(String),
    /// An option for creating or amending encryption is wrong (qemu's message).
    #[error("{0}")]
    InvalidOption(String),
}
