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
            let (id, secret) = imgblock::crypto::parse_secret_object(def).map_err(Failure::new)?;
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
        if self.image_opts {
            if format.is_some() {
                return Err(Failure::new(
                    "--image-opts and --format are mutually exclusive",
                ));
            }
            self.resolve_opts(name, format)
        } else {
            Ok(self.resolve_file(name, format))
        }
    }

    /// A plain file name: no layer secrets, though a `json:` name may name one by ID.
    pub fn resolve_file(&self, name: &str, format: Option<Format>) -> ImageSpec {
        let mut secrets = Secrets::none();
        // A bad definition is reported where the secrets are asked for by name.
        secrets.set_objects(self.secrets().unwrap_or_default());
        ImageSpec {
            path: PathBuf::from(name),
            format,
            secrets,
        }
    }

    /// Resolves an option list, whether or not `--image-opts` was given (convert's
    /// `--target-image-opts` names its own).
    ///
    /// # Errors
    /// As [`SecretArgs::resolve`].
    pub fn resolve_opts(&self, name: &str, format: Option<Format>) -> CliResult<ImageSpec> {
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
        secrets.set_objects(defined.clone());
        let mut window: Option<imgblock::raw::Window> = None;
        let mut protocol = None;
        // Options the block layer reads from a `json:` name: the backing node (`backing=` for
        // none, `backing.file.filename=` and the like for another), `encrypt.format`, and those
        // that only tune how qemu opens the file.
        let mut passed = serde_json::Map::new();
        // The backing node's own options (its secret aside).
        let mut backing = Vec::new();
        for (k, v) in imgblock::options::split_opts(name)? {
            let mut key = k.as_str();
            let mut depth = 0;
            while let Some(rest) = key.strip_prefix("backing.") {
                key = rest;
                depth += 1;
            }
            if depth > 0 && !["encrypt.key-secret", "key-secret"].contains(&key) {
                backing.push((k, v));
                continue;
            }
            match key {
                "driver" if depth == 0 => {
                    if ["file", "host_device", "host_cdrom"].contains(&v.as_str()) {
                        protocol = Some(v.clone());
                    }
                    fmt = Some(
                        v.parse::<Format>()
                            .map_err(|_| Failure::new(format!("Unknown driver '{v}'")))?,
                    );
                }
                "file.filename" | "filename" if depth == 0 => path = Some(PathBuf::from(v)),
                "file.driver" if v == "file" => {}
                // raw's window into its file: checked against the format when opened.
                "offset" | "size" if depth == 0 => {
                    let n = imgblock::options::parse_size_opt(key, &v)
                        .map_err(|e| Failure::new(format!("Could not open '{name}': {e}")))?;
                    let w = window.get_or_insert_with(Default::default);
                    let spelled = Some(serde_json::Value::from(v.as_str()).to_string());
                    if key == "offset" {
                        (w.offset, w.spelled.0) = (n, spelled);
                    } else {
                        (w.size, w.spelled.1) = (Some(n), spelled);
                    }
                }
                "encrypt.key-secret" | "key-secret" => {
                    let s = lookup(&v)?;
                    if depth == 0 {
                        secrets.set_default(s.clone());
                    }
                    secrets.set_layer(depth, s);
                }
                "driver" | "file.driver" => {}
                _ if passes_through(&k) => {
                    let value = if k == "backing" && v.is_empty() {
                        serde_json::Value::Null
                    } else {
                        serde_json::Value::from(v)
                    };
                    passed.insert(k, value);
                }
                _ => return Err(Failure::new(format!("Invalid parameter '{k}'"))),
            }
        }
        // A backing node given by its file replaces the one the header names; its format alone
        // (`backing.driver=`, as Cinder writes with the secrets) changes nothing that is read.
        // Any other option of the node is refused by name, never dropped.
        if backing.iter().any(|(k, _)| k.ends_with(".filename")) {
            passed.extend(backing.into_iter().map(|(k, v)| (k, v.into())));
        } else if let Some((k, _)) = backing.iter().find(|(k, _)| !k.ends_with(".driver")) {
            return Err(Failure::new(format!("Invalid parameter '{k}'")));
        }
        let mut path = path.ok_or_else(|| {
            Failure::new("A block device must be specified for \"file.filename\"")
        })?;
        if !passed.is_empty() {
            // As one `json:` name, which the block layer reads whole.
            let file = path.to_string_lossy().into_owned();
            match (protocol, fmt) {
                (Some(p), _) => {
                    passed.insert("driver".into(), p.into());
                    passed.insert("filename".into(), file.into());
                }
                (None, f) => {
                    if let Some(f) = f {
                        passed.insert("driver".into(), f.to_string().into());
                    }
                    passed.insert("file.driver".into(), "file".into());
                    passed.insert("file.filename".into(), file.into());
                }
            }
            if let Some(w) = &window {
                passed.insert("offset".into(), w.offset.into());
                if let Some(size) = w.size {
                    passed.insert("size".into(), size.into());
                }
            }
            return Ok(ImageSpec {
                path: PathBuf::from(format!("json:{}", serde_json::Value::Object(passed))),
                format: fmt,
                secrets,
            });
        }
        // qemu names such an image by its options, and so does the block layer.
        if let Some(w) = window {
            if let Some(p) = protocol {
                return Err(Failure::new(format!(
                    "Could not open '{name}': Block protocol '{p}' doesn't support the option '{}'",
                    w.option_name()
                )));
            }
            let driver = fmt.map(|f| f.to_string());
            path = PathBuf::from(w.json_name(driver.as_deref(), &path));
        }
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

/// Whether an `--image-opts` key goes to the block layer as it is: `backing` itself (the
/// node's own options are gathered apart), a qcow2 image's data file, the encryption format to check, and those that only tune how qemu
/// opens a file.
fn passes_through(key: &str) -> bool {
    key == "backing"
        || key.starts_with("data-file.")
        || key == "encrypt.format"
        || imgblock::json_name::IGNORED.contains(&key)
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // A backing node's format alone changes nothing; its other options need its file.
        let plain = a
            .resolve("driver=qcow2,file.filename=x,backing.driver=qcow2", None)
            .unwrap();
        assert_eq!(plain.path, PathBuf::from("x"));
        let odd = a.resolve("driver=qcow2,file.filename=x,backing.bogus=1", None);
        assert!(odd.unwrap_err().message.contains("'backing.bogus'"));
        let node = a
            .resolve("driver=qcow2,file.filename=x,backing.file.filename=b", None)
            .unwrap();
        assert!(node.path.to_string_lossy().starts_with("json:"));
    }
}
