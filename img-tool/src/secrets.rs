//! Secrets the way qemu-img takes them: `--object secret,id=ID,data=...|file=PATH[,format=raw|
//! base64]` resolved to bytes, and `--image-opts` image names such as
//! `driver=qcow2,file.filename=F,encrypt.key-secret=ID` resolved to a path, a format and the
//! passphrases of each layer of the backing chain.
//!
//! qemu gives each layer its own secret (`backing.encrypt.key-secret=ID` for the image below
//! the top, and so on). Here too; and a layer without its own secret tries the top image's, so
//! that a chain sharing one passphrase needs it named once. Legacy AES cannot tell a wrong
//! passphrase from a right one: such an image then reads as noise.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use imgblock::crypto::{Secret, Secrets};
use imgblock::{CreateOptions, Format};

use crate::failure::{CliResult, Failure};

/// `--object` and `--image-opts`, shared by the subcommands that open images.
#[derive(Debug, Clone, Default, Args)]
pub struct SecretArgs {
    /// Define a secret: secret,id=ID,data=STRING or secret,id=ID,file=PATH, with
    /// format=raw (default) or base64. May be repeated. A wrong LUKS passphrase is refused;
    /// legacy AES (encrypt.format=aes) cannot detect one and then reads as noise.
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub objects: Vec<String>,
    /// The image names are option lists: driver=FMT,file.filename=PATH,encrypt.key-secret=ID
    /// (key-secret=ID for luks; backing.encrypt.key-secret=ID for the backing image).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
}

/// An image name resolved: the file, the format (`driver=`), the secrets of its chain.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The image file.
    pub path: PathBuf,
    /// The format, when `driver=` or `-f` names it.
    pub format: Option<Format>,
    /// Passphrases by layer.
    pub secrets: Secrets,
}

impl SecretArgs {
    /// Every secret defined with `--object`, by ID.
    ///
    /// # Errors
    /// A malformed object, an unreadable file, bad base64, or an ID defined twice.
    pub fn secrets(&self) -> CliResult<BTreeMap<String, Secret>> {
        let mut out = BTreeMap::new();
        for def in &self.objects {
            let (id, secret) = parse_object(def)?;
            if out.insert(id.clone(), secret).is_some() {
                return Err(Failure::new(format!(
                    "attempt to add duplicate property '{id}' to object (type 'container')"
                )));
            }
        }
        Ok(out)
    }

    /// Resolves an image name (an option list with `--image-opts`, else a file name) with the
    /// format given by `-f`.
    ///
    /// # Errors
    /// Bad options, an unknown format or secret ID.
    pub fn resolve(&self, name: &str, format: Option<Format>) -> CliResult<ImageSpec> {
        if !self.image_opts {
            return Ok(ImageSpec {
                path: PathBuf::from(name),
                format,
                secrets: Secrets::none(),
            });
        }
        let defined = self.secrets()?;
        let lookup = |id: &str| {
            defined
                .get(id)
                .cloned()
                .ok_or_else(|| Failure::new(format!("No secret with id '{id}'")))
        };
        let mut path = None;
        let mut fmt = format;
        let mut secrets = Secrets::none();
        for (k, v) in imgblock::options::split_opts(name)? {
            let mut key = k.as_str();
            let mut depth = 0;
            while let Some(rest) = key.strip_prefix("backing.") {
                key = rest;
                depth += 1;
            }
            match key {
                "driver" if depth == 0 => {
                    fmt = Some(
                        v.parse::<Format>()
                            .map_err(|_| Failure::new(format!("Unknown driver '{v}'")))?,
                    );
                }
                "file.filename" | "filename" if depth == 0 => path = Some(PathBuf::from(v)),
                "file.driver" if v == "file" => {}
                "encrypt.key-secret" | "key-secret" => {
                    let s = lookup(&v)?;
                    if depth == 0 {
                        secrets.set_default(s.clone());
                    }
                    secrets.set_layer(depth, s);
                }
                "driver" | "file.driver" => {}
                _ => return Err(Failure::new(format!("Invalid parameter '{k}'"))),
            }
        }
        let path = path.ok_or_else(|| {
            Failure::new("A block device must be specified for \"file.filename\"")
        })?;
        Ok(ImageSpec {
            path,
            format: fmt,
            secrets,
        })
    }

    /// Puts the `--object` secrets into creation (or amend) options, where `encrypt.key-secret`
    /// and the like find them by ID.
    ///
    /// # Errors
    /// As [`SecretArgs::secrets`].
    pub fn fill(&self, opts: &mut CreateOptions) -> CliResult<()> {
        opts.secrets = self.secrets()?;
        Ok(())
    }
}

/// The secrets a newly created image is opened with: the one its own options name.
///
/// # Errors
/// When the option names an undefined secret.
pub fn for_new_image(opts: &CreateOptions) -> CliResult<Secrets> {
    for key in ["encrypt.key-secret", "key-secret"] {
        if let Some(s) = opts.secret(key)? {
            let mut out = Secrets::none();
            out.set_layer(0, s.clone());
            return Ok(out);
        }
    }
    Ok(Secrets::none())
}

/// Parses one `--object` definition into its ID and bytes.
fn parse_object(def: &str) -> CliResult<(String, Secret)> {
    let (kind, rest) = match def.split_once(',') {
        Some((k, r)) => (k, r),
        None => (def, ""),
    };
    let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
    if kind != "secret" {
        return Err(Failure::new(format!(
            "Invalid object type '{kind}': only 'secret' objects are supported"
        )));
    }
    let (mut id, mut data, mut file, mut format) = (None, None, None, "raw".to_owned());
    for (k, v) in imgblock::options::split_opts(rest)? {
        match k.as_str() {
            "id" => id = Some(v),
            "data" => data = Some(v),
            "file" => file = Some(v),
            "format" => format = v,
            "keyid" | "iv" => {
                return Err(Failure::new(
                    "secrets encrypted with another secret (keyid=, iv=) are not supported",
                ))
            }
            _ => return Err(Failure::new(format!("Invalid parameter '{k}'"))),
        }
    }
    let id = id.ok_or_else(|| Failure::new("Parameter 'id' is missing"))?;
    let raw = match (data, file) {
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| {
            Failure::new(format!(
                "Unable to read {f}: {}",
                crate::failure::strerror(&e)
            ))
        })?,
        (Some(_), Some(_)) => return Err(Failure::new("'data' and 'file' are mutually exclusive")),
        (None, None) => return Err(Failure::new("Either 'data' or 'file' must be provided")),
    };
    let bytes = match format.as_str() {
        "raw" => raw,
        "base64" => base64_decode(&raw)
            .ok_or_else(|| Failure::new(format!("Secret '{id}': invalid base64 data")))?,
        other => {
            return Err(Failure::new(format!(
                "Parameter 'format' does not accept value '{other}'"
            )))
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
    let clean: Vec<u8> = input
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let body = clean
        .strip_suffix(b"==")
        .or_else(|| clean.strip_suffix(b"="))
        .unwrap_or(&clean);
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
    fn parse_object_data_and_base64() {
        let (id, s) = parse_object("secret,id=s0,data=pw").unwrap();
        assert_eq!((id.as_str(), s.bytes()), ("s0", &b"pw"[..]));
        let (_, s) = parse_object("secret,id=s1,data=aGVsbG8gd29ybGQ=,format=base64").unwrap();
        assert_eq!(s.bytes(), b"hello world");
        assert!(parse_object("secret,id=s2").is_err());
        assert!(parse_object("throttle-group,id=t").is_err());
    }

    #[test]
    fn base64_decode_handles_padding() {
        assert_eq!(base64_decode(b"YQ==").unwrap(), b"a");
        assert_eq!(base64_decode(b"YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode(b"YWJj").unwrap(), b"abc");
        assert!(base64_decode(b"Y").is_none());
        assert!(base64_decode(b"Y!==").is_none());
    }

    #[test]
    fn resolve_image_opts_gives_path_format_and_layer_secrets() {
        let a = SecretArgs {
            objects: vec![
                "secret,id=s0,data=top".into(),
                "secret,id=s1,data=base".into(),
            ],
            image_opts: true,
        };
        let spec = a
            .resolve(
                "driver=qcow2,file.filename=x.qcow2,encrypt.key-secret=s0,backing.encrypt.key-secret=s1",
                None,
            )
            .unwrap();
        assert_eq!(spec.path, PathBuf::from("x.qcow2"));
        assert_eq!(spec.format, Some(Format::Qcow2));
        assert_eq!(spec.secrets.for_layer(0).unwrap().bytes(), b"top");
        assert_eq!(spec.secrets.for_layer(1).unwrap().bytes(), b"base");
        assert_eq!(spec.secrets.for_layer(2).unwrap().bytes(), b"top");
        assert!(a
            .resolve("driver=qcow2,file.filename=x,encrypt.key-secret=nope", None)
            .is_err());
    }
}
