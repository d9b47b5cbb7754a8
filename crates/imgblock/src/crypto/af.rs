//! The LUKS anti-forensic splitter (qemu's crypto/afsplit.c, the LUKS1 spec's AFsplit/AFmerge):
//! a key becomes `stripes` blocks, all but the last random, chained through a hash diffusion, so
//! that erasing any one block destroys the key.

use zeroize::Zeroizing;

use super::{Error, HashAlg};

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// The diffusion step: each digest-sized piece `i` of `block` becomes `H(be32(i) || piece)`,
/// the last one truncated to the piece's length.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (i, piece) in block.chunks_mut(dl).enumerate() {
        let iv = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
        let d = Zeroizing::new(hash.digest(&[&iv, piece]));
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

/// Splits `key` into `stripes` blocks of `key.len()` bytes.
///
/// # Errors
/// When the random source fails.
pub fn split(hash: HashAlg, key: &[u8], stripes: u32) -> Result<Zeroizing<Vec<u8>>, Error> {
    let len = key.len();
    let stripes = usize::try_from(stripes).unwrap_or(0).max(1);
    let mut out = Zeroizing::new(vec![0u8; len * stripes]);
    let mut block = Zeroizing::new(vec![0u8; len]);
    super::random_bytes(&mut out[..len * (stripes - 1)])?;
    for stripe in out[..len * (stripes - 1)].chunks(len) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block);
    }
    let last = &mut out[len * (stripes - 1)..];
    last.copy_from_slice(key);
    xor_into(last, &block);
    Ok(out)
}

/// Recovers a `key_len`-byte key from `stripes` blocks (the inverse of [`split`]).
pub fn merge(hash: HashAlg, material: &[u8], key_len: usize, stripes: u32) -> Zeroizing<Vec<u8>> {
    let stripes = usize::try_from(stripes).unwrap_or(0).max(1);
    let mut block = Zeroizing::new(vec![0u8; key_len]);
    for stripe in material.chunks(key_len).take(stripes - 1) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block);
    }
    if let Some(last) = material.chunks(key_len).nth(stripes - 1) {
        xor_into(&mut block, last);
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_returns_the_key() {
        for hash in HashAlg::ALL {
            // 40 bytes: not a multiple of any digest, so the short last piece is exercised.
            let key: Vec<u8> = (0..40u8).collect();
            let m = split(hash, &key, 4000).unwrap();
            assert_eq!(m.len(), 40 * 4000);
            assert_eq!(&merge(hash, &m, 40, 4000)[..], &key[..]);
        }
    }

    #[test]
    fn flipping_one_stripe_loses_the_key() {
        let key = [7u8; 32];
        let mut m = split(HashAlg::Sha256, &key, 10).unwrap();
        m[5] ^= 1;
        assert_ne!(&merge(HashAlg::Sha256, &m, 32, 10)[..], &key[..]);
    }

    #[test]
    fn merge_matches_hand_computed_two_stripes() {
        // Two stripes: key = s1 ^ H(be32(0) || s0) for a key one digest long.
        let s0 = [1u8; 32];
        let s1 = [2u8; 32];
        let mut m = s0.to_vec();
        m.extend_from_slice(&s1);
        let h = HashAlg::Sha256.digest(&[&[0, 0, 0, 0], &s0]);
        let want: Vec<u8> = h.iter().zip(&s1).map(|(a, b)| a ^ b).collect();
        assert_eq!(&merge(HashAlg::Sha256, &m, 32, 2)[..], &want[..]);
    }
}
