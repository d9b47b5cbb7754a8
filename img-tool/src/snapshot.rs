//! `img snapshot`: list, create, apply and delete internal snapshots, with qemu-img's listing
//! and messages.

use clap::{ArgAction, Args};
use imgblock::Image;

use crate::console;
use crate::failure::{CliResult, Failure};
use crate::info::snapshot_list_text;
use crate::open::{open_image, parse_format, OpenRequest};
use crate::secrets::SecretArgs;

/// `img snapshot [-l | -c NAME | -a NAME | -d NAME] [-f FMT | --image-opts] [--object OBJDEF]
/// [-U] [-q] FILE`
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// `--object secret,...` and `--image-opts`: an encrypted image needs its secret, even to
    /// list its snapshots (as in qemu-img).
    #[command(flatten)]
    pub(crate) secret_args: SecretArgs,
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list", action = ArgAction::Count)]
    list: u8,
    /// Create a snapshot named NAME of the current state.
    #[arg(short = 'c', long = "create", value_name = "NAME")]
    create: Vec<String>,
    /// Apply (revert the disk to) the snapshot with this name or ID.
    #[arg(short = 'a', long = "apply", value_name = "NAME")]
    apply: Vec<String>,
    /// Delete the snapshot named NAME.
    #[arg(short = 'd', long = "delete", value_name = "NAME")]
    delete: Vec<String>,
    /// Image format (probed when not given).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Quiet: print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Open the image even if another process uses it (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    filename: String,
}

/// The one thing `img snapshot` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// qemu-img takes one action per run.
fn action(args: &SnapshotArgs) -> CliResult<Action> {
    let given = usize::from(args.list) + args.create.len() + args.apply.len() + args.delete.len();
    if given > 1 {
        return Err(Failure::new(
            "Cannot mix '-l', '-a', '-c', '-d'\nTry 'img snapshot --help' for more info",
        ));
    }
    Ok(if let Some(n) = args.create.first() {
        Action::Create(n.clone())
    } else if let Some(n) = args.apply.first() {
        Action::Apply(n.clone())
    } else if let Some(n) = args.delete.first() {
        Action::Delete(n.clone())
    } else {
        Action::List
    })
}

/// Why a snapshot operation failed, in qemu's words: formats without snapshots say
/// "Operation not supported" (create) or "Block driver does not support snapshots" (apply).
fn reason(e: &imgblock::Error, unsupported: &str) -> String {
    match e {
        imgblock::Error::Unsupported { what, .. } if what.contains("does not support") => {
            unsupported.to_owned()
        }
        imgblock::Error::Unsupported { what, .. } => what.clone(),
        imgblock::Error::InvalidOption(m) => m.clone(),
        imgblock::Error::Qcow2 { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Runs `img snapshot`.
///
/// # Errors
/// Conflicting actions, an image that cannot be opened, or a failed snapshot operation.
pub fn run(args: &SnapshotArgs) -> CliResult<i32> {
    let action = action(args)?;
    let spec = args
        .secret_args
        .resolve(&args.filename, parse_format(args.format.as_deref())?)?;
    let req = OpenRequest {
        format: spec.format,
        writable: action != Action::List,
        // Snapshots concern this image alone; qemu-img opens the chain but never reads it.
        no_backing: true,
        secrets: Some(&spec.secrets),
        force_share: args.force_share,
        ..OpenRequest::default()
    };
    let mut img = open_image(&spec.path, &req)?;
    match action {
        Action::List => {
            let snaps = img.driver().snapshots()?;
            if !args.quiet {
                console::print(&snapshot_list_text(&snaps));
            }
        }
        Action::Create(name) => img.snapshot_create(&name).map_err(|e| {
            Failure::new(format!(
                "Could not create snapshot '{name}': {}",
                reason(&e, "Operation not supported")
            ))
        })?,
        Action::Apply(name) => img.snapshot_apply(&name).map_err(|e| {
            let why = match e {
                imgblock::Error::NoSuchSnapshot { .. } => {
                    "Failed to load snapshot: No such file or directory".to_owned()
                }
                other => reason(&other, "Block driver does not support snapshots"),
            };
            Failure::new(format!("Could not apply snapshot '{name}': {why}"))
        })?,
        Action::Delete(name) => delete(&img, &name)?,
    }
    img.flush()?;
    Ok(0)
}

/// qemu-img deletes by name only: the first snapshot with that tag, then by its ID.
fn delete(img: &Image, name: &str) -> CliResult<()> {
    let not_found = || {
        Failure::new(format!(
            "Could not delete snapshot '{name}': snapshot not found"
        ))
    };
    let snaps = img.driver().snapshots().map_err(|_| not_found())?;
    let Some(s) = snaps.iter().find(|s| s.name == name) else {
        return Err(not_found());
    };
    img.snapshot_delete(&s.id).map_err(|e| {
        Failure::new(format!(
            "Could not delete snapshot '{name}': {}",
            reason(&e, "Operation not supported")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: SnapshotArgs,
    }

    fn parse(v: &[&str]) -> SnapshotArgs {
        T::try_parse_from(std::iter::once("t").chain(v.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn action_defaults_to_list() {
        assert_eq!(action(&parse(&["x.qcow2"])).unwrap(), Action::List);
        assert_eq!(
            action(&parse(&["-c", "s1", "x.qcow2"])).unwrap(),
            Action::Create("s1".into())
        );
    }

    #[test]
    fn action_two_actions_are_refused_like_qemu() {
        for v in [
            &["-l", "-c", "s", "x"][..],
            &["-c", "a", "-c", "b", "x"],
            &["-a", "a", "-d", "b", "x"],
        ] {
            let e = action(&parse(v)).unwrap_err();
            assert!(e.message.starts_with("Cannot mix '-l', '-a', '-c', '-d'\n"));
        }
    }
}
