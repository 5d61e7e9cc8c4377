//! The audit log: JSON Lines, one object per line, appended and flushed per line. Every
//! line starts with `ts` (RFC 3339 UTC, milliseconds), `event` and `cgroup`.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

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

enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
}

/// Where audit lines go: stderr, or a file opened for append.
pub struct Audit {
    sink: Mutex<Sink>,
}

impl Audit {
    pub fn stderr() -> Audit {
        Audit {
            sink: Mutex::new(Sink::Stderr),
        }
    }

    pub fn file(path: &Path) -> io::Result<Audit> {
        let file = open_append(path)?;
        Ok(Audit {
            sink: Mutex::new(Sink::File {
                path: path.to_path_buf(),
                file,
            }),
        })
    }

    /// Reopens the file (after logrotate moved it); called on SIGHUP.
    pub fn reopen(&self) -> io::Result<()> {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Sink::File { path, file } = &mut *sink {
            *file = open_append(path)?;
        }
        Ok(())
    }

    pub fn log(&self, rec: Record) {
        let mut line = rec.to_line();
        line.push('\n');
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let res = match &mut *sink {
            Sink::Stderr => io::stderr().write_all(line.as_bytes()),
            Sink::File { file, .. } => file.write_all(line.as_bytes()).and_then(|_| file.flush()),
        };
        if let Err(e) = res {
            log::error!("audit log write failed: {e}; line was: {}", line.trim_end());
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn reopen_follows_a_rotated_file() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("audit.jsonl");
        let a = Audit::file(&path).unwrap();
        a.log(Record::new("watch", &CgroupPath::root()));
        std::fs::rename(&path, t.path().join("audit.jsonl.1")).unwrap();
        a.reopen().unwrap();
        a.log(Record::new("watch", &CgroupPath::root()));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }
}
