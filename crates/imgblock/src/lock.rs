//! Image locking compatible with qemu's file driver (block/file-posix.c): open file description
//! (OFD) locks on single bytes, shared locks only. Byte 100 + bit says "I hold this permission",
//! byte 200 + bit says "I do not let others have it". So `img`, `vmm` and qemu see each other.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// qemu's BLK_PERM_CONSISTENT_READ bit.
pub const PERM_CONSISTENT_READ: u32 = 0;
/// qemu's BLK_PERM_WRITE bit.
pub const PERM_WRITE: u32 = 1;
/// qemu's BLK_PERM_WRITE_UNCHANGED bit.
pub const PERM_WRITE_UNCHANGED: u32 = 2;
/// qemu's BLK_PERM_RESIZE bit.
pub const PERM_RESIZE: u32 = 3;
/// Lock byte of a held permission: this plus the bit.
pub const PERM_BASE: i64 = 100;
/// Lock byte of a permission not shared: this plus the bit.
pub const SHARED_BASE: i64 = 200;

/// The names qemu prints for each bit.
fn perm_name(bit: u32) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        PERM_RESIZE => "resize",
        _ => "graph modification",
    }
}

/// Locks held on one file; released when dropped (the descriptor closes).
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

fn ofd(f: &File, start: i64, ty: libc::c_int, get: bool) -> std::io::Result<libc::c_short> {
    // SAFETY: flock is plain old data; all-zero is a valid value of every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::c_short::try_from(ty).unwrap_or(0);
    fl.l_whence = libc::c_short::try_from(libc::SEEK_SET).unwrap_or(0);
    fl.l_start = start;
    fl.l_len = 1;
    let cmd = if get {
        libc::F_OFD_GETLK
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: `f` is an open descriptor and `fl` a valid flock living across the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl.l_type)
    }
}

/// Takes `perms` and refuses to share `unshared` on `path`, as qemu's raw_apply_lock_bytes and
/// raw_check_lock_bytes do.
///
/// # Errors
/// [`Error::Locked`] when another process holds a conflicting lock; [`Error::Io`] when the
/// file cannot be opened or locked.
pub fn lock(path: &Path, perms: &[u32], unshared: &[u32]) -> Result<ImageLock> {
    // A `json:` name's lock is its file's.
    let named;
    let path = match path
        .to_str()
        .and_then(crate::json_name::parse)
        .and_then(|j| j.ok())
    {
        Some(j) => {
            named = j.filename;
            named.as_path()
        }
        None => path,
    };
    // A conflict can be a ghost: a file this process just closed stays locked while a child
    // another thread is spawning still holds a copy of its descriptor (between fork and exec).
    // Such a window is short, so a conflict is retried for a moment before it is reported.
    let mut tries = 0;
    loop {
        match try_lock(path, perms, unshared) {
            Err(Error::Locked { .. }) if tries < LOCK_RETRIES => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// How many times a conflicting lock is retried, 10 ms apart, before the conflict is reported.
pub const LOCK_RETRIES: u32 = 20;

fn try_lock(path: &Path, perms: &[u32], unshared: &[u32]) -> Result<ImageLock> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    for &p in perms {
        ofd(&f, PERM_BASE + i64::from(p), libc::F_RDLCK, false).map_err(io)?;
    }
    for &p in unshared {
        ofd(&f, SHARED_BASE + i64::from(p), libc::F_RDLCK, false).map_err(io)?;
    }
    // Nobody may forbid what we take, nor hold what we forbid.
    for &p in perms {
        if i32::from(ofd(&f, SHARED_BASE + i64::from(p), libc::F_WRLCK, true).map_err(io)?)
            != libc::F_UNLCK
        {
            return Err(Error::Locked {
                path: path.to_owned(),
                perm: perm_name(p),
                shared: false,
            });
        }
    }
    for &p in unshared {
        if i32::from(ofd(&f, PERM_BASE + i64::from(p), libc::F_WRLCK, true).map_err(io)?)
            != libc::F_UNLCK
        {
            return Err(Error::Locked {
                path: path.to_owned(),
                perm: perm_name(p),
                shared: true,
            });
        }
    }
    Ok(ImageLock { _file: f })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_and_reader_with_force_share_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let w = lock(
            &p,
            &[PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE],
            &[PERM_WRITE, PERM_RESIZE],
        )
        .unwrap();
        match lock(
            &p,
            &[PERM_CONSISTENT_READ, PERM_WRITE],
            &[PERM_WRITE, PERM_RESIZE],
        ) {
            Err(Error::Locked {
                perm: "write",
                shared: false,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // A plain reader refuses to share write, which the writer holds.
        assert!(matches!(
            lock(&p, &[PERM_CONSISTENT_READ], &[PERM_WRITE, PERM_RESIZE]),
            Err(Error::Locked {
                perm: "write",
                shared: true,
                ..
            })
        ));
        // A reader that shares everything (-U) gets in.
        assert!(lock(&p, &[], &[]).is_ok());
        drop(w);
        assert!(lock(&p, &[PERM_CONSISTENT_READ, PERM_WRITE], &[PERM_WRITE]).is_ok());
    }
}
