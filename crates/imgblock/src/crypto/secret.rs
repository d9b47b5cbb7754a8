//! Passphrases: zeroed when dropped, never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

/// A passphrase (qemu's `secret` object, resolved to bytes). Its bytes are zeroed when the last
/// clone is dropped and `Debug` does not show them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<Zeroizing<Vec<u8>>>);

impl Secret {
    /// Wraps passphrase bytes.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Arc::new(Zeroizing::new(bytes)))
    }

    /// The passphrase bytes.
    pub fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The passphrases for the images of one backing chain.
///
/// qemu takes one `encrypt.key-secret` per layer (`backing.encrypt.key-secret=...` for the
/// image below the top, and so on). Here a layer's own secret is looked up by its depth in the
/// chain (0 = the top image); a layer without one uses the default secret, if any. An image
/// that is not encrypted ignores what it is given.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    default: Option<Secret>,
    layers: BTreeMap<usize, Secret>,
    /// Open encrypted images whose secret is missing anyway, for their metadata only (qemu-img
    /// info does this): reading or writing their data then fails.
    pub metadata_only: bool,
}

impl Secrets {
    /// No secrets: encrypted images fail to open.
    pub fn none() -> Secrets {
        Secrets::default()
    }

    /// No secrets, and encrypted images open for their metadata only.
    pub fn for_metadata() -> Secrets {
        Secrets {
            metadata_only: true,
            ..Secrets::default()
        }
    }

    /// One secret for every encrypted layer.
    pub fn all(secret: Secret) -> Secrets {
        Secrets {
            default: Some(secret),
            ..Secrets::default()
        }
    }

    /// Sets the secret every layer without its own uses.
    pub fn set_default(&mut self, secret: Secret) {
        self.default = Some(secret);
    }

    /// Sets the secret of the image at `depth` in the chain (0 = top).
    pub fn set_layer(&mut self, depth: usize, secret: Secret) {
        self.layers.insert(depth, secret);
    }

    /// The secret for the image at `depth`.
    pub fn for_layer(&self, depth: usize) -> Option<&Secret> {
        self.layers.get(&depth).or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_hides_bytes() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(s.bytes(), b"hunter2");
    }

    #[test]
    fn secrets_layer_overrides_default() {
        let mut s = Secrets::all(Secret::from("a"));
        s.set_layer(1, Secret::from("b"));
        assert_eq!(s.for_layer(0).unwrap().bytes(), b"a");
        assert_eq!(s.for_layer(1).unwrap().bytes(), b"b");
        assert!(Secrets::none().for_layer(0).is_none());
    }
}
