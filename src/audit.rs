//! The audit log: JSON Lines, one object per line, appended and flushed per line. Every
//! line starts with `ts` (RFC 3339 UTC, milliseconds), `event` and `cgroup`.
//!
//! Nothing on the rescue path waits for the sink: [`Audit::log`] hands the line to a
//! writer thread through a queue bounded in lines and in bytes, and returns. When the
//! queue is full (a stderr pipe nobody reads, a stuck disk) the line is dropped and
//! counted; the next line that gets through is preceded by an `audit_dropped` line with
//! the count. Shutdown drains the queue ([`Audit::flush`], bounded in time). What comes
//! from a container engine (names, images, label values) is cut to [`MAX_VALUE`] bytes
//! in a line, so that one line stays small whatever the engine holds.
//!
//! The file is opened, at start and on SIGHUP, by [`open_log`]: never through a link,
//! never blocking (a FIFO planted at the path), and only if what was opened is a regular
//! file the agent trusts. The SIGHUP reopen runs on the writer thread, not on the event
//! loop; when it is refused the old file is kept.
//!
//! The default sink is stderr, which the process's log records share: [`init_logger`]
//! sends them through the same queue, and while the audit log is on stderr
//! ([`set_json_logs`]) writes them as JSON objects with `event` "log", so that the
//! stream stays valid JSON Lines and in order.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

use crate::cgroup::CgroupPath;
use crate::policy::Trust;

/// Why the audit log cannot be (re)opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {error}")]
    Open { path: PathBuf, error: io::Error },
    #[error("{path}: not a regular file (mode {mode:06o}): refusing to write the audit log there")]
    NotRegular { path: PathBuf, mode: u32 },
    #[error("{path}: owned by uid {uid}, not root: refusing to write the audit log there (fix: `chown root {path}`)")]
    Owner { path: PathBuf, uid: u32 },
    #[error("{path}: writable by group or others (mode {mode:04o}): refusing to write the audit log there (fix: `chmod go-w {path}`)")]
    Writable { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Perm(#[from] crate::perm::PermError),
}

impl From<AuditError> for io::Error {
    fn from(e: AuditError) -> io::Error {
        let kind = match &e {
            AuditError::Open { error, .. } => error.kind(),
            _ => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e)
    }
}

/// One audit line being built.
#[derive(Debug, Clone)]
pub struct Record {
    map: Map<String, Value>,
}

impl Record {
    pub fn new(event: &str, cgroup: &CgroupPath) -> Record {
        let mut map = Map::new();
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        map.insert("ts".into(), Value::String(ts));
        map.insert("event".into(), Value::String(event.into()));
        map.insert("cgroup".into(), Value::String(cgroup.to_string()));
        Record { map }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Record {
        self.set(key, value);
        self
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.map.insert(key.to_string(), value.into());
    }

    /// Copies the fields of `other` (except ts/event/cgroup) into this record.
    pub fn merge(&mut self, fields: Map<String, Value>) {
        for (k, v) in fields {
            self.map.insert(k, v);
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    pub fn to_line(&self) -> String {
        Value::Object(self.map.clone()).to_string()
    }
}

/// Lines that may wait for the writer; beyond this they are dropped and counted.
const QUEUE_LINES: usize = 4096;

/// Bytes of lines that may wait for the writer (lines about containers can be long):
/// beyond this they are dropped and counted, like lines beyond [`QUEUE_LINES`].
pub const QUEUE_BYTES: usize = 4 << 20;

/// A value from a container engine (name, image, label value) longer than this is cut
/// in an audit line, with a marker that gives its length and a hash of it.
pub const MAX_VALUE: usize = 256;

/// How long shutdown waits for the queue to drain into a sink that does not move.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

enum Msg {
    Line(String),
    /// Reopen the file (after logrotate moved it), after the lines queued before;
    /// `true`: a refusal is logged as an error (false: a retry, logged at debug).
    Reopen(bool),
    /// Answered once every line queued before it is written.
    Flush(crossbeam_channel::Sender<()>),
}

enum Sink {
    Stderr,
    File(File),
}

/// What the queue and its writer share.
#[derive(Default)]
struct Counters {
    /// Lines dropped and not yet reported.
    dropped: AtomicU64,
    /// Bytes of the lines queued and not yet written.
    queued: AtomicUsize,
    /// A reopen asked for while the queue was full: 0 none, 1 a retry, 2 a SIGHUP.
    reopen: AtomicU8,
}

/// Where the writer reopens its file, and how it checks what it opened.
struct Reopen {
    path: PathBuf,
    trust: Trust,
}

/// A bounded queue in front of a writer thread that owns the sink.
struct LineQueue {
    tx: crossbeam_channel::Sender<Msg>,
    counters: Arc<Counters>,
    max_bytes: usize,
}

impl LineQueue {
    fn start(sink: Sink, name: &str, reopen: Option<Reopen>) -> io::Result<LineQueue> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(crate::sys::THREAD_STACK)
            .spawn(move || writer(sink, rx, c, reopen))?;
        Ok(LineQueue {
            tx,
            counters,
            max_bytes: QUEUE_BYTES,
        })
    }

    /// Never blocks: a full queue (in lines or in bytes) drops the line and counts it.
    fn push(&self, line: String) {
        let len = line.len();
        let before = self.counters.queued.fetch_add(len, Ordering::Relaxed);
        let fits = before.saturating_add(len) <= self.max_bytes;
        if !fits || self.tx.try_send(Msg::Line(line)).is_err() {
            self.counters.queued.fetch_sub(len, Ordering::Relaxed);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes of the lines waiting for the writer (or being written).
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        self.counters.queued.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until everything queued so far is written.
    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (ack, done) = crossbeam_channel::bounded(1);
        if self.tx.send_deadline(Msg::Flush(ack), deadline).is_err() {
            return false;
        }
        done.recv_deadline(deadline).is_ok()
    }
}

/// How long the writer retries a line refused for want of memory (ENOMEM: the agent's
/// cgroup is at its wall, and a new page-cache page is charged there) before dropping
/// it. The queue in front takes the lines meanwhile, or drops and counts them: the
/// episodes never wait for this.
const MEMORY_WAIT: Duration = Duration::from_secs(10);

/// Writes all of `line`, continuing where a short write stopped (so a line is never
/// torn by a retry), and retrying ENOMEM with a backoff for up to `memory_wait`.
fn write_line(w: &mut impl Write, line: &[u8], memory_wait: Duration) -> io::Result<()> {
    let mut rest = line;
    let mut give_up: Option<Instant> = None;
    let mut pause = Duration::from_millis(5);
    while !rest.is_empty() {
        match w.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                let end = *give_up.get_or_insert_with(|| Instant::now() + memory_wait);
                if Instant::now() >= end {
                    return Err(e);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
    w.flush()
}

fn writer(
    mut sink: Sink,
    rx: crossbeam_channel::Receiver<Msg>,
    counters: Arc<Counters>,
    reopen: Option<Reopen>,
) {
    let write = |sink: &mut Sink, line: &[u8]| -> io::Result<()> {
        match sink {
            // std's stderr is unbuffered: one write per line, nothing held back.
            Sink::Stderr => write_line(&mut io::stderr().lock(), line, MEMORY_WAIT),
            Sink::File(f) => write_line(f, line, MEMORY_WAIT),
        }
    };
    let mut failed = false;
    let report_drops = |sink: &mut Sink| {
        let n = counters.dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            let mut line = Record::new("audit_dropped", &CgroupPath::root())
                .with("dropped", n)
                .to_line();
            line.push('\n');
            let _ = write(sink, line.as_bytes());
        }
    };
    for msg in rx {
        // A reopen asked for while the queue was full: before the next line.
        match counters.reopen.swap(0, Ordering::Relaxed) {
            0 => {}
            n => reopen_sink(&mut sink, reopen.as_ref(), n > 1),
        }
        match msg {
            Msg::Line(line) => {
                report_drops(&mut sink);
                match write(&mut sink, line.as_bytes()) {
                    Ok(()) => failed = false,
                    // Said once per run of failures: the log may be on the same sink.
                    Err(e) if !failed => {
                        failed = true;
                        log::error!("audit log write failed: {e}; line was: {}", line.trim_end());
                    }
                    Err(_) => {}
                }
                counters.queued.fetch_sub(line.len(), Ordering::Relaxed);
            }
            Msg::Reopen(loud) => reopen_sink(&mut sink, reopen.as_ref(), loud),
            Msg::Flush(ack) => {
                report_drops(&mut sink);
                let _ = ack.send(());
            }
        }
    }
}

/// On the writer thread (the event loop only asks): a planted FIFO or a slow disk can
/// hold up this thread, never the loop. Refused: the old file is kept, and said so.
fn reopen_sink(sink: &mut Sink, reopen: Option<&Reopen>, loud: bool) {
    let (Some(r), Sink::File(old)) = (reopen, sink) else {
        return;
    };
    match open_log(&r.path, r.trust) {
        Ok(f) => *old = f,
        Err(e) => {
            if loud {
                log::error!("reopening the audit log: {e}; still writing to the file opened before")
            } else {
                log::debug!("reopening the audit log again: {e}")
            }
        }
    }
}

/// Where audit lines go: stderr, or a file opened for append.
pub struct Audit {
    /// `None` for stderr, whose queue is the process-wide one of [`stderr_queue`].
    file: Option<(PathBuf, LineQueue)>,
    /// Names and images of containers for the lines about them.
    containers: Option<Arc<crate::container::Containers>>,
}

impl Audit {
    pub fn stderr() -> Audit {
        Audit {
            file: None,
            containers: None,
        }
    }

    /// The audit log in the file at `path` (created 0640 if missing), checked by
    /// [`open_log`] like every reopen.
    pub fn file(path: &Path) -> io::Result<Audit> {
        Audit::file_with(path, Trust::Strict)
    }

    /// Like [`Audit::file`]; `Trust::Insecure` (`--insecure-policies`) skips the owner
    /// and mode check (a regular file is still required).
    pub fn file_with(path: &Path, trust: Trust) -> io::Result<Audit> {
        let file = open_log(path, trust)?;
        let reopen = Reopen {
            path: path.to_path_buf(),
            trust,
        };
        Ok(Audit {
            file: Some((
                path.to_path_buf(),
                LineQueue::start(Sink::File(file), "audit", Some(reopen))?,
            )),
            containers: None,
        })
    }

    fn queue(&self) -> Option<&LineQueue> {
        match &self.file {
            Some((_, q)) => Some(q),
            None => stderr_queue(),
        }
    }

    /// Asks the writer thread to reopen the file (after logrotate moved it) before its
    /// next line; called on SIGHUP. Never waits: the open, its checks and any error
    /// (logged; the old file is kept) happen on the writer thread.
    pub fn reopen(&self) -> io::Result<()> {
        self.ask_reopen(true)
    }

    /// [`Audit::reopen`] again for a deferred reload (issue 6.11): a refusal already
    /// said at the SIGHUP is not said again at every try.
    pub fn reopen_retry(&self) -> io::Result<()> {
        self.ask_reopen(false)
    }

    fn ask_reopen(&self, loud: bool) -> io::Result<()> {
        let Some((_, q)) = &self.file else {
            return Ok(());
        };
        match q.tx.try_send(Msg::Reopen(loud)) {
            Ok(()) => Ok(()),
            // A full queue: the writer reopens before its next line.
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                q.counters
                    .reopen
                    .fetch_max(1 + u8::from(loud), Ordering::Relaxed);
                Ok(())
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                Err(io::Error::other("the audit writer thread is gone"))
            }
        }
    }

    /// Lines about a container cgroup name the container from this cache.
    pub fn with_containers(mut self, c: Arc<crate::container::Containers>) -> Audit {
        self.containers = Some(c);
        self
    }

    /// Queues the line; never waits for the sink. A line about a container cgroup gets
    /// `container_id` (and `pod_uid`), and `container_name`, `image` and the compose
    /// project and service when known.
    pub fn log(&self, mut rec: Record) {
        add_container_fields(&mut rec, self.containers.as_deref());
        let mut line = rec.to_line();
        line.push('\n');
        match self.queue() {
            Some(q) => q.push(line),
            // No writer thread could be started: stderr directly, as a last resort.
            None => {
                let _ = io::stderr().write_all(line.as_bytes());
            }
        }
    }

    /// Lines dropped because the sink did not keep up, not yet reported in the log.
    pub fn dropped(&self) -> u64 {
        self.queue()
            .map_or(0, |q| q.counters.dropped.load(Ordering::Relaxed))
    }

    /// Waits up to `timeout` until every line logged so far is written. False if the
    /// sink did not take them in time (a pipe nobody reads).
    pub fn flush(&self, timeout: Duration) -> bool {
        self.queue().is_none_or(|q| q.flush(timeout))
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.flush(DRAIN_TIMEOUT);
    }
}

/// The container fields of a line (see [`Audit::log`]); nothing for other cgroups.
fn add_container_fields(rec: &mut Record, containers: Option<&crate::container::Containers>) {
    let Some(Value::String(cg)) = rec.get("cgroup") else {
        return;
    };
    let Some(ident) = crate::container::identify(cg.as_bytes()) else {
        return;
    };
    let meta = match (&ident.container_id, containers) {
        (Some(id), Some(c)) if ident.is_container() => c.get(id),
        _ => None,
    };
    if let Some(id) = ident.container_id {
        rec.set("container_id", id);
    }
    if let Some(pod) = ident.pod_uid {
        rec.set("pod_uid", pod);
    }
    // The engine's strings (a label value may be 1,000,000 bytes): cut, so that one
    // line stays small. Of the labels, only compose's two enter a line.
    if let Some(m) = meta {
        rec.set("container_name", cap_value(&m.info.name));
        rec.set("image", cap_value(&m.info.image));
        if let Some(p) = m.compose_project() {
            rec.set("compose_project", cap_value(p));
        }
        if let Some(s) = m.compose_service() {
            rec.set("compose_service", cap_value(s));
        }
    }
}

/// `v` if it is at most [`MAX_VALUE`] bytes; else its start (cut at a character) and
/// `...[cut: N bytes, fnv1a64 HASH]`, so that two long values still tell apart.
pub fn cap_value(v: &str) -> String {
    if v.len() <= MAX_VALUE {
        return v.to_string();
    }
    let marker = format!(
        "...[cut: {} bytes, fnv1a64 {:016x}]",
        v.len(),
        fnv1a64(v.as_bytes())
    );
    let mut end = MAX_VALUE.saturating_sub(marker.len());
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &v[..end])
}

/// FNV-1a, 64 bits: a short, stable hash of a value that was cut (not a security hash).
fn fnv1a64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Opens the audit log at `path` for appending, at start and at every reopen: never
/// through a symbolic link (`O_NOFOLLOW`), never blocking (`O_NONBLOCK`: a FIFO planted
/// at the path with no reader is ENXIO instead of a hang), created 0640 if missing; then
/// checks what was opened (`fstat`, not the path): a regular file, and unless `trust`
/// is `Insecure`, owned by root (or the agent's effective uid) and not writable by group
/// or others. The directories above are checked at start ([`crate::perm`]).
pub fn open_log(path: &Path, trust: Trust) -> Result<File, AuditError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    let open_error = |error: io::Error| AuditError::Open {
        path: path.to_path_buf(),
        error,
    };
    // The directory is walked and judged first (a link on the way is followed only if
    // it is root's), and the file opened (or created) in the directory judged: a link
    // another user puts in place of a directory above cannot aim root's appends (or the
    // file's creation) elsewhere, between the check and the open or ever.
    let name = path
        .file_name()
        .ok_or_else(|| open_error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let checks = trust.checks();
    let dir = crate::perm::open_dir_above(parent, "the audit log's directory", checks)?;
    let fd = nix::fcntl::openat(
        Some(dir.as_fd().as_raw_fd()),
        name,
        nix::fcntl::OFlag::O_WRONLY
            | nix::fcntl::OFlag::O_APPEND
            | nix::fcntl::OFlag::O_CREAT
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_NONBLOCK
            | nix::fcntl::OFlag::O_CLOEXEC
            | nix::fcntl::OFlag::O_NOCTTY,
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .map_err(|e| open_error(e.into()))?;
    // SAFETY: openat has just returned this descriptor; nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let md = file.metadata().map_err(open_error)?;
    let mode = md.mode();
    if !md.file_type().is_file() {
        return Err(AuditError::NotRegular {
            path: path.to_path_buf(),
            mode,
        });
    }
    if let crate::perm::Checks::Strict(owners) = checks {
        if !owners.allowed(md.uid()) {
            return Err(AuditError::Owner {
                path: path.to_path_buf(),
                uid: md.uid(),
            });
        }
        if mode & 0o022 != 0 {
            return Err(AuditError::Writable {
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
    }
    // O_NONBLOCK stays: writes to a regular file ignore it.
    Ok(file)
}

/// The process-wide stderr queue (audit lines and log records), started on first use.
/// `None` only if its thread could not be started.
fn stderr_queue() -> Option<&'static LineQueue> {
    static Q: OnceLock<Option<LineQueue>> = OnceLock::new();
    Q.get_or_init(|| LineQueue::start(Sink::Stderr, "stderr", None).ok())
        .as_ref()
}

static JSON_LOGS: AtomicBool = AtomicBool::new(false);

/// While true, log records on stderr are JSON objects (`event` "log"): set when the
/// audit log goes to stderr, so that the stream is JSON Lines.
pub fn set_json_logs(on: bool) {
    JSON_LOGS.store(on, Ordering::Relaxed);
}

/// Hands env_logger's formatted records to the stderr queue, one line per record.
struct LogPipe(Vec<u8>);

impl Write for LogPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        match stderr_queue() {
            Some(q) => q.push(line),
            None => io::stderr().write_all(line.as_bytes())?,
        }
        Ok(())
    }
}

/// One log record as an audit-stream line.
fn log_line(record: &log::Record<'_>) -> String {
    let mut r = Record::new("log", &CgroupPath::root());
    r.set("level", record.level().as_str());
    r.set("target", record.target());
    r.set("message", record.args().to_string());
    r.to_line()
}

/// Sets up the process's logger (env_logger, `RUST_LOG`, default `info`): records go
/// through the stderr queue, so that logging never blocks on a full stderr either.
pub fn init_logger() {
    use std::io::Write as _;
    let _ = stderr_queue();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            if JSON_LOGS.load(Ordering::Relaxed) {
                writeln!(buf, "{}", log_line(record))
            } else {
                let ts = humantime::format_rfc3339_millis(SystemTime::now());
                writeln!(
                    buf,
                    "[{ts} {:<5} {}] {}",
                    record.level(),
                    record.target(),
                    record.args()
                )
            }
        })
        .target(env_logger::Target::Pipe(Box::new(LogPipe(Vec::new()))))
        .init();
}

/// A fatal error on the way out of `run`: a JSON log line while the audit log is on
/// stderr, the usual `oomwake: ...` otherwise; then the stderr queue is drained (bounded).
pub fn fatal(msg: &str) {
    if JSON_LOGS.load(Ordering::Relaxed) {
        log::error!("{msg}");
    } else {
        flush_stderr(DRAIN_TIMEOUT);
        eprintln!("oomwake: {msg}");
    }
    flush_stderr(DRAIN_TIMEOUT);
}

/// Waits (bounded) until the stderr queue is written: before the process exits.
pub fn flush_stderr(timeout: Duration) -> bool {
    stderr_queue().is_none_or(|q| q.flush(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_about_a_container_name_it() {
        use crate::container::{Containers, Meta};
        let id = "c".repeat(64);
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("com.docker.compose.project".to_string(), "shop".to_string());
        labels.insert("com.docker.compose.service".to_string(), "api".to_string());
        let cache = Arc::new(Containers::fixed(vec![Meta {
            id: id.clone(),
            info: crate::policy::ContainerInfo {
                name: "api-1".into(),
                image: "registry.local/api:3".into(),
                labels,
            },
        }]));
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit.jsonl");
        let a = Audit::file(&path).unwrap().with_containers(cache);
        let other = "d".repeat(64);
        let uid = "0d4c8e6a-1b2c-4d5e-8f90-a1b2c3d4e5f6";
        a.log(Record::new("oom", &CgroupPath::new(&format!("/docker/{id}"))).with("episode", 1));
        a.log(Record::new(
            "watch",
            &CgroupPath::new(&format!("/system.slice/docker-{other}.scope")),
        ));
        a.log(Record::new(
            "watch",
            &CgroupPath::new(&format!("/kubepods/burstable/pod{uid}")),
        ));
        a.log(Record::new(
            "watch",
            &CgroupPath::new("/system.slice/cron.service"),
        ));
        assert!(a.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        let v: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v[0]["container_id"], id.as_str());
        assert_eq!(v[0]["container_name"], "api-1");
        assert_eq!(v[0]["image"], "registry.local/api:3");
        assert_eq!(v[0]["compose_project"], "shop");
        assert_eq!(v[0]["compose_service"], "api");
        assert_eq!(v[0]["episode"], 1);
        // Unknown to the engine: the id from the path, nothing invented.
        assert_eq!(v[1]["container_id"], other.as_str());
        assert!(v[1].get("container_name").is_none());
        assert!(v[1].get("image").is_none());
        assert_eq!(v[2]["pod_uid"], uid);
        assert!(v[2].get("container_id").is_none());
        assert!(v[3].get("container_id").is_none());
        assert!(v[3].get("pod_uid").is_none());
    }

    #[test]
    fn lines_are_json_with_leading_fields() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit.jsonl");
        let a = Audit::file(&path).unwrap();
        a.log(
            Record::new("oom", &CgroupPath::new("/docker/x"))
                .with("episode", 7)
                .with("policy", "p"),
        );
        a.log(Record::new("resolved", &CgroupPath::new("/docker/x")).with("stalled_ms", 1.5));
        assert!(a.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("{\"ts\":\""), "{}", lines[0]);
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["event"], "oom");
        assert_eq!(v["cgroup"], "/docker/x");
        assert_eq!(v["episode"], 7);
        let ts = v["ts"].as_str().unwrap();
        // 2026-11-26T22:52:29.123Z
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z'));
        assert!(humantime::parse_rfc3339(ts).is_ok());
    }

    /// The sink is a pipe nobody reads: logging still returns at once, what does not
    /// fit is counted, and the count is reported once the sink moves again.
    #[test]
    fn a_sink_that_does_not_drain_never_blocks_the_caller() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let a = Audit {
            file: Some((
                PathBuf::from("/pipe"),
                LineQueue::start(Sink::File(File::from(w)), "audit-test", None).unwrap(),
            )),
            containers: None,
        };
        let n = QUEUE_LINES * 3;
        let started = Instant::now();
        for i in 0..n {
            a.log(Record::new("oom", &CgroupPath::new("/x")).with("episode", i));
        }
        // Without the queue the first ~64 KiB fill the pipe and the next write blocks
        // for good; with it, 12k lines take milliseconds. The bound is generous.
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            a.dropped() > 0,
            "nothing dropped with {n} lines into a full pipe"
        );
        assert!(
            !a.flush(Duration::from_millis(50)),
            "a full pipe cannot drain"
        );
        // Now read everything: every line is whole JSON, and the drops are reported.
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            use std::io::Read;
            File::from(r).read_to_string(&mut text).unwrap();
            text
        });
        assert!(a.flush(Duration::from_secs(10)));
        a.log(Record::new("resolved", &CgroupPath::new("/x")));
        drop(a);
        let text = reader.join().unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let dropped: u64 = lines
            .iter()
            .filter(|v| v["event"] == "audit_dropped")
            .map(|v| v["dropped"].as_u64().unwrap())
            .sum();
        let written = lines
            .iter()
            .filter(|v| v["event"] != "audit_dropped")
            .count();
        assert!(dropped > 0);
        assert_eq!(
            written as u64 + dropped,
            n as u64 + 1,
            "every line written or counted"
        );
        assert_eq!(lines.last().unwrap()["event"], "resolved");
    }

    #[test]
    fn log_records_are_audit_stream_lines() {
        let line = log_line(
            &log::Record::builder()
                .level(log::Level::Warn)
                .target("oomwake::watch")
                .args(format_args!("{} \"quoted\"\nline", 42))
                .build(),
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "log");
        assert_eq!(v["cgroup"], "/");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], "oomwake::watch");
        assert_eq!(v["message"], "42 \"quoted\"\nline");
        assert!(humantime::parse_rfc3339(v["ts"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit.jsonl");
        let a = Audit::file(&path).unwrap();
        a.log(Record::new("watch", &CgroupPath::root()));
        std::fs::rename(&path, t.path().join("audit.jsonl.1")).unwrap();
        a.reopen().unwrap();
        a.log(Record::new("watch", &CgroupPath::root()));
        assert!(a.flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    /// A container with a 1,000,000-byte label value (Docker accepts it), name and image.
    fn huge_container() -> (String, Arc<crate::container::Containers>) {
        use crate::container::{Containers, Meta};
        let id = "e".repeat(64);
        let big = "x".repeat(1_000_000);
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("com.docker.compose.project".to_string(), big.clone());
        labels.insert(
            "com.docker.compose.service".to_string(),
            "é".repeat(600_000),
        );
        let cache = Arc::new(Containers::fixed(vec![Meta {
            id: id.clone(),
            info: crate::policy::ContainerInfo {
                name: big.clone(),
                image: big,
                labels,
            },
        }]));
        (id, cache)
    }

    fn stuck_pipe_audit() -> (Audit, File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let a = Audit {
            file: Some((
                PathBuf::from("/pipe"),
                LineQueue::start(Sink::File(File::from(w)), "audit-test", None).unwrap(),
            )),
            containers: None,
        };
        (a, File::from(r))
    }

    /// Issue 16.16: with the sink stuck, 123 stalls of a container with 1 MB labels
    /// held 430 MB. The queue holds at most QUEUE_BYTES, and one such line is small.
    #[test]
    fn the_queue_is_bounded_in_bytes_and_long_engine_values_are_cut() {
        let (id, cache) = huge_container();
        let (a, r) = stuck_pipe_audit();
        let a = a.with_containers(cache);
        let q = a.file.as_ref().unwrap().1.tx.clone();
        let queued = || a.file.as_ref().unwrap().1.queued_bytes();
        let cg = CgroupPath::new(&format!("/docker/{id}"));
        for i in 0..123 {
            a.log(Record::new("oom", &cg).with("episode", i));
            assert!(queued() <= QUEUE_BYTES, "{} bytes queued", queued());
        }
        drop(q);
        // Capped lines are small: 123 of them fit, nothing was dropped.
        assert_eq!(a.dropped(), 0, "{} bytes queued", queued());
        assert!(queued() < 123 * 4096, "{} bytes queued", queued());
        // Raw lines of 100 KB (whatever their origin): the bound holds, the rest counted.
        let raw = "y".repeat(100_000);
        for _ in 0..123 {
            a.file.as_ref().unwrap().1.push(raw.clone());
            assert!(queued() <= QUEUE_BYTES, "{} bytes queued", queued());
        }
        assert!(
            a.dropped() > 0,
            "nothing dropped beyond {QUEUE_BYTES} bytes"
        );
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut text = Vec::new();
            let mut r = r;
            r.read_to_end(&mut text).unwrap();
            text
        });
        assert!(a.flush(Duration::from_secs(20)));
        assert_eq!(queued(), 0, "what was written is no longer counted");
        drop(a);
        let text = String::from_utf8(reader.join().unwrap()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let oom: Vec<&Value> = lines.iter().filter(|v| v["event"] == "oom").collect();
        assert_eq!(oom.len(), 123);
        for v in oom {
            for k in [
                "container_name",
                "image",
                "compose_project",
                "compose_service",
            ] {
                let s = v[k].as_str().unwrap();
                assert!(s.len() <= MAX_VALUE, "{k}: {} bytes", s.len());
                assert!(s.contains("...[cut: "), "{k}: {s}");
            }
        }
        assert!(lines.iter().any(|v| v["event"] == "audit_dropped"));
    }

    #[test]
    fn cap_value_keeps_short_values_and_cuts_long_ones_at_a_character() {
        assert_eq!(cap_value("api-1"), "api-1");
        let exact = "a".repeat(MAX_VALUE);
        assert_eq!(cap_value(&exact), exact);
        let long = "é".repeat(1000);
        let c = cap_value(&long);
        assert!(c.len() <= MAX_VALUE, "{}", c.len());
        assert!(c.starts_with("éé"));
        assert!(c.contains("[cut: 2000 bytes, fnv1a64 "), "{c}");
        // Two long values that differ only at the end still differ once cut.
        let mut other = long.clone();
        other.push('x');
        assert_ne!(cap_value(&other), c);
    }

    /// Issue 16.5: a FIFO planted at the path after rotation. The reopen must not block
    /// the caller (the event loop) nor the writer, and lines keep going to the old file.
    #[test]
    fn reopen_onto_a_fifo_never_blocks_and_keeps_the_old_file() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit.jsonl");
        let old = t.path().join("audit.jsonl.1");
        let a = Audit::file(&path).unwrap();
        std::fs::rename(&path, &old).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o622)).unwrap();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let worker = std::thread::spawn(move || {
            let r = a.reopen();
            a.log(Record::new("watch", &CgroupPath::new("/no-reader")));
            let flushed = a.flush(Duration::from_secs(3));
            let _ = done_tx.send((r.is_ok(), flushed));
            a
        });
        let got = done.recv_timeout(Duration::from_secs(5));
        if got.is_err() {
            // Unblock the stuck open (so the test ends) before failing.
            let _ = std::fs::File::open(&path);
            panic!("reopen onto a FIFO with no reader blocked");
        }
        assert_eq!(got.unwrap(), (true, true));
        let a = worker.join().unwrap();
        // A reader holds the FIFO open: the open succeeds, the check refuses it.
        use std::os::unix::fs::OpenOptionsExt;
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        a.reopen().unwrap();
        a.log(Record::new("watch", &CgroupPath::new("/reader")));
        assert!(a.flush(Duration::from_secs(5)));
        let mut buf = [0u8; 4096];
        let n = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&reader), &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "lines went into the FIFO");
        let text = std::fs::read_to_string(&old).unwrap();
        assert!(text.contains("/no-reader"), "{text}");
        assert!(text.contains("/reader"), "{text}");
    }

    /// A directory above the log that another user swaps for a link to a root-owned
    /// directory: refused (the link is theirs), and nothing is created or appended to
    /// where it points, at start as at a reopen.
    #[test]
    fn a_link_another_user_put_above_the_log_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(t.path(), 0o755).unwrap();
        // Root's directory with a root file in it (think /etc and /etc/passwd).
        let target = t.path().join("etc");
        std::fs::create_dir(&target).unwrap();
        mode(&target, 0o755).unwrap();
        std::fs::write(target.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        mode(&target.join("passwd"), 0o644).unwrap();
        // A sticky root directory (think /tmp) where nobody put a link.
        let tmp = t.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        mode(&tmp, 0o1777).unwrap();
        let link = tmp.join("logs");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        for name in ["passwd", "new.jsonl"] {
            let e = open_log(&link.join(name), Trust::Strict)
                .unwrap_err()
                .to_string();
            assert!(e.contains("a symbolic link owned by uid 65534"), "{e}");
        }
        assert!(
            !target.join("new.jsonl").exists(),
            "created through the link"
        );
        // At a reopen too: the log's directory swapped for the link is refused.
        let dir = tmp.join("log");
        std::fs::create_dir(&dir).unwrap();
        mode(&dir, 0o755).unwrap();
        let a = Audit::file(&dir.join("passwd")).unwrap();
        std::fs::rename(&dir, tmp.join("log.old")).unwrap();
        std::os::unix::fs::symlink(&target, &dir).unwrap();
        std::os::unix::fs::lchown(&dir, Some(65534), Some(65534)).unwrap();
        a.reopen().unwrap();
        a.log(Record::new("watch", &CgroupPath::new("/x")));
        assert!(a.flush(Duration::from_secs(5)));
        assert_eq!(
            std::fs::read_to_string(target.join("passwd")).unwrap(),
            "root:x:0:0::/root:/bin/sh\n",
            "appended through nobody's link"
        );
        let old = std::fs::read_to_string(tmp.join("log.old/passwd")).unwrap();
        assert!(old.contains("\"/x\""), "{old}");
    }

    /// Issue 16.5: the reopen checks what it opened like the start does: a file owned
    /// by another user, or writable by others, is refused and the old file kept.
    #[test]
    fn reopen_refuses_a_file_owned_by_another_user_or_writable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit.jsonl");
        let old = t.path().join("audit.jsonl.1");
        let a = Audit::file(&path).unwrap();
        std::fs::rename(&path, &old).unwrap();
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        a.reopen().unwrap();
        a.log(Record::new("watch", &CgroupPath::new("/nobody")));
        assert!(a.flush(Duration::from_secs(5)));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "appended to nobody's file"
        );
        std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        a.reopen().unwrap();
        a.log(Record::new("watch", &CgroupPath::new("/writable")));
        assert!(a.flush(Duration::from_secs(5)));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "appended to a 0666 file"
        );
        let text = std::fs::read_to_string(&old).unwrap();
        assert!(
            text.contains("/nobody") && text.contains("/writable"),
            "{text}"
        );
        // And at start: refused outright.
        assert!(Audit::file(&path).is_err());
        // Once fixed, the next reopen moves on.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        a.reopen().unwrap();
        a.log(Record::new("watch", &CgroupPath::new("/fixed")));
        assert!(a.flush(Duration::from_secs(5)));
        assert!(std::fs::read_to_string(&path).unwrap().contains("/fixed"));
    }

    /// Issue 6.11: a line refused for want of memory (the agent's own cgroup at its
    /// wall) is written whole once memory is there, never torn or lost at once.
    #[test]
    fn a_line_refused_with_enomem_is_retried_whole() {
        struct Wall {
            refusals: usize,
            got: Vec<u8>,
        }
        impl Write for Wall {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.refusals > 0 {
                    self.refusals -= 1;
                    return Err(io::Error::from_raw_os_error(libc::ENOMEM));
                }
                // A short write, as when the page ran out mid-line.
                let n = b.len().min(7);
                self.got.extend_from_slice(&b[..n]);
                self.refusals = 2;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let line = b"{\"event\":\"resolved\",\"cgroup\":\"/pod\"}\n";
        let mut w = Wall {
            refusals: 3,
            got: Vec::new(),
        };
        write_line(&mut w, line, Duration::from_secs(10)).unwrap();
        assert_eq!(w.got, line);
        // Memory that never comes: given up after the wait, with the error.
        let mut w = Wall {
            refusals: usize::MAX,
            got: Vec::new(),
        };
        let start = Instant::now();
        let e = write_line(&mut w, line, Duration::from_millis(100)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
