//! Directories walshipper keeps on the local host for itself: the spool,
//! the key cache and its host secret, the summary cache, restore tests'
//! scratch. One definition of "this user's alone", so that each refuses the
//! same things: a symlink planted where the directory should be (a shared
//! /tmp or /var/tmp), another user's directory, one that others may write
//! in.

use std::fmt;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

/// The user walshipper runs as: the owner of what it creates.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// What was found at a path: its kind, owner and mode, for the checks and
/// for error messages that say what is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    kind: &'static str,
    uid: u32,
    mode: u32,
}

impl Found {
    pub fn of(meta: &Metadata) -> Found {
        let t = meta.file_type();
        let kind = if t.is_symlink() {
            "symlink"
        } else if t.is_dir() {
            "directory"
        } else {
            "file"
        };
        Found {
            kind,
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        }
    }

    /// What is at `path` itself (a symlink is not followed).
    pub fn lstat(path: &Path) -> io::Result<Found> {
        fs::symlink_metadata(path).map(|m| Found::of(&m))
    }

    pub fn is_dir(&self) -> bool {
        self.kind == "directory"
    }

    /// A real directory of this user's that no one else may enter
    /// (mode & 077 = 0): what walshipper makes for itself.
    pub fn is_private(&self) -> bool {
        self.is_dir() && self.uid == euid() && self.mode & 0o077 == 0
    }

    /// A directory of this user's that no one else may write in
    /// (mode & 022 = 0): what a configured top directory must be, since
    /// what walshipper makes below it is only as safe as it.
    pub fn is_ours_alone(&self) -> bool {
        self.is_dir() && self.uid == euid() && self.mode & 0o022 == 0
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {} of uid {}, mode {:04o}",
            self.kind, self.uid, self.mode
        )
    }
}

/// Makes `path` with mode 0700 unless something is there already, and
/// returns what is there now, unfollowed: the caller checks it with
/// [`Found::is_private`] before using it. Its parent must exist (and be
/// checked first: a directory made through a planted symlink is made where
/// the link points).
pub fn make(path: &Path) -> io::Result<Found> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    Found::lstat(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_means_a_real_directory_of_ours_closed_to_others() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        let made = make(&d).unwrap();
        assert!(made.is_private() && made.is_ours_alone(), "{made}");
        // Made again: what is there is returned, not an error.
        assert_eq!(make(&d).unwrap(), made);

        fs::set_permissions(&d, fs::Permissions::from_mode(0o750)).unwrap();
        let f = Found::lstat(&d).unwrap();
        assert!(!f.is_private() && f.is_ours_alone(), "{f}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o770)).unwrap();
        let f = Found::lstat(&d).unwrap();
        assert!(!f.is_private() && !f.is_ours_alone(), "{f}");
        assert_eq!(
            f.to_string(),
            format!("a directory of uid {}, mode 0770", euid())
        );

        // A symlink to a private directory is not one, and make does not
        // follow it into making anything.
        let real = t.path().join("real");
        make(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let f = make(&link).unwrap();
        assert!(!f.is_private() && !f.is_ours_alone());
        assert!(f.to_string().starts_with("a symlink of uid"), "{f}");

        let file = t.path().join("file");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!make(&file).unwrap().is_private());
        // Its parent missing: the error, not a directory made on the way.
        assert!(make(&t.path().join("no/such")).is_err());
    }
}
