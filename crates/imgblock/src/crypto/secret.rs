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
    /// Every secret defined (`--object secret,id=ID,...`), by ID: what a `json:` name's
    /// `encrypt.key-secret` finds.
    objects: BTreeMap<String, Secret>,
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

    /// Makes the secrets defined by ID available to `json:` names' `encrypt.key-secret`.
    pub fn set_objects(&mut self, objects: BTreeMap<String, Secret>) {
        self.objects = objects;
    }

    /// The secret defined with this ID.
    pub fn object(&self, id: &str) -> Option<&Secret> {
        self.objects.get(id)
    }

    /// The secrets of the chain that starts `depth` images down, for opening that image on its
    /// own (commit's base): its layer `depth` becomes layer 0; the default stays.
    pub fn below(&self, depth: usize) -> Secrets {
        Secrets {
            default: self.default.clone(),
            layers: self
                .layers
                .range(depth..)
                .map(|(d, s)| (d - depth, s.clone()))
                .collect(),
            metadata_only: self.metadata_only,
            objects: self.objects.clone(),
        }
    }
}

/// Parses one qemu `--object` definition, `secret,id=ID,data=STRING` or
/// `secret,id=ID,file=PATH`, with `format=raw` (the default) or `base64`, into its ID and bytes.
/// The error is qemu's message for the same mistake.
///
/// # Errors
/// Another object type, a missing or duplicated source, an unreadable file, bad base64.
pub fn parse_secret_object(def: &str) -> Result<(String, Secret), String> {
    let (kind, rest) = def.split_once(',').unwrap_or((def, ""));
    let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
    if kind.contains('=') {
        return Err("Parameter 'qom-type' is missing".into());
    }
    if kind != "secret" {
        return Err(format!(
            "Invalid object type '{kind}': only 'secret' objects are supported"
        ));
    }
    let (mut id, mut data, mut file, mut format) = (None, None, None, "raw".to_owned());
    for (k, v) in crate::options::split_opts(rest).map_err(|e| e.to_string())? {
        match k.as_str() {
            "id" => id = Some(v),
            "data" => data = Some(v),
            "file" => file = Some(v),
            "format" => format = v,
            "keyid" | "iv" => {
                return Err(
                    "secrets encrypted with another secret (keyid=, iv=) are not supported".into(),
                )
            }
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    let id = id.ok_or("Parameter 'id' is missing")?;
    let raw = match (data, file) {
        (Some(d), None) => Zeroizing::new(d.into_bytes()),
        (None, Some(f)) => Zeroizing::new(std::fs::read(&f).map_err(|e| {
            // C's strerror words, as qemu prints them.
            let msg = e.to_string();
            let msg = msg
                .split(" (os error ")
                .next()
                .unwrap_or_default()
                .to_owned();
            format!("Unable to read {f}: {msg}")
        })?),
        (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
        (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
    };
    let bytes = match format.as_str() {
        "raw" => raw.to_vec(),
        "base64" => {
            // qemu takes nothing but the alphabet and padding (no whitespace).
            if !raw
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || b"+/=".contains(&c))
            {
                return Err("Base64 data contains invalid characters".into());
            }
            base64_decode(&raw).ok_or_else(|| format!("Secret '{id}': invalid base64 data"))?
        }
        other => {
            return Err(format!(
                "Parameter 'format' does not accept value '{other}'"
            ))
        }
    };
    Ok((id, Secret::new(bytes)))
}

/// Standard base64 (RFC 4648, with optional padding; whitespace ignored).
fn base64_decode(input: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let body = input
        .strip_suffix(b"==")
        .or_else(|| input.strip_suffix(b"="))
        .unwrap_or(input);
    if body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | val(c)?;
        }
        let bytes = (acc << (6 * (4 - chunk.len()))).to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
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

    #[test]
    fn secrets_below_renumbers_layers_and_keeps_default() {
        let mut s = Secrets::none();
        s.set_layer(0, Secret::from("top"));
        s.set_layer(2, Secret::from("base"));
        let b = s.below(2);
        assert_eq!(b.for_layer(0).unwrap().bytes(), b"base");
        assert!(b.for_layer(1).is_none());
        let mut s = Secrets::all(Secret::from("d"));
        s.set_layer(1, Secret::from("mid"));
        let b = s.below(1);
        assert_eq!(b.for_layer(0).unwrap().bytes(), b"mid");
        assert_eq!(b.for_layer(1).unwrap().bytes(), b"d");
    }

    #[test]
    fn parse_object_data_and_base64() {
        let (id, s) = parse_secret_object("secret,id=s0,data=pw").unwrap();
        assert_eq!((id.as_str(), s.bytes()), ("s0", &b"pw"[..]));
        let (_, s) =
            parse_secret_object("secret,id=s1,data=aGVsbG8gd29ybGQ=,format=base64").unwrap();
        assert_eq!(s.bytes(), b"hello world");
        assert!(parse_secret_object("secret,id=s2").is_err());
        assert!(parse_secret_object("throttle-group,id=t").is_err());
    }

    #[test]
    fn base64_decode_handles_padding() {
        assert_eq!(base64_decode(b"YQ==").unwrap(), b"a");
        assert_eq!(base64_decode(b"YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode(b"YWJj").unwrap(), b"abc");
        assert!(base64_decode(b"Y").is_none());
        assert!(base64_decode(b"Y!==").is_none());
    }
}
