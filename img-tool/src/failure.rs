//! How a subcommand fails: a message for `img: ...` on stderr and the exit status qemu-img uses.

use std::fmt;
use std::path::Path;

/// The exit status of a failed command, unless the subcommand says otherwise (qemu-img's).
pub const EXIT_FAILURE: i32 = 1;

/// A failed subcommand: what to print after `img: ` and which status to exit with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The message, without the `img: ` prefix.
    pub message: String,
    /// The process exit status.
    pub code: i32,
}

impl Failure {
    /// A failure with exit status 1.
    pub fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: EXIT_FAILURE,
        }
    }

    /// The same failure with another exit status.
    pub fn with_code(mut self, code: i32) -> Self {
        self.code = code;
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<imgblock::Error> for Failure {
    fn from(e: imgblock::Error) -> Self {
        Failure::new(e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::new(strerror(&e))
    }
}

/// The result of a subcommand: its exit status, or a failure.
pub type CliResult<T> = Result<T, Failure>;

/// An I/O error in the words of C's `strerror` ("No such file or directory"), as qemu prints it.
pub fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// qemu-img's wording for a failed open: `Could not open 'F': <reason>`.
pub fn open_failure(path: &Path, e: &imgblock::Error) -> Failure {
    if let imgblock::Error::NoSuchSnapshot { name, .. } = e {
        // qemu's words, with the name and file added so that a script's log says which.
        return Failure::new(format!(
            "Failed to load snapshot: Can't find snapshot '{name}' in '{}'",
            path.display()
        ));
    }
    Failure::new(format!(
        "Could not open '{}': {}",
        path.display(),
        open_reason(e)
    ))
}

/// The network protocol qemu would read `path` with (`nbd+unix:///?socket=...`,
/// `nbd:unix:/run/s`, `https://host/disk.qcow2`), if any.
fn network_protocol(path: &Path) -> Option<String> {
    const PROTOCOLS: &[&str] = &[
        "nbd",
        "nbd+unix",
        "nbd+tcp",
        "http",
        "https",
        "ftp",
        "ftps",
        "ssh",
        "iscsi",
        "rbd",
        "gluster",
        "gluster+tcp",
        "gluster+unix",
        "nfs",
        "vxhs",
    ];
    let name = path.to_str()?;
    let (scheme, _) = name.split_once(':')?;
    PROTOCOLS.contains(&scheme).then(|| scheme.to_owned())
}

/// Why an open failed, in qemu's words; a backing file's failure nests the same way.
pub fn open_reason(e: &imgblock::Error) -> String {
    match e {
        // qemu names the file again for its protocol layer.
        // qemu's file driver opens only regular files (and block devices).
        imgblock::Error::Io { path, source }
            if source.kind() == std::io::ErrorKind::IsADirectory =>
        {
            format!(
                "'file' driver requires '{}' to be a regular file",
                path.display()
            )
        }
        imgblock::Error::Io { path, source } => match network_protocol(path) {
            // A name qemu would hand to a network protocol, which img does not speak.
            Some(p) if source.kind() == std::io::ErrorKind::NotFound => format!(
                "Unknown protocol '{p}': img opens local files and block devices only \
                 (export the image to a file first, or read it with qemu-img)"
            ),
            _ => format!("Could not open '{}': {}", path.display(), strerror(source)),
        },
        imgblock::Error::Qcow2 { source, .. } => source.to_string(),
        imgblock::Error::Crypto { source, .. } => source.to_string(),
        imgblock::Error::KeyRequired { option, .. } => {
            format!("Parameter '{option}' is required for cipher")
        }
        imgblock::Error::Vmdk { source, .. } => source.to_string(),
        imgblock::Error::Vdi { source, .. } => source.to_string(),
        imgblock::Error::Ova { source, .. } => source.to_string(),
        imgblock::Error::BackingOpen { source, .. } => {
            format!("Could not open backing file: {}", open_reason(source))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_drops_os_error_suffix() {
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(strerror(&e), "No such file or directory");
    }

    #[test]
    fn open_failure_backing_file_is_named_as_such() {
        let e = imgblock::Error::BackingOpen {
            path: "o.qcow2".into(),
            source: Box::new(imgblock::Error::Io {
                path: "b.raw".into(),
                source: std::io::Error::from_raw_os_error(2),
            }),
        };
        let f = open_failure(Path::new("o.qcow2"), &e);
        assert_eq!(
            f.message,
            "Could not open 'o.qcow2': Could not open backing file: Could not open 'b.raw': No such file or directory"
        );
    }

    #[test]
    fn open_failure_io_names_file_twice() {
        let e = imgblock::Error::Io {
            path: "x.raw".into(),
            source: std::io::Error::from_raw_os_error(2),
        };
        let f = open_failure(Path::new("x.raw"), &e);
        assert_eq!(
            f.message,
            "Could not open 'x.raw': Could not open 'x.raw': No such file or directory"
        );
        assert_eq!(f.code, 1);
    }
}
