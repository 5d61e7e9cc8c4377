//! StrictModes for what the agent trusts: policy files (their `exec` runs as root), the
//! policies directory, the config file, the state dir and the Docker socket (whoever
//! serves it names the containers policies match on: [`check_socket`]). Like sshd, a
//! path is trusted only if it and every directory above it is owned by root (or by the
//! user running oomwake, so that `oomwake check` works for an unprivileged user on their
//! own files) and is not writable by group or others. A root-owned sticky directory such as /tmp is
//! accepted above the path: nobody else can rename or replace what root put there.
//!
//! On a read-only mount (a ConfigMap volume) write bits are ignored: nobody can write.
//!
//! Symlinks are resolved first: the file actually read and its real ancestors are what
//! must be safe (the link itself lives in a directory that is checked on its own).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const GROUP_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Why a path is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum PermError {
    #[error("{path}: cannot check its owner and mode: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{path}: owned by uid {uid}, not root: refusing to trust it{what} (fix: `chown root {path}`{hint})"
    )]
    Owner {
        path: PathBuf,
        uid: u32,
        what: String,
        hint: &'static str,
    },
    #[error(
        "{path}: writable by group or others (mode {mode:04o}): refusing to trust it{what} (fix: `chmod go-w {path}`{hint})"
    )]
    Writable {
        path: PathBuf,
        mode: u32,
        what: String,
        hint: &'static str,
    },
}

/// What the caller trusts and who may own it.
#[derive(Debug, Clone, Copy)]
pub struct Owners {
    /// Besides root: the effective uid of this process (None: root only).
    pub me: Option<u32>,
    /// Added to each message: how to turn the check off for development.
    pub hint: &'static str,
}

impl Owners {
    /// Root, or the user running oomwake.
    pub fn current(hint: &'static str) -> Owners {
        let me = nix::unistd::geteuid().as_raw();
        Owners {
            me: (me != 0).then_some(me),
            hint,
        }
    }

    /// Whether a file owned by `uid` may be trusted.
    pub fn allowed(&self, uid: u32) -> bool {
        uid == 0 || Some(uid) == self.me
    }
}

/// Checks `path` (which must exist) and every directory above it. `what` names what
/// was being loaded through it ("policy file", "config"), for the message.
pub fn check(path: &Path, what: &str, owners: Owners) -> Result<(), PermError> {
    check_from(path, what, owners, 0)
}

/// `first_above` is 1 when `path` is itself a directory above what is trusted (the
/// nearest existing ancestor of a path not created yet), where a sticky root-owned
/// directory is fine: what is later created there is checked when it exists.
fn check_from(
    path: &Path,
    what: &str,
    owners: Owners,
    first_above: usize,
) -> Result<(), PermError> {
    let real = path.canonicalize().map_err(|error| PermError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let through = if real == path {
        String::new()
    } else {
        format!(" (reached through {})", path.display())
    };
    let what = if what.is_empty() {
        through
    } else {
        format!(" as {what}{through}")
    };
    check_real(&real, what, owners, first_above, true)
}

/// The walk of [`check_from`] over `real`, a canonical path, and its ancestors.
/// `mode_of_self`: whether `real`'s own write bits count (not for a socket).
fn check_real(
    real: &Path,
    what: String,
    owners: Owners,
    first_above: usize,
    mode_of_self: bool,
) -> Result<(), PermError> {
    for (i, p) in real.ancestors().enumerate() {
        let md = std::fs::metadata(p).map_err(|error| PermError::Io {
            path: p.to_path_buf(),
            error,
        })?;
        let mode = md.mode() & 0o7777;
        if !owners.allowed(md.uid()) {
            return Err(PermError::Owner {
                path: p.to_path_buf(),
                uid: md.uid(),
                what,
                hint: owners.hint,
            });
        }
        let above = i + first_above > 0;
        let sticky_root_dir = above && md.is_dir() && md.uid() == 0 && mode & STICKY != 0;
        let counts = i > 0 || mode_of_self;
        if counts && mode & GROUP_OTHER_WRITE != 0 && !sticky_root_dir && !read_only_mount(p) {
            return Err(PermError::Writable {
                path: p.to_path_buf(),
                mode,
                what,
                hint: owners.hint,
            });
        }
    }
    Ok(())
}

/// Checks a unix socket the agent connects to (the Docker socket): its owner, who bound
/// it and so whoever serves it, must be root (or the caller), and every directory above
/// it must pass as for a policy file, so that nobody else can put another socket in its
/// place. The socket's own mode is not checked: write permission on a socket is
/// permission to connect to it (Docker grants it to a group). Returns the resolved path,
/// the one to connect to (a link could be turned after the check), and the owner's uid.
pub fn check_socket(path: &Path, what: &str, owners: Owners) -> Result<(PathBuf, u32), PermError> {
    let real = path.canonicalize().map_err(|error| PermError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let owner = std::fs::metadata(&real)
        .map_err(|error| PermError::Io {
            path: real.clone(),
            error,
        })?
        .uid();
    let through = if real == path {
        String::new()
    } else {
        format!(" (reached through {})", path.display())
    };
    check_real(&real, format!(" as {what}{through}"), owners, 0, false)?;
    Ok((real, owner))
}

/// On a read-only mount the write bits mean nothing: a Kubernetes ConfigMap volume
/// (mounted `readOnly`) shows its directory as 0777, and nobody can change it.
fn read_only_mount(p: &Path) -> bool {
    use nix::sys::statvfs::{statvfs, FsFlags};
    statvfs(p).is_ok_and(|s| s.flags().contains(FsFlags::ST_RDONLY))
}

/// Like [`check`] for a path that may not exist yet (a state dir the agent creates, a
/// config file that is optional): checks the nearest existing ancestor instead.
pub fn check_existing_part(path: &Path, what: &str, owners: Owners) -> Result<(), PermError> {
    let existing = path.ancestors().find(|p| p.exists());
    match existing {
        Some(p) if p == path => check(p, what, owners),
        Some(p) => check_from(p, "", owners, 1),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    const ROOT_ONLY: Owners = Owners {
        me: None,
        hint: ", or --insecure-policies",
    };

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// A root-owned 0755 tree in a TempDir (which is 0700 and root's when we are root).
    fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("policies");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let file = dir.join("a.toml");
        std::fs::write(&file, "x").unwrap();
        chmod(&file, 0o644);
        (t, dir, file)
    }

    #[test]
    fn root_owned_and_not_writable_by_others_is_trusted() {
        if !is_root() {
            eprintln!("skipped: needs root to own the files");
            return;
        }
        let (_t, dir, file) = tree();
        check(&dir, "policies", ROOT_ONLY).unwrap();
        check(&file, "policy file", ROOT_ONLY).unwrap();
    }

    #[test]
    fn world_writable_file_dir_or_ancestor_is_refused_with_the_fix() {
        if !is_root() {
            eprintln!("skipped: needs root to own the files");
            return;
        }
        let (t, dir, file) = tree();
        chmod(&file, 0o666);
        let e = check(&file, "policy file", ROOT_ONLY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by group or others (mode 0666)"), "{e}");
        assert!(e.contains(&format!("chmod go-w {}", file.display())), "{e}");
        chmod(&file, 0o644);
        chmod(&dir, 0o775);
        let e = check(&file, "policy file", ROOT_ONLY)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{}: ", dir.display())), "{e}");
        chmod(&dir, 0o755);
        // An ancestor writable by others, even sticky, is not fine if not root's...
        chmod(t.path(), 0o1777);
        check(&file, "policy file", ROOT_ONLY).unwrap();
        // ...and the sticky exception is for directories above, not the dir itself.
        chmod(&dir, 0o1777);
        assert!(check(&dir, "policies", ROOT_ONLY).is_err());
        chmod(&dir, 0o755);
        chmod(t.path(), 0o777);
        let e = check(&file, "policy file", ROOT_ONLY)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{}: ", t.path().display())), "{e}");
        chmod(t.path(), 0o700);
    }

    #[test]
    fn foreign_owner_is_refused_unless_it_is_the_caller() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let (_t, _dir, file) = tree();
        std::os::unix::fs::chown(&file, Some(1234), None).unwrap();
        let e = check(&file, "policy file", ROOT_ONLY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 1234, not root"), "{e}");
        assert!(e.contains(&format!("chown root {}", file.display())), "{e}");
        let as_1234 = Owners {
            me: Some(1234),
            hint: "",
        };
        check(&file, "policy file", as_1234).unwrap();
    }

    #[test]
    fn symlinks_are_judged_by_their_target() {
        if !is_root() {
            eprintln!("skipped: needs root to own the files");
            return;
        }
        let (t, dir, _file) = tree();
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let target = open.join("b.toml");
        std::fs::write(&target, "x").unwrap();
        chmod(&target, 0o644);
        let link = dir.join("b.toml");
        symlink(&target, &link).unwrap();
        let e = check(&link, "policy file", ROOT_ONLY)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{}: ", open.display())), "{e}");
        assert!(
            e.contains(&format!("reached through {}", link.display())),
            "{e}"
        );
    }

    /// A tmpfs mounted on a TempDir, unmounted on drop.
    struct Mount(PathBuf);

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    fn mount(args: &[&str], dir: &Path) -> bool {
        std::process::Command::new("mount")
            .args(args)
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn write_bits_on_a_read_only_mount_do_not_count() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("configmap");
        std::fs::create_dir(&dir).unwrap();
        if !is_root() || !mount(&["-t", "tmpfs", "-o", "size=64k,mode=0777", "none"], &dir) {
            eprintln!("skipped: needs root and mount(8)");
            return;
        }
        let m = Mount(dir.clone());
        std::fs::write(dir.join("p.toml"), "x").unwrap();
        chmod(&dir.join("p.toml"), 0o644);
        // Read-write and 0777: refused.
        assert!(check(&dir.join("p.toml"), "policy file", ROOT_ONLY).is_err());
        assert!(mount(&["-o", "remount,ro"], &dir), "remount ro");
        check(&dir.join("p.toml"), "policy file", ROOT_ONLY).unwrap();
        check(&dir, "policies", ROOT_ONLY).unwrap();
        drop(m);
    }

    #[test]
    fn a_path_not_there_yet_is_judged_by_what_exists() {
        if !is_root() {
            eprintln!("skipped: needs root to own the files");
            return;
        }
        let (_t, dir, _file) = tree();
        check_existing_part(&dir.join("state/deeper"), "state dir", ROOT_ONLY).unwrap();
        chmod(&dir, 0o757);
        assert!(check_existing_part(&dir.join("state"), "state dir", ROOT_ONLY).is_err());
        // A sticky root dir such as /tmp is fine above a path not created yet: whatever
        // someone else creates there is theirs, and refused once it exists.
        chmod(&dir, 0o1777);
        check_existing_part(&dir.join("oomwake.toml"), "config", ROOT_ONLY).unwrap();
        std::fs::write(dir.join("oomwake.toml"), "").unwrap();
        std::os::unix::fs::chown(dir.join("oomwake.toml"), Some(4321), None).unwrap();
        assert!(check_existing_part(&dir.join("oomwake.toml"), "config", ROOT_ONLY).is_err());
    }
}
