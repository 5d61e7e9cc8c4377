//! StrictModes for what the agent trusts: policy files (their `exec` runs as root), the
//! policies directory, hook programs, the config file, the state dir and the Docker
//! socket (whoever serves it names the containers policies match on: [`check_socket`]).
//! Like sshd, a path is trusted only if it and every directory above it is owned by root
//! (or by the user running oomwake, so that `oomwake check` works for an unprivileged
//! user on their own files) and is not writable by group or others. A root-owned sticky
//! directory such as /tmp is accepted above the path: nobody else can rename or replace
//! what root put there.
//!
//! On a read-only mount (a ConfigMap volume) write bits are ignored: nobody can write.
//!
//! What is read or run is opened once and judged on its descriptor ([`open_file`],
//! [`open_dir`], [`open_program`]): the path is walked from `/` one component at a time
//! with `openat(O_NOFOLLOW)`, each directory checked on the descriptor the next step
//! opens from, and the file read (or executed) from the descriptor that was checked, so
//! that nothing can be swapped between the check and the use. A symbolic link on the way
//! is followed only if it is itself owned by root (or the caller), since its directory
//! is checked already (a ConfigMap's `..data` links, a merged `/usr`'s `/bin`): a link
//! another user planted in a sticky directory is refused, whatever it points to. Only
//! regular files are read (a FIFO would block, `/dev/zero` never ends), and at most
//! [`MAX_FILE`] bytes of them. With `--insecure-policies` ([`Checks::Insecure`]) owners
//! and modes are not looked at and links are followed, but the kind and size still are.
//!
//! [`check`] and [`check_existing_part`] judge a path that is not read here (the state
//! dir, the audit log before it is created).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};

/// The most bytes of a policy or config file that are read: a bigger one is refused.
pub const MAX_FILE: u64 = 1 << 20;
/// Symbolic links followed on the way to one file (the kernel's own limit).
const MAX_LINKS: usize = 40;

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
    #[error(
        "{path}: a symbolic link owned by uid {uid}, not root: refusing to follow it{what} (fix: replace it with what it points to, owned by root{hint})"
    )]
    Link {
        path: PathBuf,
        uid: u32,
        what: String,
        hint: &'static str,
    },
    #[error("{path}: {kind}, not a regular file: refusing to read it{what}")]
    NotRegular {
        path: PathBuf,
        kind: &'static str,
        what: String,
    },
    #[error("{path}: larger than {limit} bytes: refusing to read it{what}")]
    TooLarge {
        path: PathBuf,
        limit: u64,
        what: String,
    },
}

impl PermError {
    /// True when the path (or a directory on it) does not exist: a missing optional file.
    pub fn is_not_found(&self) -> bool {
        matches!(self, PermError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
    }
}

/// What [`open_file`], [`open_dir`] and [`open_program`] judge.
#[derive(Debug, Clone, Copy)]
pub enum Checks {
    /// Owners and modes of the file, its directories and the links on the way.
    Strict(Owners),
    /// `--insecure-policies`: only the kind of file and its size; links are followed.
    Insecure,
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

/// Checks `path` (which must exist, of any kind) and every directory above it, walking
/// it from `/` as [`open_file`] does: a symbolic link on the way is followed only if it
/// is root's (or the caller's). `what` names what was being loaded through it ("state
/// dir", "the audit log"), for the message.
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
    let w = Walk {
        last_above: first_above > 0,
        ..Walk::new(Checks::Strict(owners), what, path)
    };
    w.walk_from_root(path, Last::Any).map(|_| ())
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
///
/// The path as given is walked too, like a policy file's: every directory and link on
/// the way to the socket must be root's (or the caller's), so that nobody else can turn
/// a link after the check to another socket root serves (dockerd's metrics socket,
/// containerd's debug socket: both answer 404 to every container).
pub fn check_socket(path: &Path, what: &str, owners: Owners) -> Result<(PathBuf, u32), PermError> {
    check_socket_links(path, what, owners, 0)?;
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

/// The directories above `path` and, if its last component is a link, the link and
/// then its target's path the same way.
fn check_socket_links(
    path: &Path,
    what: &str,
    owners: Owners,
    depth: usize,
) -> Result<(), PermError> {
    let Some(name) = path.file_name() else {
        return Ok(());
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The directory that holds the socket: a sticky root-owned one passes (nobody else
    // can replace root's entry in it).
    let w = Walk::new(Checks::Strict(owners), what, parent).above();
    let (dir, _, _) = w.walk_from_root(parent, Last::Dir)?;
    let Some(target) = link_target(&dir, path, name, what, owners)? else {
        return Ok(());
    };
    if depth >= MAX_LINKS {
        return Err(PermError::Io {
            path: path.to_path_buf(),
            error: Errno::ELOOP.into(),
        });
    }
    // Messages about what is beyond the link say which path led there.
    let through;
    let what = if depth == 0 {
        through = format!("{what} (reached through {})", path.display());
        &through
    } else {
        what
    };
    check_socket_links(&parent.join(target), what, owners, depth + 1)
}

/// The target of `name` in `dir` (at `path`) if it is a link (None if it is not), once
/// its owner is judged.
fn link_target(
    dir: &OwnedFd,
    path: &Path,
    name: &OsStr,
    what: &str,
    owners: Owners,
) -> Result<Option<PathBuf>, PermError> {
    let io = |e: Errno| PermError::Io {
        path: path.to_path_buf(),
        error: e.into(),
    };
    let fd = openat(dir, name, OFlag::O_PATH).map_err(io)?;
    let st = fstat(&fd).map_err(io)?;
    if file_type(&st) != SFlag::S_IFLNK {
        return Ok(None);
    }
    if !owners.allowed(st.st_uid) {
        return Err(PermError::Link {
            path: path.to_path_buf(),
            uid: st.st_uid,
            what: format!(" as {what}"),
            hint: owners.hint,
        });
    }
    let target = nix::fcntl::readlinkat(Some(fd.as_raw_fd()), "").map_err(io)?;
    Ok(Some(PathBuf::from(target)))
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

/// How the last component of a walk is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    /// A directory, as an `O_PATH` descriptor to open from.
    Dir,
    /// A regular file to read: reopened `O_RDONLY|O_NONBLOCK` once judged.
    Read,
    /// A regular file only to judge (and execute): `O_PATH`, no read permission needed.
    Path,
    /// Anything, only to judge: `O_PATH` ([`check`]).
    Any,
}

/// One step of a walk: back to `/` (an absolute link target), or a name.
enum Step {
    Root,
    Name(OsString),
}

fn steps(path: &Path) -> Vec<Step> {
    path.components()
        .filter_map(|c| match c {
            Component::RootDir => Some(Step::Root),
            Component::CurDir | Component::Prefix(_) => None,
            Component::ParentDir => Some(Step::Name("..".into())),
            Component::Normal(n) => Some(Step::Name(n.to_os_string())),
        })
        .collect()
}

fn openat(dir: &OwnedFd, name: &OsStr, flags: OFlag) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )?;
    // SAFETY: openat has just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_root() -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: open has just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> Result<FileStat, Errno> {
    nix::sys::stat::fstat(fd.as_raw_fd())
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// What a file that is not a regular one is, for the message.
fn kind_name(st: &FileStat) -> &'static str {
    match file_type(st) {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFLNK => "a symbolic link",
        _ => "not a file",
    }
}

/// A walk from `/` to one path (see the module documentation).
struct Walk<'a> {
    checks: Checks,
    /// What is loaded through the path, for messages.
    what: &'a str,
    /// The path as the caller named it.
    given: &'a Path,
    /// The last component is a directory above what is trusted, where a root-owned
    /// sticky directory is fine (the directory of the audit log, the nearest existing
    /// ancestor of a path not created yet).
    last_above: bool,
}

impl<'a> Walk<'a> {
    fn new(checks: Checks, what: &'a str, given: &'a Path) -> Walk<'a> {
        Walk {
            checks,
            what,
            given,
            last_above: false,
        }
    }

    /// The last component is a directory above what is trusted (see `last_above`).
    fn above(self) -> Walk<'a> {
        Walk {
            last_above: true,
            ..self
        }
    }

    fn what(&self, real: &Path) -> String {
        let through = if real == self.given {
            String::new()
        } else {
            format!(" (reached through {})", self.given.display())
        };
        if self.what.is_empty() {
            through
        } else {
            format!(" as {}{through}", self.what)
        }
    }

    /// An error at `path` on the way to the given path: named by the given path, and
    /// by where it happened when that is elsewhere (a link's target, a directory).
    fn io(&self, path: &Path, e: Errno) -> PermError {
        let error = std::io::Error::from(e);
        let error = if path == self.given {
            error
        } else {
            std::io::Error::new(error.kind(), format!("{}: {error}", path.display()))
        };
        PermError::Io {
            path: self.given.to_path_buf(),
            error,
        }
    }

    /// Owner and mode of what `fd` is (at `real`); `above`: a directory above what is
    /// trusted, where a root-owned sticky directory is fine.
    fn judge(
        &self,
        fd: &OwnedFd,
        st: &FileStat,
        real: &Path,
        above: bool,
    ) -> Result<(), PermError> {
        let Checks::Strict(owners) = self.checks else {
            return Ok(());
        };
        let mode = st.st_mode & 0o7777;
        if !owners.allowed(st.st_uid) {
            return Err(PermError::Owner {
                path: real.to_path_buf(),
                uid: st.st_uid,
                what: self.what(real),
                hint: owners.hint,
            });
        }
        let sticky_root_dir =
            above && file_type(st) == SFlag::S_IFDIR && st.st_uid == 0 && mode & STICKY != 0;
        if mode & GROUP_OTHER_WRITE != 0 && !sticky_root_dir && !read_only_fd(fd) {
            return Err(PermError::Writable {
                path: real.to_path_buf(),
                mode,
                what: self.what(real),
                hint: owners.hint,
            });
        }
        Ok(())
    }

    /// Walks `rest` from the directory `dir` (at `real`, judged already) and opens its
    /// last component as `last` says. Returns the descriptor, its status and its path
    /// with every link resolved.
    fn walk(
        &self,
        mut dir: OwnedFd,
        mut real: PathBuf,
        rest: &Path,
        last: Last,
    ) -> Result<(OwnedFd, FileStat, PathBuf), PermError> {
        let mut todo: std::collections::VecDeque<Step> = steps(rest).into();
        let mut links = 0;
        while let Some(step) = todo.pop_front() {
            let name = match step {
                Step::Root => {
                    real = PathBuf::from("/");
                    dir = open_root().map_err(|e| self.io(&real, e))?;
                    let st = fstat(&dir).map_err(|e| self.io(&real, e))?;
                    self.judge(&dir, &st, &real, !todo.is_empty())?;
                    continue;
                }
                Step::Name(n) => n,
            };
            let is_last = todo.is_empty();
            let next = if name == ".." {
                real.parent().unwrap_or(Path::new("/")).to_path_buf()
            } else {
                real.join(&name)
            };
            let fd = openat(&dir, &name, OFlag::O_PATH).map_err(|e| self.io(&next, e))?;
            let st = fstat(&fd).map_err(|e| self.io(&next, e))?;
            if file_type(&st) == SFlag::S_IFLNK {
                links += 1;
                if links > MAX_LINKS {
                    return Err(self.io(&next, Errno::ELOOP));
                }
                if let Checks::Strict(owners) = self.checks {
                    if !owners.allowed(st.st_uid) {
                        return Err(PermError::Link {
                            path: next.clone(),
                            uid: st.st_uid,
                            what: self.what(&next),
                            hint: owners.hint,
                        });
                    }
                }
                // Read from the link that was judged, not again by name.
                let target = nix::fcntl::readlinkat(Some(fd.as_raw_fd()), "")
                    .map_err(|e| self.io(&next, e))?;
                for s in steps(Path::new(&target)).into_iter().rev() {
                    todo.push_front(s);
                }
                continue;
            }
            let is_dir = file_type(&st) == SFlag::S_IFDIR;
            if !is_last {
                if !is_dir {
                    return Err(self.io(&next, Errno::ENOTDIR));
                }
                self.judge(&fd, &st, &next, true)?;
                dir = fd;
                real = next;
                continue;
            }
            return self.finish(fd, st, next, &dir, &name, last);
        }
        // The path ended at a directory already open (`/`, or a link to `.`).
        let st = fstat(&dir).map_err(|e| self.io(&real, e))?;
        let fd = dir;
        match last {
            Last::Dir | Last::Any => {
                self.judge(&fd, &st, &real, self.last_above)?;
                Ok((fd, st, real))
            }
            Last::Read | Last::Path => Err(PermError::NotRegular {
                what: self.what(&real),
                path: real,
                kind: "a directory",
            }),
        }
    }

    /// The last component, open as `O_PATH` at `real` (`name` in `dir`): judged, and
    /// reopened for reading if asked.
    fn finish(
        &self,
        fd: OwnedFd,
        st: FileStat,
        real: PathBuf,
        dir: &OwnedFd,
        name: &OsStr,
        last: Last,
    ) -> Result<(OwnedFd, FileStat, PathBuf), PermError> {
        let is_dir = file_type(&st) == SFlag::S_IFDIR;
        match last {
            Last::Dir if !is_dir => return Err(self.io(&real, Errno::ENOTDIR)),
            Last::Read | Last::Path if file_type(&st) != SFlag::S_IFREG => {
                return Err(PermError::NotRegular {
                    what: self.what(&real),
                    path: real,
                    kind: kind_name(&st),
                })
            }
            _ => {}
        }
        self.judge(&fd, &st, &real, self.last_above)?;
        if last != Last::Read {
            return Ok((fd, st, real));
        }
        // Opened again to read, in a directory judged above: without blocking (a FIFO
        // put there since would block the open), and only if it is still the same file.
        let rd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
        )
        .map_err(|e| self.io(&real, e))?;
        let now = fstat(&rd).map_err(|e| self.io(&real, e))?;
        if file_type(&now) != SFlag::S_IFREG {
            return Err(PermError::NotRegular {
                what: self.what(&real),
                path: real,
                kind: kind_name(&now),
            });
        }
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
            // Replaced between the two opens: judge what is there now.
            return Err(self.io(&real, Errno::ESTALE));
        }
        self.judge(&rd, &now, &real, false)?;
        Ok((rd, now, real))
    }

    /// Walks `path` from `/` (a relative path from the working directory).
    fn walk_from_root(
        &self,
        path: &Path,
        last: Last,
    ) -> Result<(OwnedFd, FileStat, PathBuf), PermError> {
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|error| PermError::Io {
                    path: path.to_path_buf(),
                    error,
                })?
                .join(path)
        };
        // `abs` starts with `/`: the walk's first step opens and judges it.
        let root = PathBuf::from("/");
        let dir = open_root().map_err(|e| self.io(&root, e))?;
        self.walk(dir, root, &abs, last)
    }
}

fn read_only_fd(fd: &OwnedFd) -> bool {
    use nix::sys::statvfs::{fstatvfs, FsFlags};
    fstatvfs(fd.as_fd()).is_ok_and(|s| s.flags().contains(FsFlags::ST_RDONLY))
}

/// A directory opened and judged by [`open_dir`]: what is in it is opened from its
/// descriptor, never again through its path.
#[derive(Debug)]
pub struct CheckedDir {
    fd: OwnedFd,
    real: PathBuf,
    given: PathBuf,
    checks: Checks,
}

impl CheckedDir {
    /// The directory's descriptor (`O_PATH`), to open or create what is in it.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The names in the directory (without `.` and `..`), unsorted.
    pub fn names(&self) -> Result<Vec<OsString>, PermError> {
        let io = |e: Errno| PermError::Io {
            path: self.given.clone(),
            error: e.into(),
        };
        let fd = openat(
            &self.fd,
            OsStr::new("."),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        )
        .map_err(io)?;
        // SAFETY: fdopendir takes over the descriptor (released from its owner here) and
        // closedir below closes it; readdir's entries are read before the next call.
        unsafe {
            let d = libc::fdopendir(std::os::fd::IntoRawFd::into_raw_fd(fd));
            if d.is_null() {
                return Err(io(Errno::last()));
            }
            let mut names = Vec::new();
            let end = loop {
                Errno::clear();
                let e = libc::readdir64(d);
                if e.is_null() {
                    break match Errno::last_raw() {
                        0 => Ok(()),
                        n => Err(io(Errno::from_raw(n))),
                    };
                }
                let n = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
                let n = OsStr::from_bytes(n.to_bytes());
                if n != "." && n != ".." {
                    names.push(n.to_os_string());
                }
            };
            libc::closedir(d);
            end.map(|()| names)
        }
    }

    /// Opens `name` in this directory to read it, judged like [`open_file`].
    pub fn open_file(&self, name: &OsStr, what: &str) -> Result<File, PermError> {
        let given = self.given.join(name);
        let w = Walk::new(self.checks, what, &given);
        let dir = self.fd.try_clone().map_err(|error| PermError::Io {
            path: self.given.clone(),
            error,
        })?;
        let (fd, _, _) = w.walk(dir, self.real.clone(), Path::new(name), Last::Read)?;
        Ok(File::from(fd))
    }
}

/// Opens the directory `path`, walking and judging every component (see the module
/// documentation).
pub fn open_dir(path: &Path, what: &str, checks: Checks) -> Result<CheckedDir, PermError> {
    checked_dir(Walk::new(checks, what, path))
}

/// Like [`open_dir`] for the directory a file is created in (the audit log's): a
/// root-owned sticky directory such as /tmp is fine there, as above a trusted path.
pub fn open_dir_above(path: &Path, what: &str, checks: Checks) -> Result<CheckedDir, PermError> {
    checked_dir(Walk::new(checks, what, path).above())
}

fn checked_dir(w: Walk<'_>) -> Result<CheckedDir, PermError> {
    let (fd, _, real) = w.walk_from_root(w.given, Last::Dir)?;
    Ok(CheckedDir {
        fd,
        real,
        given: w.given.to_path_buf(),
        checks: w.checks,
    })
}

/// Opens the regular file `path` to read it (read it with [`read_text`]), walking and
/// judging every component on the way and the file itself on the descriptor returned.
pub fn open_file(path: &Path, what: &str, checks: Checks) -> Result<File, PermError> {
    let w = Walk::new(checks, what, path);
    let (fd, _, _) = w.walk_from_root(path, Last::Read)?;
    Ok(File::from(fd))
}

/// Opens the program `path` as [`open_file`] judges a file: to read it (`read`, what
/// the agent does before it runs it from that descriptor) or only to judge it (`O_PATH`,
/// for `check` run by a user who may not read it).
pub fn open_program(
    path: &Path,
    what: &str,
    checks: Checks,
    read: bool,
) -> Result<File, PermError> {
    let w = Walk::new(checks, what, path);
    let last = if read { Last::Read } else { Last::Path };
    let (fd, _, _) = w.walk_from_root(path, last)?;
    Ok(File::from(fd))
}

/// A program to run, as [`open_program_to_run`] opened and judged it.
#[derive(Debug)]
pub struct Program {
    /// The directory its path names it in (links above it resolved), opened and judged.
    pub dir: CheckedDir,
    /// Its name in `dir`, as the command gives it: the file, or a link to it that the
    /// walk judged (root's, like everything it leads through).
    pub name: OsString,
    /// The file, opened for reading and judged.
    pub file: File,
}

/// Opens the program `path` to run it: its directory (the path's parent, every link on
/// the way resolved) opened and judged, and the file opened from that directory by the
/// path's last name and judged, with every link it leads through. The caller runs it as
/// `execveat(dir, name, 0)`: the name and every link behind it are in directories
/// nobody but root (or the agent's user) can change, so what runs is what was judged,
/// and the process is named as for `execve(path)` (`/bin/sleep` as "sleep", even where
/// it is a link to a multi-call binary).
pub fn open_program_to_run(path: &Path, what: &str, checks: Checks) -> Result<Program, PermError> {
    let w = Walk::new(checks, what, path);
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(w.io(path, Errno::EISDIR));
    };
    let dir = open_dir(parent, what, checks)?;
    let file = dir.open_file(name, what)?;
    Ok(Program {
        dir,
        name: name.to_os_string(),
        file,
    })
}

/// Levels of `#!` the kernel follows (an interpreter that is itself a script, and so
/// on) before it gives up with ELOOP: `exec_binprm`'s limit.
const MAX_INTERPRETERS: usize = 5;

/// The interpreter a script names on its `#!` line (read from `file`, at offset 0,
/// without moving it), parsed as the kernel does (`binfmt_script`): the first 256 bytes,
/// blanks (space, tab) skipped after `#!`, the name ending at a blank, a NUL or the end
/// of the line. None if the file does not start with `#!` (or cannot be read).
pub fn interpreter(file: &File) -> Option<PathBuf> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 256];
    let n = file.read_at(&mut head, 0).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = line.split(|&b| b == b'\n').next()?;
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !blank(b))?;
    let name = line[start..]
        .split(|b| blank(b) || *b == 0)
        .next()
        .filter(|n| !n.is_empty())?;
    Some(PathBuf::from(OsStr::from_bytes(name)))
}

/// Judges the `#!` interpreters of the program open as `file` (at `path`), which run as
/// root too and which the kernel finds by path: each one as [`open_program`] judges a
/// program, and, since an interpreter may itself be a script, its own interpreter in
/// turn, as deep as the kernel goes. A relative interpreter is refused: the kernel
/// resolves it from the working directory of whoever runs the hook. An interpreter this
/// user cannot read (`check` as a user) is judged but not looked into.
pub fn check_interpreters(file: &File, path: &Path, checks: Checks) -> Result<(), PermError> {
    const WHAT: &str = "the interpreter of an exec hook";
    let mut script = path.to_path_buf();
    let mut next = interpreter(file);
    for _ in 0..MAX_INTERPRETERS {
        let Some(interp) = next else {
            return Ok(());
        };
        if !interp.is_absolute() {
            return Err(PermError::Io {
                path: script,
                error: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "its `#!` interpreter {} is a relative path, found from the working directory of whoever runs it: refusing it (fix: an absolute path)",
                        interp.display()
                    ),
                ),
            });
        }
        let f = match open_program(&interp, WHAT, checks, true) {
            Ok(f) => f,
            Err(PermError::Io { error, .. })
                if error.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                return open_program(&interp, WHAT, checks, false).map(|_| ());
            }
            Err(e) => return Err(e),
        };
        next = interpreter(&f);
        script = interp;
    }
    match next {
        None => Ok(()),
        Some(_) => Err(PermError::Io {
            path: path.to_path_buf(),
            error: Errno::ELOOP.into(),
        }),
    }
}

/// The whole text of a file opened by [`open_file`], at most [`MAX_FILE`] bytes.
pub fn read_text(file: File, path: &Path, what: &str) -> Result<String, PermError> {
    let too_large = || PermError::TooLarge {
        path: path.to_path_buf(),
        limit: MAX_FILE,
        what: if what.is_empty() {
            String::new()
        } else {
            format!(" as {what}")
        },
    };
    let io = |error| PermError::Io {
        path: path.to_path_buf(),
        error,
    };
    if file.metadata().map_err(io)?.len() > MAX_FILE {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|_| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ))
    })
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

    #[test]
    fn check_does_not_follow_a_link_another_user_owns() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let (t, dir, file) = tree();
        chmod(t.path(), 0o755);
        // nobody's own directory, and in it a link to root's policies.
        let home = t.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
        let link = home.join("pol");
        symlink(&dir, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let e = check(&link.join("a.toml"), "the audit log", ROOT_ONLY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        assert!(check_existing_part(&link.join("new"), "the state dir", ROOT_ONLY).is_err());
        // The same link in a sticky root directory: refused as a link.
        chmod(&home, 0o1777);
        std::os::unix::fs::chown(&home, Some(0), Some(0)).unwrap();
        let e = check(&link.join("a.toml"), "", ROOT_ONLY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a symbolic link owned by uid 65534"), "{e}");
        // Root's own link is followed.
        std::os::unix::fs::lchown(&link, Some(0), Some(0)).unwrap();
        check(&link.join("a.toml"), "", ROOT_ONLY).unwrap();
        check(&file, "", ROOT_ONLY).unwrap();
    }

    #[test]
    fn interpreters_are_judged_down_a_chain_and_relative_ones_refused() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let (t, dir, _file) = tree();
        chmod(t.path(), 0o755);
        let script = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            chmod(&p, 0o755);
            p
        };
        let open = |p: &Path| open_program(p, "", Checks::Strict(ROOT_ONLY), true).unwrap();
        let evil = script("evil", "#!/bin/sh\n");
        std::os::unix::fs::chown(&evil, Some(65534), None).unwrap();
        let wrap = script("wrap", &format!("#!{}\n", evil.display()));
        let hook = script("hook", &format!("#! \t{} -x\necho\n", wrap.display()));
        let e = check_interpreters(&open(&hook), &hook, Checks::Strict(ROOT_ONLY))
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        std::os::unix::fs::chown(&evil, Some(0), None).unwrap();
        check_interpreters(&open(&hook), &hook, Checks::Strict(ROOT_ONLY)).unwrap();
        // The kernel finds a relative interpreter from the working directory.
        let rel = script("rel", "#!tmp/evil\n");
        let e = check_interpreters(&open(&rel), &rel, Checks::Strict(ROOT_ONLY))
            .unwrap_err()
            .to_string();
        assert!(e.contains("relative path"), "{e}");
        // A loop of scripts ends, as the kernel's does.
        let a = dir.join("loop");
        script("loop", &format!("#!{}\n", a.display()));
        assert!(check_interpreters(&open(&a), &a, Checks::Strict(ROOT_ONLY)).is_err());
        assert_eq!(
            interpreter(&open(&hook)).unwrap(),
            wrap,
            "blanks skipped, arguments cut"
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

    #[test]
    fn a_configmap_layout_is_read_through_roots_links() {
        // kubelet's layout: a.toml -> ..data/a.toml, ..data -> ..2026_12_07 (a dir).
        let (_t, dir, _file) = tree();
        let ts = dir.join("..2026_12_07");
        std::fs::create_dir(&ts).unwrap();
        chmod(&ts, 0o755);
        std::fs::write(ts.join("b.toml"), "b = 1\n").unwrap();
        chmod(&ts.join("b.toml"), 0o644);
        symlink("..2026_12_07", dir.join("..data")).unwrap();
        symlink("..data/b.toml", dir.join("b.toml")).unwrap();
        let me = Owners::current("");
        let d = open_dir(&dir, "policies", Checks::Strict(me)).unwrap();
        let mut names = d.names().unwrap();
        names.sort();
        assert_eq!(names, ["..2026_12_07", "..data", "a.toml", "b.toml"]);
        let f = d.open_file(OsStr::new("b.toml"), "policy file").unwrap();
        assert_eq!(read_text(f, &dir.join("b.toml"), "").unwrap(), "b = 1\n");
        // The same through `..` and a relative path from the working directory.
        let via = dir.join("..2026_12_07/../b.toml");
        let f = open_file(&via, "policy file", Checks::Strict(me)).unwrap();
        assert_eq!(read_text(f, &via, "").unwrap(), "b = 1\n");
        // A directory is not a file to read, nor a file a directory.
        let e = open_file(&ts, "", Checks::Strict(me))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a directory, not a regular file"), "{e}");
        assert!(open_dir(&dir.join("a.toml"), "", Checks::Strict(me)).is_err());
        // A link loop ends with ELOOP, not a hang.
        symlink("loop.toml", dir.join("loop.toml")).unwrap();
        let e = d.open_file(OsStr::new("loop.toml"), "").unwrap_err();
        assert!(
            matches!(&e, PermError::Io { error, .. } if error.raw_os_error() == Some(libc::ELOOP)),
            "{e}"
        );
    }
}
