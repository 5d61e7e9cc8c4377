//! The audit log: JSON Lines, one object per line, appended and flushed per line. Every
//! line starts with `ts` (RFC 3339 UTC, milliseconds), `event` and `cgroup`.
//!
//! Nothing on the rescue path waits for the sink: [`Audit::log`] hands the line to a
//! writer thread through a bounded queue and returns. When the queue is full (a stderr
//! pipe nobody reads, a stuck disk) the line is dropped and counted; the next line that
//! gets through is preceded by an `audit_dropped` line with the count. Shutdown drains
//! the queue ([`Audit::flush`], bounded in time).
//!
//! The default sink is stderr, which the process's log records share: [`init_logger`]
//! sends them through the same queue, and while the audit log is on stderr
//! ([`set_json_logs`]) writes them as JSON objects with `event` "log", so that the
//! stream stays valid JSON Lines and in order.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

use crate::cgroup::CgroupPath;

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

/// How long shutdown waits for the queue to drain into a sink that does not move.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

enum Msg {
    Line(String),
    /// Replace the file (after logrotate moved it).
    Reopen(File),
    /// Answered once every line queued before it is written.
    Flush(crossbeam_channel::Sender<()>),
}

enum Sink {
    Stderr,
    File(File),
}

/// A bounded queue in front of a writer thread that owns the sink.
struct LineQueue {
    tx: crossbeam_channel::Sender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl LineQueue {
    fn start(sink: Sink, name: &str) -> io::Result<LineQueue> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(crate::sys::THREAD_STACK)
            .spawn(move || writer(sink, rx, d))?;
        Ok(LineQueue { tx, dropped })
    }

    /// Never blocks: a full queue drops the line and counts it.
    fn push(&self, line: String) {
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
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

fn writer(mut sink: Sink, rx: crossbeam_channel::Receiver<Msg>, dropped: Arc<AtomicU64>) {
    let write = |sink: &mut Sink, line: &[u8]| -> io::Result<()> {
        match sink {
            // std's stderr is unbuffered: one write per line, nothing held back.
            Sink::Stderr => write_line(&mut io::stderr().lock(), line, MEMORY_WAIT),
            Sink::File(f) => write_line(f, line, MEMORY_WAIT),
        }
    };
    let mut failed = false;
    let report_drops = |sink: &mut Sink| {
        let n = dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            let mut line = Record::new("audit_dropped", &CgroupPath::root())
                .with("dropped", n)
                .to_line();
            line.push('\n');
            let _ = write(sink, line.as_bytes());
        }
    };
    for msg in rx {
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
            }
            Msg::Reopen(f) => {
                if let Sink::File(old) = &mut sink {
                    *old = f;
                }
            }
            Msg::Flush(ack) => {
                report_drops(&mut sink);
                let _ = ack.send(());
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

    pub fn file(path: &Path) -> io::Result<Audit> {
        let file = open_append(path)?;
        Ok(Audit {
            file: Some((
                path.to_path_buf(),
                LineQueue::start(Sink::File(file), "audit")?,
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

    /// Reopens the file (after logrotate moved it); called on SIGHUP.
    pub fn reopen(&self) -> io::Result<()> {
        let Some((path, q)) = &self.file else {
            return Ok(());
        };
        let file = open_append(path)?;
        q.tx.send_timeout(Msg::Reopen(file), Duration::from_secs(1))
            .map_err(|_| io::Error::other("the audit writer is not keeping up"))
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
            .map_or(0, |q| q.dropped.load(Ordering::Relaxed))
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
    if let Some(m) = meta {
        rec.set("container_name", m.info.name.clone());
        rec.set("image", m.info.image.clone());
        if let Some(p) = m.compose_project() {
            rec.set("compose_project", p);
        }
        if let Some(s) = m.compose_service() {
            rec.set("compose_service", s);
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a symbolic link: a link planted where the log is expected would
    // make root append to whatever it names (ELOOP instead).
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The process-wide stderr queue (audit lines and log records), started on first use.
/// `None` only if its thread could not be started.
fn stderr_queue() -> Option<&'static LineQueue> {
    static Q: OnceLock<Option<LineQueue>> = OnceLock::new();
    Q.get_or_init(|| LineQueue::start(Sink::Stderr, "stderr").ok())
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
                LineQueue::start(Sink::File(File::from(w)), "audit-test").unwrap(),
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
