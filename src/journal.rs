//! The journal of lent limits, so that a crash or a restart of the agent never loses the
//! limit a cgroup had before the agent lent it headroom.
//!
//! A snapshot (`loans.json`, replaced by atomic rename + fsync) plus an append-only log
//! (`loans.log`, one JSON operation per line). A raise appends one line, in one write(2),
//! before the cgroup file is written, and is fsynced right after: an append costs tens of
//! microseconds where a rename on ext4 costs half a millisecond, as much as the rescue
//! itself. Every record carries the limits before the first raise, what the kernel held
//! after the agent's last completed write, and the change in flight (from, to, the step
//! reached), so replay always knows what to give back and which values are the agent's
//! own.
//!
//! Compaction never blocks an append for longer than a rename: the log is first moved to
//! `loans.log.1` (appends go on in a fresh `loans.log`), then the snapshot is written and
//! fsynced, then `loans.log.1` is removed. Replay reads snapshot, `loans.log.1`, `loans.log`
//! in that order; every operation states a loan in full (put replaces, remove deletes),
//! so replaying operations the snapshot already holds changes nothing.
//!
//! A torn last line (a crash in the middle of an append) is ignored at load and cut off
//! before the next append. A file damaged anywhere else is moved aside
//! (`<name>.corrupt-<unix ms>`) by [`Journal::recover`], which keeps every line it can read:
//! the agent must start even then, or every stall on the host waits for it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::cgroup::{CgroupPath, Identity, Limits};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt journal: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the journal is read-only (dry run)")]
    ReadOnly,
}

/// One outstanding loan as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoanRecord {
    pub cgroup: CgroupPath,
    pub policy: String,
    pub episode: u64,
    /// Limits before the first raise: what is given back, whatever happened since.
    pub original: Limits,
    /// Limits the kernel held after the agent's last completed write (read back, so
    /// kernel rounding is already in them).
    pub lent: Limits,
    /// A change of the limits in flight: journaled before its first write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    pub started_unix_ms: u64,
    pub hold_until_unix_ms: u64,
    pub restore_below_bytes: u64,
    pub restore_after_ms: u64,
    /// The step an episode resumes at when the hold expires with usage still too high.
    pub resume_step: usize,
    /// The cgroup lent to (its directory's inode and the boot): one removed and made
    /// again at the same path, while the agent was down or across a reboot, is another
    /// cgroup, and its loan is given up instead of "given back" onto it. `None` in
    /// journals written before it was recorded, or where it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
}

/// A change of a cgroup's limits that takes more than one write (v1: memory and memsw).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub from: Limits,
    pub to: Limits,
    pub step: ChangeStep,
}

/// How far a [`Change`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeStep {
    /// Journaled, no write known to have happened (a raise: memsw first, then memory).
    Begun,
    /// A restore wrote memory; memsw is still to go.
    MemoryDone,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    loans: Vec<LoanRecord>,
}

/// One line of the log.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Op {
    Put { loan: Box<LoanRecord> },
    Remove { cgroup: CgroupPath },
}

/// A journal file that could not be read in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Damage {
    pub file: PathBuf,
    /// Where the damaged file was moved (None in a dry run, which moves nothing).
    pub moved_to: Option<PathBuf>,
    pub error: String,
    /// Lines (or the whole snapshot) that could not be read and were left out.
    pub skipped: usize,
}

/// What [`Journal::recover`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub loans: Vec<LoanRecord>,
    pub damage: Vec<Damage>,
}

/// The open log: the file appends go to, and whether its tail must be cut first.
struct Log {
    file: std::sync::Arc<File>,
    /// The file may end in a torn line: cut it before the next append.
    check_tail: bool,
}

pub struct Journal {
    dir: PathBuf,
    snapshot: PathBuf,
    log_path: PathBuf,
    rotated: PathBuf,
    /// None in a dry run: nothing is ever written.
    log: Option<Mutex<Log>>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { path, source }
}

fn open_log(path: &Path) -> Result<File, JournalError> {
    // Readable too: a torn tail is found by reading the last bytes.
    std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

impl Journal {
    /// Opens (creating the directory if needed) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        let log_path = state_dir.join("loans.log");
        let file = open_log(&log_path)?;
        let mut j = Journal::read_only(state_dir);
        j.log = Some(Mutex::new(Log {
            file: std::sync::Arc::new(file),
            check_tail: true,
        }));
        Ok(j)
    }

    /// A journal that is read and never written (`--dry-run`): no file is created,
    /// repaired or moved.
    pub fn read_only(state_dir: &Path) -> Journal {
        Journal {
            dir: state_dir.to_path_buf(),
            snapshot: state_dir.join("loans.json"),
            log_path: state_dir.join("loans.log"),
            rotated: state_dir.join("loans.log.1"),
            log: None,
        }
    }

    pub fn is_read_only(&self) -> bool {
        self.log.is_none()
    }

    /// The snapshot file (what `oomwake status` and operators read).
    pub fn path(&self) -> &Path {
        &self.snapshot
    }

    /// The recorded loans: the snapshot with the logs replayed over it. A torn last log
    /// line (a crash in the middle of an append) is ignored; damage anywhere else is an
    /// error, so that nothing is silently forgotten.
    pub fn load(&self) -> Result<Vec<LoanRecord>, JournalError> {
        let mut loans = BTreeMap::new();
        if let Some(text) = read_opt(&self.snapshot)? {
            let s = parse_snapshot(&self.snapshot, &text)?;
            loans.extend(s.into_iter().map(|l| (l.cgroup.clone(), l)));
        }
        for path in [&self.rotated, &self.log_path] {
            if let Some(text) = read_log(path)? {
                let (ops, bad) = parse_log(&text);
                if let Some((_, source)) = bad.into_iter().next() {
                    return Err(JournalError::Corrupt {
                        path: path.to_path_buf(),
                        source,
                    });
                }
                replay(&mut loans, ops);
            }
        }
        Ok(loans.into_values().collect())
    }

    /// Like [`Journal::load`], but damage does not stop it: every readable operation is
    /// kept, a damaged file is moved aside (not in a dry run) and reported, and the
    /// readable state is written back as a fresh snapshot by the caller's compaction.
    /// Only an error the state directory itself gives (not a file's content) fails.
    pub fn recover(&self) -> Result<Recovered, JournalError> {
        let mut out = Recovered::default();
        let mut loans = BTreeMap::new();
        match read_opt(&self.snapshot) {
            Ok(None) => {}
            Ok(Some(text)) => match parse_snapshot(&self.snapshot, &text) {
                Ok(s) => loans.extend(s.into_iter().map(|l| (l.cgroup.clone(), l))),
                Err(e) => out
                    .damage
                    .push(self.move_aside(&self.snapshot, e.to_string(), 1)),
            },
            Err(e) => out
                .damage
                .push(self.move_aside(&self.snapshot, e.to_string(), 1)),
        }
        for path in [&self.rotated, &self.log_path] {
            match read_log(path) {
                Ok(None) => {}
                Ok(Some(text)) => {
                    let (ops, bad) = parse_log(&text);
                    replay(&mut loans, ops);
                    if let Some((line, e)) = bad.first() {
                        let why = format!("line {line}: {e}");
                        out.damage.push(self.move_aside(path, why, bad.len()));
                    }
                }
                Err(e) => out.damage.push(self.move_aside(path, e.to_string(), 1)),
            }
        }
        out.loans = loans.into_values().collect();
        Ok(out)
    }

    /// Moves a damaged file out of the way (a copy for the open log, which is then
    /// emptied: appends go on in the same file).
    fn move_aside(&self, path: &Path, error: String, skipped: usize) -> Damage {
        let mut d = Damage {
            file: path.to_path_buf(),
            moved_to: None,
            error,
            skipped,
        };
        let Some(log) = &self.log else {
            return d;
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("loans");
        let to = self
            .dir
            .join(format!("{name}.corrupt-{}", crate::loan::unix_ms()));
        let res = if path == self.log_path {
            let l = log.lock().unwrap_or_else(|p| p.into_inner());
            std::fs::copy(path, &to)
                .and_then(|_| l.file.set_len(0))
                .and_then(|_| l.file.sync_all())
        } else {
            std::fs::rename(path, &to)
        };
        match res.and_then(|_| File::open(&self.dir).and_then(|d| d.sync_all())) {
            Ok(()) => d.moved_to = Some(to),
            Err(e) => d.error = format!("{}; moving it aside failed: {e}", d.error),
        }
        d
    }

    fn append(&self, op: &Op) -> Result<(), JournalError> {
        let Some(log) = &self.log else {
            return Err(JournalError::ReadOnly);
        };
        let mut line =
            serde_json::to_vec(op).map_err(|e| io_err(&self.log_path)(io::Error::other(e)))?;
        line.push(b'\n');
        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
        if l.check_tail {
            cut_torn_tail(&l.file).map_err(io_err(&self.log_path))?;
            l.check_tail = false;
        }
        // One write(2) on an O_APPEND file: visible to any later reader at once.
        if let Err(e) = (&*l.file).write_all(&line) {
            // A short write leaves a torn line: cut it before the next append.
            l.check_tail = true;
            return Err(io_err(&self.log_path)(e));
        }
        Ok(())
    }

    /// Records a new or changed loan. Visible to a restarted agent as soon as this
    /// returns; durable after [`Journal::sync`].
    pub fn put(&self, loan: &LoanRecord) -> Result<(), JournalError> {
        self.append(&Op::Put {
            loan: Box::new(loan.clone()),
        })
    }

    /// Records that a loan is over.
    pub fn remove(&self, cgroup: &CgroupPath) -> Result<(), JournalError> {
        self.append(&Op::Remove {
            cgroup: cgroup.clone(),
        })
    }

    /// Flushes the log to disk (without blocking appends).
    pub fn sync(&self) -> Result<(), JournalError> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        let f = log.lock().unwrap_or_else(|p| p.into_inner()).file.clone();
        f.sync_data().map_err(io_err(&self.log_path))
    }

    /// Size of the log, to decide when to compact.
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// First half of a compaction: moves the log aside as `loans.log.1` and starts a
    /// fresh one. Call it with the state the snapshot will hold fixed (no append in
    /// between), then [`Journal::finish_compaction`] with that state, unlocked.
    pub fn rotate(&self) -> Result<(), JournalError> {
        let Some(log) = &self.log else {
            return Err(JournalError::ReadOnly);
        };
        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
        if self.rotated.exists() {
            // A compaction that did not finish: its log is still needed; append its
            // successor to it so nothing is lost, then start afresh.
            let mut old = std::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .open(&self.rotated)
                .map_err(io_err(&self.rotated))?;
            let cur = std::fs::read(&self.log_path).map_err(io_err(&self.log_path))?;
            cut_torn_tail(&old).map_err(io_err(&self.rotated))?;
            old.write_all(&cur).map_err(io_err(&self.rotated))?;
            old.sync_all().map_err(io_err(&self.rotated))?;
            l.file.set_len(0).map_err(io_err(&self.log_path))?;
            return Ok(());
        }
        std::fs::rename(&self.log_path, &self.rotated).map_err(io_err(&self.rotated))?;
        l.file = std::sync::Arc::new(open_log(&self.log_path)?);
        l.check_tail = false;
        Ok(())
    }

    /// Second half of a compaction: writes `loans` as the snapshot (temporary file,
    /// fsync, rename, fsync of the directory), then drops `loans.log.1`.
    pub fn finish_compaction(&self, loans: &[LoanRecord]) -> Result<(), JournalError> {
        if self.log.is_none() {
            return Err(JournalError::ReadOnly);
        }
        let tmp = self.dir.join("loans.json.tmp");
        let body = serde_json::to_vec_pretty(&Snapshot {
            version: 1,
            loans: loans.to_vec(),
        })
        .map_err(|e| io_err(&tmp)(io::Error::other(e)))?;
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&body).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &self.snapshot).map_err(io_err(&self.snapshot))?;
        self.sync_dir()?;
        match std::fs::remove_file(&self.rotated) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&self.rotated)(e)),
        }
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), JournalError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    /// Replaces the whole journal with `loans` (rotate + snapshot, in one go).
    pub fn save(&self, loans: &[LoanRecord]) -> Result<(), JournalError> {
        self.rotate()?;
        self.finish_compaction(loans)
    }
}

fn read_opt(path: &Path) -> Result<Option<String>, JournalError> {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8(b)
            .map(Some)
            .map_err(|e| io_err(path)(io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// A log's text. Lossy: bytes that are not UTF-8 spoil their own line (a torn last line
/// may end inside a character), not the whole file.
fn read_log(path: &Path) -> Result<Option<String>, JournalError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn parse_snapshot(path: &Path, text: &str) -> Result<Vec<LoanRecord>, JournalError> {
    serde_json::from_str::<Snapshot>(text)
        .map(|s| s.loans)
        .map_err(|source| JournalError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

/// The operations of a log, and the lines (1-based) that could not be read. A torn
/// last line (no newline after it) is not damage: the append it belonged to never
/// completed.
fn parse_log(text: &str) -> (Vec<Op>, Vec<(usize, serde_json::Error)>) {
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    let complete = text.ends_with('\n');
    let mut ops = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Op>(line) {
            Ok(op) => ops.push(op),
            Err(_) if i + 1 == lines.len() && !complete => {
                log::warn!("journal: ignoring a torn last line");
            }
            Err(e) => bad.push((i + 1, e)),
        }
    }
    (ops, bad)
}

fn replay(loans: &mut BTreeMap<CgroupPath, LoanRecord>, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Put { loan } => {
                loans.insert(loan.cgroup.clone(), *loan);
            }
            Op::Remove { cgroup } => {
                loans.remove(&cgroup);
            }
        }
    }
}

/// Ends a log on a line boundary before an append, so that the append starts a line
/// of its own instead of being glued onto a torn one. A last line that reads as a whole
/// operation (only its newline is missing) is what a start just loaded: it is kept and
/// terminated. Anything else after the last newline never completed: it is cut off.
fn cut_torn_tail(f: &File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    f.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Scan back for the last newline, a block at a time.
    let mut end = len;
    let mut buf = vec![0u8; 4096];
    let mut line_start = 0;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.read_exact_at(&mut buf[..n], start)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            line_start = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    // A journal line is a few hundred bytes; a tail of more than 1 MiB is no line.
    let tail_len = len - line_start;
    if tail_len <= 1 << 20 {
        let mut tail = vec![0u8; tail_len as usize];
        f.read_exact_at(&mut tail, line_start)?;
        if serde_json::from_slice::<Op>(&tail).is_ok() {
            log::warn!("journal: terminating a last line that lacked its newline");
            let mut w = f;
            return w.write_all(b"\n");
        }
    }
    log::warn!("journal: cutting a torn last line off the log");
    f.set_len(line_start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cg: &str) -> LoanRecord {
        LoanRecord {
            cgroup: CgroupPath::new(cg),
            policy: "p".into(),
            episode: 3,
            original: Limits {
                memory: 64 << 20,
                memsw: Some(64 << 20),
                high: None,
            },
            lent: Limits {
                memory: 80 << 20,
                memsw: Some(80 << 20),
                high: None,
            },
            change: None,
            started_unix_ms: 1,
            hold_until_unix_ms: 2,
            restore_below_bytes: 3,
            restore_after_ms: 4,
            resume_step: 2,
            identity: None,
        }
    }

    #[test]
    fn round_trip_and_replace() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(&t.path().join("state")).unwrap();
        assert!(j.load().unwrap().is_empty());
        j.save(&[rec("/a"), rec("/b")]).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/a"), rec("/b")]);
        j.save(&[rec("/b")]).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/b")]);
        assert!(!t.path().join("state/loans.json.tmp").exists());
    }

    #[test]
    fn log_replays_over_the_snapshot_and_survives_a_reopen() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(t.path()).unwrap();
        j.save(&[rec("/a")]).unwrap();
        j.put(&rec("/b")).unwrap();
        let mut c = rec("/a");
        c.lent.memory = 96 << 20;
        j.put(&c).unwrap();
        j.remove(&CgroupPath::new("/b")).unwrap();
        drop(j);
        let j = Journal::open(t.path()).unwrap();
        assert_eq!(j.load().unwrap(), vec![c.clone()]);
        assert!(j.log_len() > 0);
        j.save(&[c.clone()]).unwrap();
        assert_eq!(j.log_len(), 0);
        assert_eq!(j.load().unwrap(), vec![c]);
    }

    #[test]
    fn torn_last_line_is_ignored_but_damage_elsewhere_is_not() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(t.path()).unwrap();
        j.put(&rec("/a")).unwrap();
        let log = t.path().join("loans.log");
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str("{\"op\":\"put\",\"lo");
        std::fs::write(&log, &text).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/a")]);
        std::fs::write(&log, format!("garbage\n{text}")).unwrap();
        let e = j.load().unwrap_err().to_string();
        assert!(e.contains("loans.log") && e.contains("corrupt"), "{e}");
    }

    #[test]
    fn corrupt_journal_is_an_error_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(t.path()).unwrap();
        std::fs::write(j.path(), "{not json").unwrap();
        let e = j.load().unwrap_err().to_string();
        assert!(e.contains("loans.json") && e.contains("corrupt"), "{e}");
    }

    /// 6.8: an append after a torn last line starts a line of its own, so the journal
    /// stays readable by the next start.
    #[test]
    fn an_append_after_a_torn_line_is_not_glued_onto_it() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("loans.log");
        {
            let j = Journal::open(t.path()).unwrap();
            j.put(&rec("/a")).unwrap();
        }
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str("{\"op\":\"put\",\"lo");
        std::fs::write(&log, &text).unwrap();
        let j = Journal::open(t.path()).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/a")]);
        j.put(&rec("/b")).unwrap();
        drop(j);
        let j = Journal::open(t.path()).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/a"), rec("/b")]);
        assert!(j.recover().unwrap().damage.is_empty());
    }

    /// 7.6: a damaged journal is moved aside, what can be read is kept, and appends
    /// go on in a clean log.
    #[test]
    fn recover_moves_a_damaged_journal_aside_and_keeps_what_it_can_read() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(t.path()).unwrap();
        j.put(&rec("/a")).unwrap();
        let log = t.path().join("loans.log");
        let good = std::fs::read_to_string(&log).unwrap();
        let mut bytes = b"\xff\xfe not utf-8\n".to_vec();
        bytes.extend_from_slice(good.as_bytes());
        bytes.extend_from_slice(b"\x00\x01junk\n");
        std::fs::write(&log, bytes).unwrap();
        std::fs::write(t.path().join("loans.json"), "{not json").unwrap();
        assert!(j.load().is_err());
        let r = j.recover().unwrap();
        assert_eq!(r.loans, vec![rec("/a")]);
        assert_eq!(r.damage.len(), 2, "{:?}", r.damage);
        for d in &r.damage {
            let to = d.moved_to.as_ref().unwrap();
            assert!(to.to_str().unwrap().contains(".corrupt-"), "{to:?}");
            assert!(to.exists());
        }
        assert_eq!(r.damage[1].skipped, 2);
        // The state is clean again: a save and a reload see just the recovered loans.
        j.save(&r.loans).unwrap();
        j.put(&rec("/b")).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/a"), rec("/b")]);
    }

    #[test]
    fn a_read_only_journal_moves_and_creates_nothing() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("loans.log"), "garbage\n").unwrap();
        let j = Journal::read_only(t.path());
        let r = j.recover().unwrap();
        assert!(r.loans.is_empty());
        assert_eq!(r.damage[0].moved_to, None);
        assert!(j.put(&rec("/a")).is_err());
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    /// A compaction that stopped after moving the log aside loses nothing: the moved
    /// log is replayed, and the next compaction carries it over.
    #[test]
    fn an_unfinished_compaction_is_replayed_and_finished_later() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(t.path()).unwrap();
        j.put(&rec("/a")).unwrap();
        j.rotate().unwrap();
        j.put(&rec("/b")).unwrap();
        drop(j);
        let j = Journal::open(t.path()).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/a"), rec("/b")]);
        j.remove(&CgroupPath::new("/a")).unwrap();
        j.rotate().unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/b")]);
        j.finish_compaction(&[rec("/b")]).unwrap();
        assert!(!t.path().join("loans.log.1").exists());
        assert_eq!(j.load().unwrap(), vec![rec("/b")]);
    }

    /// A last line that is whole but for its newline is loaded at start; the next
    /// append keeps it (terminates it) instead of cutting what the start adopted.
    #[test]
    fn a_whole_last_line_without_its_newline_is_kept_by_the_next_append() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("loans.log");
        {
            let j = Journal::open(t.path()).unwrap();
            j.put(&rec("/a")).unwrap();
        }
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, text.trim_end()).unwrap();
        let j = Journal::open(t.path()).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/a")]);
        j.put(&rec("/b")).unwrap();
        assert_eq!(j.load().unwrap(), vec![rec("/a"), rec("/b")]);
    }
}
