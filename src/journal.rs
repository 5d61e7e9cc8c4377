//! The journal of lent limits: every raise is written here (atomic rename + fsync)
//! before the cgroup file is touched, so a crash or a restart never loses the limit a
//! cgroup had before the agent lent it headroom.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
struct File {
    version: u32,
    loans: Vec<LoanRecord>,
}

pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
}

impl Journal {
    /// Opens (creating the directory if needed) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(state_dir).map_err(|source| JournalError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        Ok(Journal {
            dir: state_dir.to_path_buf(),
            path: state_dir.join("loans.json"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded loans; none if the journal does not exist yet.
    pub fn load(&self) -> Result<Vec<LoanRecord>, JournalError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(JournalError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let f: File = serde_json::from_str(&text).map_err(|source| JournalError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        Ok(f.loans)
    }

    /// Replaces the journal with `loans`: write a temporary file, fsync it, rename it
    /// over the old one, fsync the directory.
    pub fn save(&self, loans: &[LoanRecord]) -> Result<(), JournalError> {
        let tmp = self.dir.join("loans.json.tmp");
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        let body = serde_json::to_vec_pretty(&File {
            version: 1,
            loans: loans.to_vec(),
        })
        .map_err(|e| JournalError::Io {
            path: tmp.clone(),
            source: io::Error::other(e),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&body).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io_err(&self.path))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
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
    fn corrupt_journal_is_an_error_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(t.path()).unwrap();
        std::fs::write(j.path(), "{not json").unwrap();
        let e = j.load().unwrap_err().to_string();
        assert!(e.contains("loans.json") && e.contains("corrupt"), "{e}");
    }
}
