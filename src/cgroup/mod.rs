//! The memory cgroup as the agent sees it: a hierarchy rooted at a directory passed in
//! (never a hard-coded `/sys/fs/cgroup`), cgroups named by their path below that root,
//! and one [`Controller`] trait with an implementation per cgroup version.
//!
//! A cgroup that vanishes while being read is a normal outcome: reads return `Ok(None)`,
//! writes fail with an error whose [`CgroupError::is_gone`] is true.

pub mod parse;
pub mod v1;
pub mod v2;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use parse::OomControl;

/// Which cgroup version a hierarchy is; detected from the filesystem, never the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    V1,
    V2,
}

/// Errors of the cgroup filesystem layer. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("{path}: cannot parse {what} from {content:?}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        content: String,
    },
    #[error("{path}: not a memory cgroup hierarchy (filesystem magic {magic:#x})")]
    NotCgroupFs { path: PathBuf, magic: i64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A cgroup file's error that means the cgroup is gone: ENOENT, or ENODEV from a kept
/// kernfs descriptor whose cgroup was removed.
pub(crate) fn io_is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

impl CgroupError {
    /// The system call's error behind this one, if it came from one.
    pub fn io_source(&self) -> Option<&io::Error> {
        match self {
            CgroupError::Read { source, .. }
            | CgroupError::Write { source, .. }
            | CgroupError::Io { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The cgroup (or its file) disappeared: a normal outcome, not a failure.
    pub fn is_gone(&self) -> bool {
        match self {
            CgroupError::Read { source, .. }
            | CgroupError::Write { source, .. }
            | CgroupError::Io { source, .. } => io_is_gone(source),
            _ => false,
        }
    }

    /// The kernel refused a write because it cannot be honoured now (v1: lowering a
    /// limit below current usage gives EBUSY).
    pub fn is_busy(&self) -> bool {
        matches!(self, CgroupError::Write { source, .. } if source.raw_os_error() == Some(libc::EBUSY))
    }
}

pub type Result<T> = std::result::Result<T, CgroupError>;

/// A path that cannot name a cgroup below the root: it would leave it, or it holds a
/// byte no cgroup name can contain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("cgroup path {path:?}: a `..` segment would leave the hierarchy root")]
    Parent { path: String },
    #[error("cgroup path {path:?}: contains a NUL byte")]
    Nul { path: String },
}

/// A cgroup named by its path below the hierarchy root, always with a leading `/`
/// (the root itself is `/`), the same form as `/proc/PID/cgroup` and the policy globs.
///
/// A cgroup name is bytes (anything but `/` and NUL), not text. The path keeps those
/// bytes ([`CgroupPath::as_bytes`], used for every filesystem access) and a lossless text
/// form ([`CgroupPath::as_str`], used by `Display`, JSON, the policy globs and logs):
/// - a name that is valid UTF-8 is its own text form, with one exception below;
/// - each byte that is not part of valid UTF-8 is written `\xHH` (lowercase hex, always
///   80..ff);
/// - a literal `\` that would read as such an escape (it is followed by `x` and two hex
///   digits worth 80..ff, or `5c`) is written `\x5c`.
///
/// Reading the text form back ([`CgroupPath::parse`], `Deserialize`) turns `\xHH` with
/// HH in 80..ff or 5c back into that byte and leaves everything else as it is, so
/// `parse(p.as_str()) == p` for every path. systemd's own escapes such as `\x2d` are left
/// alone, so unit names look as `systemctl` shows them.
///
/// No path ever leaves the root: a `..` segment is refused by the fallible constructors
/// ([`CgroupPath::parse`], [`CgroupPath::from_bytes`], `Deserialize`) and dropped by the
/// infallible ones meant for literals ([`CgroupPath::new`], [`CgroupPath::join`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath {
    raw: Vec<u8>,
    /// `escape(raw)`, kept so that `as_str` can hand out a `&str`.
    text: String,
}

impl CgroupPath {
    pub fn root() -> CgroupPath {
        CgroupPath {
            raw: b"/".to_vec(),
            text: "/".to_string(),
        }
    }

    /// Parses a path in the text form (from a user, the journal, a policy): escapes are
    /// decoded, a leading `/` is added, duplicate and trailing slashes and `.` segments
    /// are removed. A `..` segment is an error: a path never leaves the root.
    pub fn parse(s: &str) -> std::result::Result<CgroupPath, PathError> {
        CgroupPath::from_bytes(&unescape(s)).map_err(|e| match e {
            PathError::Parent { .. } => PathError::Parent {
                path: s.to_string(),
            },
            PathError::Nul { .. } => PathError::Nul {
                path: s.to_string(),
            },
        })
    }

    /// A path from raw bytes (a directory name, `/proc/PID/cgroup`), normalised as
    /// [`CgroupPath::parse`] does, without decoding escapes.
    pub fn from_bytes(b: &[u8]) -> std::result::Result<CgroupPath, PathError> {
        let mut raw = Vec::with_capacity(b.len() + 1);
        for seg in b.split(|&c| c == b'/') {
            match seg {
                b"" | b"." => {}
                b".." => return Err(PathError::Parent { path: escape(b) }),
                s if s.contains(&0) => return Err(PathError::Nul { path: escape(b) }),
                s => {
                    raw.push(b'/');
                    raw.extend_from_slice(s);
                }
            }
        }
        Ok(CgroupPath::from_normalised(raw))
    }

    /// For literals and trusted text (tests, constants): like [`CgroupPath::parse`], but
    /// a `..` segment (or one holding NUL) is dropped instead of refused. Anything that
    /// comes from outside the agent goes through `parse`.
    pub fn new(s: &str) -> CgroupPath {
        CgroupPath::from_bytes_lenient(&unescape(s))
    }

    fn from_bytes_lenient(b: &[u8]) -> CgroupPath {
        let mut raw = Vec::with_capacity(b.len() + 1);
        for seg in b.split(|&c| c == b'/') {
            if seg.is_empty() || seg == b"." || seg == b".." || seg.contains(&0) {
                continue;
            }
            raw.push(b'/');
            raw.extend_from_slice(seg);
        }
        CgroupPath::from_normalised(raw)
    }

    /// `raw` is `/`-separated non-empty segments with a leading `/`, or empty (the root).
    fn from_normalised(mut raw: Vec<u8>) -> CgroupPath {
        if raw.is_empty() {
            raw.push(b'/');
        }
        let text = escape(&raw);
        CgroupPath { raw, text }
    }

    /// The lossless text form (see the type's documentation).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The path as the kernel names it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    pub fn is_root(&self) -> bool {
        self.raw == b"/"
    }

    /// The path segments in the text form, empty for the root.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.text.split('/').filter(|s| !s.is_empty())
    }

    pub fn parent(&self) -> Option<CgroupPath> {
        if self.is_root() {
            return None;
        }
        let idx = self.raw.iter().rposition(|&c| c == b'/').unwrap_or(0);
        Some(CgroupPath::from_normalised(self.raw[..idx].to_vec()))
    }

    /// The cgroup `name` below this one. `name` is raw bytes (a directory entry) or
    /// text without escapes; it may hold several segments. `..` segments are dropped.
    pub fn join(&self, name: impl AsRef<std::ffi::OsStr>) -> CgroupPath {
        use std::os::unix::ffi::OsStrExt;
        let mut b = self.raw.clone();
        b.push(b'/');
        b.extend_from_slice(name.as_ref().as_bytes());
        CgroupPath::from_bytes_lenient(&b)
    }

    /// True if `self` is `other` or below it.
    pub fn is_within(&self, other: &CgroupPath) -> bool {
        other.is_root()
            || self.raw == other.raw
            || (self.raw.starts_with(&other.raw) && self.raw.get(other.raw.len()) == Some(&b'/'))
    }

    /// The path relative to the root in the text form, without the leading `/` ("" for
    /// the root). For the directory, use [`Hierarchy::dir`].
    pub fn relative(&self) -> &str {
        &self.text[1..]
    }

    /// The path relative to the root as the kernel names it, for joining to a directory.
    pub fn relative_os(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.raw[1..])
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CgroupPath({:?})", self.text)
    }
}

impl Serialize for CgroupPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for CgroupPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        CgroupPath::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Does `b[i..]` start with an escape that [`unescape`] decodes? Returns its byte.
fn escape_at(b: &[u8], i: usize) -> Option<u8> {
    let hex = |c: u8| (c as char).to_digit(16);
    match b.get(i..i + 4)? {
        [b'\\', b'x', h, l] => {
            let v = u8::try_from(hex(*h)? * 16 + hex(*l)?).ok()?;
            (v >= 0x80 || v == b'\\').then_some(v)
        }
        _ => None,
    }
}

/// The text form of a raw path: see [`CgroupPath`].
fn escape(raw: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        let valid = chunk.valid();
        for (i, c) in valid.char_indices() {
            if c == '\\' && escape_at(valid.as_bytes(), i).is_some() {
                out.push_str("\\x5c");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The raw bytes of a text form: see [`CgroupPath`].
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(v) = escape_at(b, i) {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// A mounted memory cgroup hierarchy (or a subtree of one) that the agent manages.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    root: PathBuf,
    kind: Kind,
    /// Where `root` sits in the hierarchy as /proc/PID/cgroup names it.
    prefix: CgroupPath,
    /// A real cgroup filesystem (from [`Hierarchy::detect`]), not a TempDir fake.
    live: bool,
}

impl Hierarchy {
    /// Opens a real hierarchy: the kind comes from the statfs magic (as the kernel tells
    /// it), the prefix from `<proc_root>/self/mountinfo`.
    pub fn detect(root: &Path, proc_root: &Path) -> Result<Hierarchy> {
        let root = root.canonicalize().map_err(|source| CgroupError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let magic = crate::sys::fs_magic(&root).map_err(|source| CgroupError::Io {
            path: root.clone(),
            source,
        })?;
        let kind = match magic {
            crate::sys::CGROUP_SUPER_MAGIC => Kind::V1,
            crate::sys::CGROUP2_SUPER_MAGIC => Kind::V2,
            _ => return Err(CgroupError::NotCgroupFs { path: root, magic }),
        };
        if kind == Kind::V1 && !root.join("memory.oom_control").exists() {
            return Err(CgroupError::NotCgroupFs { path: root, magic });
        }
        let mountinfo_path = proc_root.join("self/mountinfo");
        let mountinfo =
            std::fs::read_to_string(&mountinfo_path).map_err(|source| CgroupError::Read {
                path: mountinfo_path.clone(),
                source,
            })?;
        let prefix = hierarchy_prefix(&mountinfo, &root).unwrap_or_else(CgroupPath::root);
        Ok(Hierarchy {
            root,
            kind,
            prefix,
            live: true,
        })
    }

    /// A hierarchy on any directory, of a stated kind: for unit tests on a TempDir.
    pub fn fake(root: &Path, kind: Kind) -> Hierarchy {
        Hierarchy {
            root: root.to_path_buf(),
            kind,
            prefix: CgroupPath::root(),
            live: false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A real cgroup filesystem, where control files can be kept open and written at
    /// any offset (a TempDir fake holds plain files).
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// The directory of a cgroup.
    pub fn dir(&self, cg: &CgroupPath) -> PathBuf {
        self.root.join(cg.relative_os())
    }

    /// The path /proc/PID/cgroup shows for a cgroup of this hierarchy.
    pub fn proc_path(&self, cg: &CgroupPath) -> CgroupPath {
        self.prefix.join(cg.relative_os())
    }

    /// The cgroup for a /proc/PID/cgroup path (raw bytes, as the kernel writes it), if it
    /// lies in this hierarchy.
    pub fn from_proc_path(&self, p: impl AsRef<[u8]>) -> Option<CgroupPath> {
        let p = CgroupPath::from_bytes(p.as_ref()).ok()?;
        if !p.is_within(&self.prefix) {
            return None;
        }
        let rest = if self.prefix.is_root() {
            p.as_bytes()
        } else {
            &p.as_bytes()[self.prefix.as_bytes().len()..]
        };
        CgroupPath::from_bytes(rest).ok()
    }

    /// Every cgroup at or below `from`, parents before children. Directories that vanish
    /// during the walk are skipped.
    pub fn walk(&self, from: &CgroupPath) -> Vec<CgroupPath> {
        self.walk_checked(from).0
    }

    /// [`Hierarchy::walk`], and whether every directory could be listed. A cgroup that
    /// exists but cannot be listed is in the list without its children, and the walk is
    /// incomplete: the agent inside a cgroup at its wall cannot open a directory
    /// (ENOMEM: the kernel's `struct file` is charged there too), and what it could not
    /// list is not gone.
    pub fn walk_checked(&self, from: &CgroupPath) -> (Vec<CgroupPath>, bool) {
        let mut out = Vec::new();
        let mut complete = true;
        let mut stack = vec![from.clone()];
        while let Some(cg) = stack.pop() {
            let rd = match std::fs::read_dir(self.dir(&cg)) {
                Ok(rd) => rd,
                Err(e) if io_is_gone(&e) || e.raw_os_error() == Some(libc::ENOTDIR) => continue,
                Err(_) => {
                    complete = false;
                    out.push(cg);
                    continue;
                }
            };
            let mut children = Vec::new();
            for e in rd {
                let Ok(e) = e else {
                    complete = false;
                    continue;
                };
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    children.push(cg.join(e.file_name()));
                }
            }
            children.sort();
            out.push(cg);
            stack.extend(children.into_iter().rev());
        }
        (out, complete)
    }
}

/// Removes a cgroup directory and every cgroup below it, deepest first (cgroupfs takes
/// rmdir only). A cgroup whose last task is still exiting refuses with EBUSY for a
/// moment, so each rmdir is retried for up to `patience`. Returns false if something
/// is left.
pub fn remove_tree(dir: &Path, patience: std::time::Duration) -> bool {
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.path()),
            );
        }
        dirs.push(d);
    }
    let mut all_gone = true;
    for d in dirs.iter().rev() {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(_) => {
                    all_gone = false;
                    break;
                }
            }
        }
    }
    all_gone
}

/// Finds the mount holding `root` in mountinfo text and returns root's path inside the
/// hierarchy (the mount's own root plus the part of `root` below the mount point).
fn hierarchy_prefix(mountinfo: &str, root: &Path) -> Option<CgroupPath> {
    let root_s = root.to_str()?;
    let mut best: Option<(usize, CgroupPath)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        let (mnt_root, mnt_point) = (fields.get(3)?, fields.get(4)?);
        let fstype = fields.get(sep + 1)?;
        let super_opts = fields.get(sep + 3).copied().unwrap_or("");
        let is_memcg = (*fstype == "cgroup" && super_opts.split(',').any(|o| o == "memory"))
            || *fstype == "cgroup2";
        if !is_memcg {
            continue;
        }
        let below = if root_s == *mnt_point {
            ""
        } else if let Some(rest) = root_s.strip_prefix(&format!("{mnt_point}/")) {
            rest
        } else {
            continue;
        };
        if best
            .as_ref()
            .is_some_and(|(len, _)| *len >= mnt_point.len())
        {
            continue;
        }
        let Ok(joined) = CgroupPath::parse(&format!("{mnt_root}/{below}")) else {
            continue;
        };
        best = Some((mnt_point.len(), joined));
    }
    best.map(|(_, p)| p)
}

/// Memory limits of a cgroup: the memory limit (v1 `memory.limit_in_bytes`, v2
/// `memory.max`), on v1 with swap accounting the memory+swap limit, on v2 the throttle
/// limit `memory.high` (`None` where the file does not exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory: u64,
    pub memsw: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<u64>,
}

/// Which cgroup, as opposed to which path: the inode of its directory (on cgroupfs the
/// kernfs node id, not reused while the system runs) and the boot it was seen in (the
/// kernel's `boot_id`; node ids start again at every boot). A cgroup removed and made
/// again at the same path is another cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub ino: u64,
    pub boot: String,
}

/// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`), read once (a failed
/// read is tried again at the next call, never kept as an empty id). Read at start, so
/// that an episode never needs to open it (the agent may share a stuck cgroup).
pub fn boot_id() -> io::Result<&'static str> {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(b) = BOOT.get() {
        return Ok(b);
    }
    let b = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    Ok(BOOT.get_or_init(|| b.trim().to_string()))
}

impl Hierarchy {
    /// The identity of the cgroup now at `cg`'s path. `Ok(None)`: no cgroup there.
    pub fn identity(&self, cg: &CgroupPath) -> io::Result<Option<Identity>> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(self.dir(cg)) {
            Ok(m) if m.is_dir() => Ok(Some(Identity {
                ino: m.ino(),
                boot: boot_id()?.to_string(),
            })),
            Ok(_) => Ok(None),
            Err(e) if io_is_gone(&e) || e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// How a reclaim request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimEnd {
    /// The kernel ended it: v2 reclaimed the amount asked; v1 `force_empty` emptied the
    /// cgroup or gave up (it has no target to fall short of).
    Finished,
    /// v2: the kernel answered EAGAIN, it could not reclaim the amount asked.
    Short,
    /// Cut short by the time bound (the write returned EINTR).
    TimedOut,
}

/// What one reclaim request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimed {
    /// Usage just before the request and just after it returned; the workload may have
    /// charged pages meanwhile, so their difference is the net effect, not what the
    /// kernel took (neither file tells that).
    pub before: u64,
    pub after: u64,
    /// v2: the amount asked of `memory.reclaim` (v1 `force_empty` takes no amount).
    pub requested: Option<u64>,
    pub end: ReclaimEnd,
    pub took: Duration,
}

impl Reclaimed {
    /// How far usage fell over the request (0 if it rose).
    pub fn freed(&self) -> u64 {
        self.before.saturating_sub(self.after)
    }
}

/// Makes one write(2) of `value` to `f` that a signal from a [`crate::sys::ThreadAlarm`]
/// interrupts after `timeout` (reclaim loops in the kernel check for a pending signal
/// between passes). `Ok(true)`: the bound cut it short. An EINTR is not retried.
pub(crate) fn write_bounded(
    f: &std::fs::File,
    value: &[u8],
    timeout: Duration,
) -> io::Result<bool> {
    use std::io::Write;
    /// After the first interrupt, how often it is repeated (in case it landed just
    /// before the write began).
    const REPEAT: Duration = Duration::from_millis(20);
    let alarm = crate::sys::ThreadAlarm::arm(timeout, REPEAT)?;
    let res = { f }.write(value);
    drop(alarm);
    match res {
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

/// What the agent does to a memory cgroup, whatever its version. Reads return `Ok(None)`
/// when the cgroup is gone.
pub trait Controller: Send + Sync {
    fn hierarchy(&self) -> &Hierarchy;
    /// OOM state; v1 reads `memory.oom_control`.
    fn oom_state(&self, cg: &CgroupPath) -> Result<Option<OomControl>>;
    fn limits(&self, cg: &CgroupPath) -> Result<Option<Limits>>;
    fn usage(&self, cg: &CgroupPath) -> Result<Option<u64>>;
    /// Sets limits in the order the kernel accepts (v1: memsw above memory always).
    fn set_limits(&self, cg: &CgroupPath, from: Limits, to: Limits) -> Result<()>;
    /// Reclaims what the kernel can (v1 `memory.force_empty`, v2 `memory.reclaim` of
    /// everything in use), cut short after `timeout`. `Ok(None)`: the cgroup is gone.
    fn reclaim(&self, cg: &CgroupPath, timeout: Duration) -> Result<Option<Reclaimed>>;
    /// Processes directly in `cg` (not its descendants).
    fn procs(&self, cg: &CgroupPath) -> Result<Option<Vec<i32>>>;
    /// `memory.stat` as key -> value.
    fn stat(&self, cg: &CgroupPath) -> Result<Option<std::collections::BTreeMap<String, u64>>>;
    /// How many charges hit the limit so far (v1 `memory.failcnt`); `None` where the
    /// hierarchy has no such counter (v2) or the cgroup is gone.
    fn failcnt(&self, _cg: &CgroupPath) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Opens ahead of time what an episode on `cg` reads and writes, so that a rescue
    /// needs no new kernel memory (the agent may share the stuck cgroup). Best effort.
    fn prepare(&self, _cg: &CgroupPath) {}
    /// Closes what [`Controller::prepare`] kept open for `cg` (when it is unwatched).
    fn forget(&self, _cg: &CgroupPath) {}
    /// The file descriptors the event loop polls to learn that the cgroup may be stuck
    /// (v1: an OOM eventfd; v2: `memory.events`, and a PSI trigger on `memory.pressure`
    /// when `psi` is given).
    fn register_stall(&self, cg: &CgroupPath, psi: Option<&v2::PsiTrigger>) -> Result<StallWatch>;
    /// An eventfd that the kernel signals when usage crosses `bytes`, in either
    /// direction (v1: `cgroup.event_control` with `memory.usage_in_bytes`). A threshold
    /// cannot be unregistered except by closing the eventfd: drop it and register anew
    /// when the limit moves. `Ok(None)`: not available on this hierarchy.
    fn register_threshold(&self, _cg: &CgroupPath, _bytes: u64) -> Result<Option<StallFd>> {
        Ok(None)
    }
    /// A handle that re-reads the stall state cheaply: for the safety sweep, which reads
    /// every watched cgroup every second. `Ok(None)` if the cgroup is gone.
    fn oom_probe(&self, cg: &CgroupPath) -> Result<Option<OomProbe>>;
    /// v1: writes `oom_kill_disable` to `memory.oom_control` (false: the kernel's OOM
    /// killer acts on the cgroup's next charge that fails, and the sleepers are woken to
    /// make it), through the descriptor [`Controller::prepare`] kept when there is one.
    /// `Ok(true)`: written through the kept descriptor; `Ok(false)`: through a fresh
    /// open. Not available on v2 (no such switch there).
    fn set_oom_kill_disable(&self, cg: &CgroupPath, _disable: bool) -> Result<bool> {
        Err(CgroupError::Io {
            path: self.hierarchy().dir(cg),
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                "oom_kill_disable exists on cgroup v1 only",
            ),
        })
    }
    /// Kills every task of the cgroup and its descendants in one kernel operation where
    /// the kernel has one (v2 `cgroup.kill`). `Ok(false)`: not available, the caller
    /// kills task by task.
    fn kill_all(&self, _cg: &CgroupPath) -> Result<bool> {
        Ok(false)
    }
}

/// Where a stall notification comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallSource {
    /// v1: the OOM eventfd of `memory.oom_control` (readable; read to clear).
    OomEventFd,
    /// v2: `memory.events` changed (EPOLLPRI; re-read from offset 0 to clear).
    Events,
    /// v2: the PSI trigger on `memory.pressure` fired (EPOLLPRI).
    Pressure,
    /// v1: a usage threshold eventfd (`[early]`): usage crossed it, up or down.
    Threshold,
}

/// One file descriptor to poll for a watched cgroup.
#[derive(Debug)]
pub struct StallFd {
    file: std::fs::File,
    source: StallSource,
}

impl StallFd {
    pub fn new(fd: std::os::fd::OwnedFd, source: StallSource) -> StallFd {
        StallFd {
            file: std::fs::File::from(fd),
            source,
        }
    }

    pub fn source(&self) -> StallSource {
        self.source
    }

    /// True if the event loop waits for EPOLLPRI on it (else EPOLLIN).
    pub fn priority(&self) -> bool {
        !matches!(
            self.source,
            StallSource::OomEventFd | StallSource::Threshold
        )
    }

    /// Consumes the notification so a level-triggered poll does not report it again.
    /// Errors (WouldBlock: another wakeup consumed it) change nothing and are ignored.
    pub fn clear(&self) {
        use std::io::Read;
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 512];
        match self.source {
            // An eventfd read returns its 8-byte counter and resets it.
            StallSource::OomEventFd | StallSource::Threshold => {
                let _ = (&self.file).read(&mut buf[..8]);
            }
            // kernfs re-arms the notification when the file is read.
            StallSource::Events => {
                let _ = self.file.read_at(&mut buf, 0);
            }
            // Polling consumed the PSI event already.
            StallSource::Pressure => {}
        }
    }
}

impl std::os::fd::AsFd for StallFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Everything the event loop polls for one watched cgroup.
#[derive(Debug, Default)]
pub struct StallWatch {
    pub fds: Vec<StallFd>,
}

/// An open control file that is re-read from offset 0 (kernfs regenerates the content
/// on every read at offset 0), saving the open and close of every read.
/// A probe that keeps its own state between reads (v2 compares `memory.events`
/// counters with the previous read).
pub type ProbeFn = Box<dyn Fn() -> Result<Option<OomControl>> + Send>;

pub struct OomProbe {
    file: Option<std::fs::File>,
    path: PathBuf,
    parse: fn(&str) -> Option<OomControl>,
    custom: Option<ProbeFn>,
}

impl OomProbe {
    pub fn open(path: PathBuf, parse: fn(&str) -> Option<OomControl>) -> Result<Option<OomProbe>> {
        match std::fs::File::open(&path) {
            Ok(file) => Ok(Some(OomProbe {
                file: Some(file),
                path,
                parse,
                custom: None,
            })),
            Err(e) if io_is_gone(&e) => Ok(None),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }

    /// A probe computed by `f` (which returns `Ok(None)` once the cgroup is gone).
    pub fn custom(path: PathBuf, f: ProbeFn) -> OomProbe {
        OomProbe {
            file: None,
            path,
            parse: |_| None,
            custom: Some(f),
        }
    }

    /// The current state; `Ok(None)` once the cgroup is gone.
    pub fn read(&self) -> Result<Option<OomControl>> {
        use std::os::unix::fs::FileExt;
        if let Some(f) = &self.custom {
            return f();
        }
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let mut buf = [0u8; 256];
        let n = loop {
            match file.read_at(&mut buf, 0) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if io_is_gone(&e) => return Ok(None),
                Err(source) => {
                    return Err(CgroupError::Read {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        (self.parse)(&text)
            .map(Some)
            .ok_or_else(|| CgroupError::Parse {
                path: self.path.clone(),
                what: "oom state",
                content: text.chars().take(200).collect(),
            })
    }
}

/// Opens the controller for a detected hierarchy.
pub fn open(h: Hierarchy) -> Result<Box<dyn Controller>> {
    match h.kind() {
        Kind::V1 => Ok(Box::new(v1::V1::new(h))),
        Kind::V2 => Ok(Box::new(v2::V2::new(h))),
    }
}

/// Reads a whole control file; `Ok(None)` if the cgroup is gone. Control files are
/// small: open, read into a stack buffer, close (no stat for a size hint: this runs on
/// the OOM path).
pub(crate) fn read_file(path: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let err = |source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if io_is_gone(&e) => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut buf = [0u8; 512];
    let mut out = Vec::new();
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if io_is_gone(&e) => return Ok(None),
            Err(e) => return Err(err(e)),
        }
    }
    String::from_utf8(out)
        .map(Some)
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// Writes a value to a control file in one write(2), never creating it.
pub(crate) fn write_file(path: &Path, value: &str) -> Result<()> {
    use std::io::Write;
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    // O_TRUNC matters only for the plain files of unit tests; cgroupfs ignores it.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_path_normalises_and_navigates() {
        let p = CgroupPath::new("docker//abc/");
        assert_eq!(p.as_str(), "/docker/abc");
        assert_eq!(p.parent().unwrap().as_str(), "/docker");
        assert_eq!(p.parent().unwrap().parent().unwrap(), CgroupPath::root());
        assert_eq!(CgroupPath::root().parent(), None);
        assert_eq!(CgroupPath::root().join("a").as_str(), "/a");
        assert_eq!(p.join("x").as_str(), "/docker/abc/x");
        assert_eq!(p.relative(), "docker/abc");
        assert_eq!(p.segments().collect::<Vec<_>>(), vec!["docker", "abc"]);
    }

    #[test]
    fn non_utf8_names_keep_their_bytes_and_escape_losslessly() {
        let bad = CgroupPath::from_bytes(b"/a/bad\xff/x").unwrap();
        assert_eq!(bad.as_bytes(), b"/a/bad\xff/x");
        assert_eq!(bad.as_str(), "/a/bad\\xff/x");
        assert_eq!(bad.segments().collect::<Vec<_>>(), ["a", "bad\\xff", "x"]);
        assert_eq!(bad.parent().unwrap().as_bytes(), b"/a/bad\xff");
        assert!(bad.is_within(&CgroupPath::from_bytes(b"/a/bad\xff").unwrap()));
        assert!(!bad.is_within(&CgroupPath::new("/a/bad")));
        assert_eq!(CgroupPath::parse(bad.as_str()).unwrap(), bad);
        let h = Hierarchy::fake(Path::new("/r"), Kind::V1);
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(h.dir(&bad).as_os_str().as_bytes(), b"/r/a/bad\xff/x");
        // JSON round trip: the journal and status read what the audit log writes.
        let json = serde_json::to_string(&bad).unwrap();
        assert_eq!(json, r#""/a/bad\\xff/x""#);
        assert_eq!(serde_json::from_str::<CgroupPath>(&json).unwrap(), bad);
    }

    #[test]
    fn text_form_round_trips_every_byte_pattern() {
        // Valid UTF-8 names (systemd escapes included) are their own text form.
        for s in [
            "/system.slice/serial\\x2dgetty.slice",
            "/caf\u{e9}",
            "/a\\b",
            "/\\x4",
        ] {
            assert_eq!(CgroupPath::new(s).as_str(), s);
        }
        // A literal backslash that would read as an escape is escaped itself.
        let lit = CgroupPath::from_bytes(b"/n\\xff\\x5c").unwrap();
        assert_eq!(lit.as_str(), "/n\\x5cxff\\x5cx5c");
        let cases: [&[u8]; 7] = [
            b"/\xff",
            b"/\\\xff",
            b"/\\x\xff",
            b"/\\xf\xff",
            b"/\xe2\x82A",
            b"/ok\xc3\xa9/\xc3",
            b"/\\x80\\X80\\x5C",
        ];
        for raw in cases {
            let p = CgroupPath::from_bytes(raw).unwrap();
            assert_eq!(p.as_bytes(), raw);
            assert_eq!(CgroupPath::parse(p.as_str()).unwrap(), p, "{p:?}");
        }
        // Every byte in every position.
        for b in 1..=255u8 {
            if b == b'/' {
                continue;
            }
            let raw = [b'/', b'a', b, b'\\', b'x', b, b'z'];
            let p = CgroupPath::from_bytes(&raw).unwrap();
            assert_eq!(CgroupPath::parse(p.as_str()).unwrap().as_bytes(), raw);
        }
    }

    #[test]
    fn paths_never_leave_the_root() {
        for s in ["/..", "/../../etc", "a/../b", "/a/..", ".."] {
            assert!(
                matches!(CgroupPath::parse(s), Err(PathError::Parent { .. })),
                "{s}"
            );
            let lenient = CgroupPath::new(s);
            assert!(!lenient.segments().any(|x| x == ".."), "{s} -> {lenient}");
        }
        assert!(CgroupPath::from_bytes(b"/a/../b").is_err());
        assert!(matches!(
            CgroupPath::from_bytes(b"/a\0b"),
            Err(PathError::Nul { .. })
        ));
        assert_eq!(CgroupPath::root().join("../x").as_str(), "/x");
        // The journal and other JSON input go through the same check.
        let err = serde_json::from_str::<CgroupPath>(r#""/../../etc""#).unwrap_err();
        assert!(
            err.to_string().contains("leave the hierarchy root"),
            "{err}"
        );
        // `..` hidden as escapes is decoded first, then refused.
        assert!(CgroupPath::parse("/./a/.").is_ok());
        assert_eq!(CgroupPath::parse("/./a/.").unwrap().as_str(), "/a");
    }

    #[test]
    fn is_within_respects_segment_boundaries() {
        let a = CgroupPath::new("/a/b");
        assert!(a.is_within(&CgroupPath::new("/a")));
        assert!(a.is_within(&a));
        assert!(a.is_within(&CgroupPath::root()));
        assert!(!CgroupPath::new("/a/bc").is_within(&a));
        assert!(!CgroupPath::new("/a").is_within(&a));
    }

    #[test]
    fn prefix_from_mountinfo() {
        let mi = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
";
        let p = |r: &str| hierarchy_prefix(mi, Path::new(r)).map(|p| p.to_string());
        assert_eq!(p("/sys/fs/cgroup/memory").as_deref(), Some("/"));
        assert_eq!(p("/sys/fs/cgroup/memory/a/b").as_deref(), Some("/a/b"));
        assert_eq!(p("/sys/fs/cgroup/memoryx"), None);
        // A container that sees only its own subtree mounted at the usual place.
        let mi2 = "40 25 0:26 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            hierarchy_prefix(mi2, Path::new("/sys/fs/cgroup/memory")),
            Some(CgroupPath::new("/docker/abc"))
        );
    }

    #[test]
    fn proc_paths_round_trip_with_prefix() {
        let h = Hierarchy {
            root: PathBuf::from("/x"),
            kind: Kind::V1,
            prefix: CgroupPath::new("/pa/b"),
            live: false,
        };
        let cg = CgroupPath::new("/c");
        assert_eq!(h.proc_path(&cg).as_str(), "/pa/b/c");
        assert_eq!(h.proc_path(&CgroupPath::root()).as_str(), "/pa/b");
        assert_eq!(
            h.from_proc_path(b"/pa/b/c\xff")
                .map(|c| c.as_bytes().to_vec()),
            Some(b"/c\xff".to_vec())
        );
        assert_eq!(h.from_proc_path("/pa/b/../../etc"), None);
        assert_eq!(h.from_proc_path("/pa/b/c"), Some(cg));
        assert_eq!(h.from_proc_path("/pa/b"), Some(CgroupPath::root()));
        assert_eq!(h.from_proc_path("/pa/bc"), None);
    }

    /// A cgroup that exists but cannot be listed (here a symlink loop, ELOOP; for the
    /// agent inside a cgroup at its wall, ENOMEM) is kept and marks the walk
    /// incomplete; one that is gone is skipped and the walk stays complete.
    #[test]
    fn a_directory_that_cannot_be_listed_is_kept_and_makes_the_walk_incomplete() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a")).unwrap();
        std::os::unix::fs::symlink(t.path().join("loop"), t.path().join("loop")).unwrap();
        let h = Hierarchy::fake(t.path(), Kind::V1);
        let (all, complete) = h.walk_checked(&CgroupPath::new("/loop"));
        assert_eq!(all, vec![CgroupPath::new("/loop")]);
        assert!(!complete);
        let (all, complete) = h.walk_checked(&CgroupPath::new("/gone"));
        assert!(all.is_empty() && complete);
        let (all, complete) = h.walk_checked(&CgroupPath::root());
        assert!(complete, "a symlink is not a cgroup directory");
        assert_eq!(all, vec![CgroupPath::root(), CgroupPath::new("/a")]);
    }

    #[test]
    fn walk_lists_parents_before_children() {
        let t = tempfile::tempdir().unwrap();
        for d in ["a/x", "a/y", "b"] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        std::fs::write(t.path().join("a/memory.limit_in_bytes"), "1").unwrap();
        let h = Hierarchy::fake(t.path(), Kind::V1);
        let all: Vec<String> = h
            .walk(&CgroupPath::root())
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(all, vec!["/", "/a", "/a/x", "/a/y", "/b"]);
        assert_eq!(h.walk(&CgroupPath::new("/missing")).len(), 0);
    }

    #[test]
    fn walk_keeps_names_that_are_not_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let t = tempfile::tempdir().unwrap();
        let bad = std::ffi::OsStr::from_bytes(b"bad\xff");
        std::fs::create_dir_all(t.path().join(bad).join("below")).unwrap();
        let h = Hierarchy::fake(t.path(), Kind::V1);
        let all: Vec<Vec<u8>> = h
            .walk(&CgroupPath::root())
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        assert_eq!(
            all,
            vec![
                b"/".to_vec(),
                b"/bad\xff".to_vec(),
                b"/bad\xff/below".to_vec()
            ]
        );
        assert!(h
            .dir(&CgroupPath::parse("/bad\\xff/below").unwrap())
            .is_dir());
    }

    #[test]
    fn remove_tree_removes_deepest_first() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("top");
        std::fs::create_dir_all(top.join("a/b")).unwrap();
        std::fs::create_dir_all(top.join("c")).unwrap();
        assert!(remove_tree(&top, std::time::Duration::from_millis(100)));
        assert!(!top.exists());
        assert!(remove_tree(&top, std::time::Duration::ZERO));
        // A regular file (not possible in cgroupfs) cannot be removed by rmdir.
        std::fs::create_dir_all(&top).unwrap();
        std::fs::write(top.join("f"), "").unwrap();
        assert!(!remove_tree(&top, std::time::Duration::from_millis(50)));
    }

    #[test]
    fn errors_classify_gone_and_busy() {
        let gone = CgroupError::Read {
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        assert!(gone.is_gone());
        let busy = CgroupError::Write {
            path: "/x".into(),
            value: "1".into(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        };
        assert!(busy.is_busy() && !busy.is_gone());
        assert!(busy.to_string().contains("\"1\""));
    }
}
