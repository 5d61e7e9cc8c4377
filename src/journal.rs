//! The journal of lent limits, so that a crash or a restart of the agent never loses the
//! limit a cgroup had before the agent lent it headroom.
//!
//! A snapshot (`loans.json`, replaced by atomic rename + fsync) plus an append-only log
//! (`loans.log`, one JSON operation per line). A raise appends one line, in one write(2),
//! before the cgroup file is written, and is fsynced right after: an append costs tens of
//! microseconds where a rename on ext4 costs half a millisecond, as much as the rescue
//! itself. Replaying is idempotent (put replaces, remove deletes), so a crash between a
//! compaction's rename and its truncation of the log loses nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::cgroup::{CgroupPath, Limits};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt journal: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One outstanding loan as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoanRecord {
    pub cgroup: CgroupPath,
    pub policy: String,
    pub episode: u64,
    /// Limits before the first raise: what is given back.
    pub original: Limits,
    /// Limits the agent wrote last.
    pub lent: Limits,
    pub started_unix_ms: u64,
    pub hold_until_unix_ms: u64,
    pub restore_below_bytes: u64,
    pub restore_after_ms: u64,
    /// The step an episode resumes at when the hold expires with usage still too high.
    pub resume_step: usize,
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
    Put { loan: LoanRecord },
    Remove { cgroup: CgroupPath },
}

pub struct Journal {
    dir: PathBuf,
    snapshot: PathBuf,
    log_path: PathBuf,
    log: Mutex<File>,
    /// A second descriptor of the log for fsync, so that a flush in progress (about a
    /// millisecond) never holds up an append, i.e. a raise.
    sync_fd: File,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { path, source }
}

impl Journal {
    /// Opens (creating the directory if needed) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        let log_path = state_dir.join("loans.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let sync_fd = log.try_clone().map_err(io_err(&log_path))?;
        Ok(Journal {
            dir: state_dir.to_path_buf(),
            snapshot: state_dir.join("loans.json"),
            log_path,
            log: Mutex::new(log),
            sync_fd,
        })
    }

    /// The snapshot file (what `oomwake status` and operators read).
    pub fn path(&self) -> &Path {
        &self.snapshot
    }

    /// The recorded loans: the snapshot with the log replayed over it. A torn last log
    /// line (a crash in the middle of an append) is ignored; damage anywhere else is an
    /// error, so that nothing is silently forgotten.
    pub fn load(&self) -> Result<Vec<LoanRecord>, JournalError> {
        let mut loans: BTreeMap<CgroupPath, LoanRecord> = BTreeMap::new();
        match std::fs::read_to_string(&self.snapshot) {
            Ok(text) => {
                let s: Snapshot =
                    serde_json::from_str(&text).map_err(|source| JournalError::Corrupt {
                        path: self.snapshot.clone(),
                        source,
                    })?;
                loans.extend(s.loans.into_iter().map(|l| (l.cgroup.clone(), l)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&self.snapshot)(e)),
        }
        let text = match std::fs::read_to_string(&self.log_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(&self.log_path)(e)),
        };
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        let complete = text.ends_with('\n');
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<Op>(line) {
                Ok(Op::Put { loan }) => {
                    loans.insert(loan.cgroup.clone(), loan);
                }
                Ok(Op::Remove { cgroup }) => {
                    loans.remove(&cgroup);
                }
                Err(_) if i + 1 == lines.len() && !complete => {
                    log::warn!("{}: ignoring a torn last line", self.log_path.display());
                }
                Err(source) => {
                    return Err(JournalError::Corrupt {
                        path: self.log_path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(loans.into_values().collect())
    }

    fn append(&self, op: &Op) -> Result<(), JournalError> {
        let mut line =
            serde_json::to_vec(op).map_err(|e| io_err(&self.log_path)(io::Error::other(e)))?;
        line.push(b'\n');
        let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
        // One write(2) on an O_APPEND file: visible to any later reader at once.
        f.write_all(&line).map_err(io_err(&self.log_path))
    }

    /// Records a new or changed loan. Visible to a restarted agent as soon as this
    /// returns; durable after [`Journal::sync`].
    pub fn put(&self, loan: &LoanRecord) -> Result<(), JournalError> {
        self.append(&Op::Put { loan: loan.clone() })
    }

    /// Records that a loan is over.
    pub fn remove(&self, cgroup: &CgroupPath) -> Result<(), JournalError> {
        self.append(&Op::Remove {
            cgroup: cgroup.clone(),
        })
    }

    /// Flushes the log to disk (without blocking appends).
    pub fn sync(&self) -> Result<(), JournalError> {
        self.sync_fd.sync_data().map_err(io_err(&self.log_path))
    }

    /// Size of the log, to decide when to compact.
    pub fn log_len(&self) -> u64 {
        self.sync_fd.metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// Replaces the snapshot with `loans` (temporary file, fsync, rename, fsync of the
    /// directory) and empties the log.
    pub fn save(&self, loans: &[LoanRecord]) -> Result<(), JournalError> {
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
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.set_len(0).map_err(io_err(&self.log_path))?;
        log.sync_all().map_err(io_err(&self.log_path))
    }
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
            },
            lent: Limits {
                memory: 80 << 20,
                memsw: Some(80 << 20),
            },
            started_unix_ms: 1,
            hold_until_unix_ms: 2,
            restore_below_bytes: 3,
            restore_after_ms: 4,
            resume_step: 2,
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
}
