//! Opening images the way qemu-img does: format names, error wording, the raw-probing warning.

use std::path::Path;

use imgblock::{Format, Image, OpenOptions};

use crate::console;
use crate::failure::{open_failure, CliResult, Failure};

/// Parses a `-f`/`-O`/`-F` format name.
///
/// # Errors
/// `Unknown file format 'X'` for names no driver knows.
pub fn parse_format(name: Option<&str>) -> CliResult<Option<Format>> {
    name.map(|n| {
        n.parse::<Format>()
            .map_err(|_| Failure::new(format!("Unknown file format '{n}'")))
    })
    .transpose()
}

/// Parses a `-f`/`-O` name of a format to write (create, convert, measure): one qemu knows but
/// img does not write (vpc, qed, ...) is refused before anything is made.
///
/// # Errors
/// As [`parse_format`]; `Image format 'X' is not supported` for the others.
pub fn parse_output_format(name: &str) -> CliResult<Format> {
    match parse_format(Some(name))? {
        Some(Format::Foreign(f)) => Err(Failure::new(format!(
            "Image format '{f}' is not supported: img writes raw, qcow2, vmdk, vdi and luks"
        ))),
        f => Ok(f.unwrap_or(Format::Raw)),
    }
}

/// What the user asked for when opening one image.
#[derive(Debug, Clone, Default)]
pub struct OpenRequest<'a> {
    /// `-f`, or probed when `None`.
    pub format: Option<Format>,
    /// Open for writing.
    pub writable: bool,
    /// Leave the backing chain closed.
    pub no_backing: bool,
    /// An internal snapshot to open instead of the active state.
    pub snapshot: Option<&'a imgblock::SnapshotRef>,
    /// Passphrases for encrypted layers (`--object secret` with `--image-opts`).
    pub secrets: Option<&'a imgblock::crypto::Secrets>,
    /// `-U`: take no locks, so that an image another process writes can still be read.
    pub force_share: bool,
    /// Bypass the host page cache (`-t none`/`-T none`).
    pub direct: bool,
    /// Open for `check -r`: an image marked corrupt opens so that the check can repair it.
    pub repair: bool,
}

/// Opens an image, reporting failures in qemu-img's words and warning, as qemu does, when a
/// probed-raw image is opened for writing.
///
/// # Errors
/// `Could not open 'F': ...` when the image or its backing chain cannot be opened.
pub fn open_image(path: &Path, req: &OpenRequest<'_>) -> CliResult<Image> {
    let opts = OpenOptions {
        format: req.format,
        writable: req.writable,
        no_backing: req.no_backing,
        snapshot: req.snapshot.cloned(),
        force_share: req.force_share,
        repair: req.repair,
        // A window comes with the name (`json:{...}`, which `--image-opts` resolves to).
        raw_window: None,
        data_file: None,
    };
    let none = imgblock::crypto::Secrets::none();
    let secrets = req.secrets.unwrap_or(&none);
    let img = if req.direct {
        Image::open_direct(path, &opts, secrets)
    } else {
        Image::open_with_secrets(path, &opts, secrets)
    }
    .map_err(|e| open_failure(path, &e))?;
    if req.writable && img.format_was_guessed_raw() {
        console::eprint(&guessed_raw_warning(path));
    }
    Ok(img)
}

/// Opens an image to read from: with no format given, an OVA appliance opens as its disk number
/// `disk` (0 when not given, with a warning when it holds more), read in place inside the tar;
/// anything else as [`open_image`].
///
/// # Errors
/// As [`open_image`]; `--disk` given for a file that is not an OVA; an OVA opened for writing.
pub fn open_source(path: &Path, req: &OpenRequest<'_>, disk: Option<usize>) -> CliResult<Image> {
    if req.format.is_none() && imgblock::ova::is_ova(path) {
        if req.snapshot.is_some() {
            return Err(Failure::new(format!(
                "'{}': disks inside an OVA have no internal snapshots",
                path.display()
            )));
        }
        if req.writable {
            return Err(Failure::new(format!(
                "'{}': disks inside an OVA are read in place and cannot be written; \
                 convert the disk out of it first (or give -f raw to write the archive itself)",
                path.display()
            )));
        }
        if disk.is_none() {
            let count = imgblock::ova::disks(path).map_or(0, |d| d.len());
            if count > 1 {
                console::eprint(&format!(
                    "img: warning: '{}' holds {count} disks; this reads disk 0 \
                     (info and convert take --disk N for another)\n",
                    path.display()
                ));
            }
        }
        return imgblock::ova::open(path, disk.unwrap_or(0)).map_err(|e| open_failure(path, &e));
    }
    if disk.is_some() {
        return Err(Failure::new(format!(
            "'{}' is not an OVA appliance; --disk applies only to those",
            path.display()
        )));
    }
    open_image(path, req)
}

/// qemu's warning for a writable image whose format was probed as raw.
fn guessed_raw_warning(path: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions.\n",
        path.display()
    )
}

/// The file that holds the bytes of a mapping: storage `file` of the image at `depth` in the chain.
pub fn storage_path<'a>(chain: &[&'a Image], depth: usize, file: usize) -> Option<&'a Path> {
    chain
        .get(depth)
        .map(|img| img.driver().storage(file).path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_format_unknown_is_qemu_message() {
        assert_eq!(
            parse_format(Some("foo")).unwrap_err().message,
            "Unknown file format 'foo'"
        );
        assert_eq!(parse_format(Some("qcow2")).unwrap(), Some(Format::Qcow2));
        assert_eq!(parse_format(None).unwrap(), None);
        assert_eq!(
            parse_format(Some("vpc")).unwrap(),
            Some(Format::Foreign("vpc"))
        );
        assert!(parse_output_format("vpc")
            .unwrap_err()
            .message
            .starts_with("Image format 'vpc' is not supported"));
        assert_eq!(parse_output_format("vdi").unwrap(), Format::Vdi);
    }

    #[test]
    fn guessed_raw_warning_is_three_lines() {
        let w = guessed_raw_warning(Path::new("r.raw"));
        assert!(w.starts_with(
            "WARNING: Image format was not specified for 'r.raw' and probing guessed raw.\n"
        ));
        assert_eq!(w.lines().count(), 3);
        assert!(w.ends_with("to remove the restrictions.\n"));
    }
}
