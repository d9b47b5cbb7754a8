//! Creation options in qemu-img's `-o key=value,...` language.

use std::collections::BTreeMap;

use crate::crypto::Secret;
use crate::{Error, Result};

/// What to create: the size, the backing reference, and format-specific `-o` options.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size; defaults to the backing image's when there is one.
    pub size: Option<u64>,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_fmt: Option<String>,
    /// Do not open the backing file (qemu-img create -u); the size must then be given.
    pub unsafe_backing: bool,
    /// Format-specific options in the order given.
    pub opts: Vec<(String, String)>,
    /// Secrets by ID (qemu's `--object secret,id=ID,...`, resolved by the caller to bytes);
    /// options such as `encrypt.key-secret=ID` name them.
    pub secrets: BTreeMap<String, Secret>,
    /// amend: allow what qemu-img amend allows only with `--force` (erasing the last key slot).
    pub force: bool,
    /// The file protocol's options, once [`CreateOptions::split_file_options`] took them out
    /// of `opts`.
    pub file: FileOptions,
}

impl CreateOptions {
    /// Options for a plain image of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size: Some(size),
            ..Self::default()
        }
    }

    /// Adds `-o` options given as `key=value,key=value`; `size`, `backing_file` and `backing_fmt`
    /// go to their own fields.
    ///
    /// # Errors
    /// When the list is malformed or a size does not parse.
    pub fn parse_opts(&mut self, s: &str) -> Result<()> {
        for (k, v) in split_opts(s)? {
            match k.as_str() {
                "size" => self.size = Some(parse_size(&v)?),
                "backing_file" => self.backing_file = Some(v),
                "backing_fmt" => self.backing_fmt = Some(v),
                _ => self.opts.push((k, v)),
            }
        }
        Ok(())
    }

    /// Moves the file protocol's options (`nocow`, `extent_size_hint`), which qemu accepts
    /// beside every format's own, from `opts` to `file`, checked.
    ///
    /// # Errors
    /// A value that is not a boolean or a size, or a hint over 4 GiB (qemu's words).
    pub fn split_file_options(&self) -> Result<CreateOptions> {
        let mut rest = self.clone();
        rest.opts
            .retain(|(k, _)| k != "nocow" && k != "extent_size_hint");
        if let Some(v) = self.get("nocow") {
            rest.file.nocow = parse_bool("nocow", v)?;
        }
        if let Some(v) = self.get("extent_size_hint") {
            rest.file.extent_size_hint = u32::try_from(parse_size(v)?)
                .map_err(|_| Error::InvalidOption("Extent size hint is too large".into()))?;
        }
        Ok(rest)
    }

    /// Sets a format-specific option, replacing an earlier value.
    pub fn set(&mut self, key: &str, value: &str) {
        self.opts.retain(|(k, _)| k != key);
        self.opts.push((key.to_owned(), value.to_owned()));
    }

    /// The secret that option `key` names by ID; `None` when the option is not given.
    ///
    /// # Errors
    /// When the option names an ID with no secret (qemu's message).
    pub fn secret(&self, key: &str) -> Result<Option<&Secret>> {
        match self.get(key) {
            None => Ok(None),
            Some(id) => self
                .secrets
                .get(id)
                .map(Some)
                .ok_or_else(|| Error::InvalidOption(format!("No secret with id '{id}'"))),
        }
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// qemu's default extent size hint for new files: 1 MiB.
pub const DEFAULT_EXTENT_SIZE_HINT: u32 = 1 << 20;

/// The file protocol's creation options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Turn the filesystem's copy-on-write off for the new file.
    pub nocow: bool,
    /// Allocation unit to ask the filesystem for; 0: none.
    pub extent_size_hint: u32,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            nocow: false,
            extent_size_hint: DEFAULT_EXTENT_SIZE_HINT,
        }
    }
}

/// Splits `a=b,c=d` into pairs; `,,` stands for a literal comma, as in qemu.
///
/// # Errors
/// When an element has no `=`.
pub fn split_opts(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_owned(), v.to_owned())),
            None if p == "help" || p == "?" => out.push(("help".to_owned(), String::new())),
            None => return Err(Error::InvalidOption(format!("Invalid parameter '{p}'"))),
        }
    }
    Ok(out)
}

/// Parses a size with qemu's suffixes (k/K, M, G, T, P, E, powers of 1024; b or B for bytes);
/// a fraction is allowed with a suffix ("1.5G").
///
/// # Errors
/// When the text is not a size or overflows.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::InvalidOption(format!(
            "Invalid size '{s}': expected a number with an optional k, M, G, T, P or E suffix"
        ))
    };
    let t = s.trim();
    let (num, mult): (&str, u64) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m = match c {
                'b' | 'B' => 1,
                'k' | 'K' => 1 << 10,
                'm' | 'M' => 1 << 20,
                'g' | 'G' => 1 << 30,
                't' | 'T' => 1 << 40,
                'p' | 'P' => 1 << 50,
                'e' | 'E' => 1 << 60,
                _ => return Err(bad()),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    // A decimal fraction: whole part and up to 18 digits of fraction, computed exactly.
    let (whole, frac) = num.split_once('.').ok_or_else(bad)?;
    if mult == 1 || frac.is_empty() || frac.len() > 18 || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let w: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let f: u128 = frac.parse().map_err(|_| bad())?;
    let scale = 10u128.pow(u32::try_from(frac.len()).map_err(|_| bad())?);
    let fpart = u64::try_from(f * u128::from(mult) / scale).map_err(|_| bad())?;
    w.checked_mul(mult)
        .and_then(|x| x.checked_add(fpart))
        .ok_or_else(bad)
}

/// Parses qemu's boolean spellings.
///
/// # Errors
/// When the text is none of them.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::InvalidOption(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_suffixes_scale_by_1024() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("6G").unwrap(), 6 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
    }

    #[test]
    fn parse_size_garbage_is_an_error() {
        assert!(parse_size("").is_err());
        assert!(parse_size("12x").is_err());
        assert!(parse_size("99999999999E").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn split_opts_double_comma_escapes() {
        let v = split_opts("a=1,backing_file=x,,y,c=on").unwrap();
        assert_eq!(
            v,
            vec![
                ("a".into(), "1".into()),
                ("backing_file".into(), "x,y".into()),
                ("c".into(), "on".into())
            ]
        );
    }

    #[test]
    fn split_opts_missing_value_is_an_error() {
        assert!(split_opts("cluster_size").is_err());
    }
}
