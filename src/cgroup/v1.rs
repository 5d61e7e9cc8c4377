//! cgroup v1 memory controller: `memory.oom_control`, `memory.limit_in_bytes` and
//! `memory.memsw.limit_in_bytes` (memory must stay <= memsw: raise memsw first, lower
//! memory first), `memory.force_empty`, and OOM eventfds via `cgroup.event_control`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{
    io_is_gone, parse, read_file, write_bounded, write_file, CgroupError, CgroupPath, Controller,
    Hierarchy, ReclaimEnd, Reclaimed,
};
use super::{Limits, OomControl, OomProbe, Result, StallFd, StallSource, StallWatch};

pub struct V1 {
    h: Hierarchy,
    /// Control files of watched cgroups, kept open (live hierarchies only): opening a
    /// file allocates kernel memory charged to the agent's own cgroup, which fails with
    /// ENOMEM when the agent shares the stuck cgroup. Opened, and read once (the kernel
    /// keeps the read buffer with the open file), by [`Controller::prepare`]. One entry
    /// per cgroup directory, the files in [`PREPARED`]'s order: the directory's path is
    /// held once, not once per file (the table is locked in memory with the rest).
    open: Mutex<HashMap<PathBuf, [Option<Arc<File>>; PREPARED.len()]>>,
}

/// The files an episode reads or writes; the writable ones are opened read-write.
const PREPARED: [(&str, bool); 6] = [
    ("memory.oom_control", true),
    ("memory.limit_in_bytes", true),
    ("memory.memsw.limit_in_bytes", true),
    ("memory.usage_in_bytes", false),
    ("memory.failcnt", false),
    ("memory.force_empty", true),
];

impl V1 {
    pub fn new(h: Hierarchy) -> V1 {
        V1 {
            h,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The directory of a control file and the file's place in [`PREPARED`].
    fn slot(path: &Path) -> Option<(&Path, usize)> {
        let name = path.file_name()?;
        let i = PREPARED.iter().position(|(n, _)| name == *n)?;
        Some((path.parent()?, i))
    }

    fn cached(&self, path: &Path) -> Option<Arc<File>> {
        if !self.h.is_live() {
            return None;
        }
        let (dir, i) = Self::slot(path)?;
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(dir)?[i].clone()
    }

    fn evict(&self, path: &Path) {
        let Some((dir, i)) = Self::slot(path) else {
            return;
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(files) = open.get_mut(dir) {
            files[i] = None;
            if files.iter().all(Option::is_none) {
                open.remove(dir);
            }
        }
    }

    /// Reads a control file through its kept-open descriptor if there is one.
    fn read_text(&self, path: &Path) -> Result<Option<String>> {
        let Some(f) = self.cached(path) else {
            return read_file(path);
        };
        let mut buf = [0u8; 512];
        let mut out = Vec::new();
        loop {
            match f.read_at(&mut buf, out.len() as u64) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The kept-open file's cgroup is gone; a cgroup made again at the same
                // path is another one, read through a fresh open of the path.
                Err(e) if io_is_gone(&e) => {
                    self.evict(path);
                    return read_file(path);
                }
                Err(source) => {
                    return Err(CgroupError::Read {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        String::from_utf8(out)
            .map(Some)
            .map_err(|e| CgroupError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })
    }

    fn read_parsed<T>(
        &self,
        cg: &CgroupPath,
        file: &str,
        what: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        let path = self.h.dir(cg).join(file);
        let Some(s) = self.read_text(&path)? else {
            return Ok(None);
        };
        parse(&s).map(Some).ok_or(CgroupError::Parse {
            path,
            what,
            content: s.chars().take(200).collect(),
        })
    }

    fn write(&self, cg: &CgroupPath, file: &str, value: &str) -> Result<()> {
        let path = self.h.dir(cg).join(file);
        let Some(f) = self.cached(&path) else {
            return write_file(&path, value);
        };
        // One write(2); cgroupfs takes the whole value whatever the offset.
        match f.write_at(value.as_bytes(), 0) {
            Ok(_) => Ok(()),
            Err(source) => {
                if io_is_gone(&source) {
                    self.evict(&path);
                }
                Err(CgroupError::Write {
                    path,
                    value: value.to_string(),
                    source,
                })
            }
        }
    }
}

fn limit_value(v: u64) -> String {
    if parse::is_unlimited(v) {
        "-1".to_string()
    } else {
        v.to_string()
    }
}

impl Controller for V1 {
    fn hierarchy(&self) -> &Hierarchy {
        &self.h
    }

    fn oom_state(&self, cg: &CgroupPath) -> Result<Option<OomControl>> {
        self.read_parsed(cg, "memory.oom_control", "oom_control", parse::oom_control)
    }

    fn limits(&self, cg: &CgroupPath) -> Result<Option<Limits>> {
        let Some(memory) = self.read_parsed(cg, "memory.limit_in_bytes", "limit", parse::bytes)?
        else {
            return Ok(None);
        };
        // Without swap accounting the memsw files do not exist at all: read as None,
        // like a vanished cgroup, which the memory read above has already ruled out.
        let memsw = self.read_parsed(cg, "memory.memsw.limit_in_bytes", "limit", parse::bytes)?;
        Ok(Some(Limits {
            memory,
            memsw,
            high: None,
        }))
    }

    fn usage(&self, cg: &CgroupPath) -> Result<Option<u64>> {
        self.read_parsed(cg, "memory.usage_in_bytes", "usage", parse::bytes)
    }

    fn set_limits(&self, cg: &CgroupPath, from: Limits, to: Limits) -> Result<()> {
        let mem = limit_value(to.memory);
        // An unchanged memsw limit (typically unlimited) needs no write.
        let to_memsw = to.memsw.filter(|&sw| Some(sw) != from.memsw);
        match to_memsw {
            Some(sw) if from.memsw.is_some_and(|old| sw >= old) => {
                self.write(cg, "memory.memsw.limit_in_bytes", &limit_value(sw))?;
                self.write(cg, "memory.limit_in_bytes", &mem)
            }
            Some(sw) => {
                self.write(cg, "memory.limit_in_bytes", &mem)?;
                self.write(cg, "memory.memsw.limit_in_bytes", &limit_value(sw))
            }
            None => self.write(cg, "memory.limit_in_bytes", &mem),
        }
    }

    /// `memory.force_empty` loops in the kernel for as long as each pass frees
    /// something: with a task that keeps faulting pages back in (a reader refilling the
    /// page cache) that is without end. It checks for a pending signal between passes,
    /// so the write is bounded by `timeout` (see [`write_bounded`]).
    fn reclaim(&self, cg: &CgroupPath, timeout: Duration) -> Result<Option<Reclaimed>> {
        let Some(before) = self.usage(cg)? else {
            return Ok(None);
        };
        let path = self.h.dir(cg).join("memory.force_empty");
        let err = |source| CgroupError::Write {
            path: path.clone(),
            value: "0".to_string(),
            source,
        };
        let start = Instant::now();
        let res = match self.cached(&path) {
            Some(f) => write_bounded(&f, b"0", timeout),
            None => std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| write_bounded(&f, b"0", timeout)),
        };
        let timed_out = match res {
            Ok(t) => t,
            Err(e) if io_is_gone(&e) => {
                self.evict(&path);
                return Ok(None);
            }
            Err(e) => return Err(err(e)),
        };
        let took = start.elapsed();
        let after = self.usage(cg)?.unwrap_or(before);
        Ok(Some(Reclaimed {
            before,
            after,
            requested: None,
            end: if timed_out {
                ReclaimEnd::TimedOut
            } else {
                ReclaimEnd::Finished
            },
            took,
        }))
    }

    fn procs(&self, cg: &CgroupPath) -> Result<Option<Vec<i32>>> {
        self.read_parsed(cg, "cgroup.procs", "pids", parse::pids)
    }

    fn stat(&self, cg: &CgroupPath) -> Result<Option<BTreeMap<String, u64>>> {
        self.read_parsed(cg, "memory.stat", "memory.stat", parse::flat_keyed)
    }

    fn failcnt(&self, cg: &CgroupPath) -> Result<Option<u64>> {
        self.read_parsed(cg, "memory.failcnt", "failcnt", parse::bytes)
    }

    fn prepare(&self, cg: &CgroupPath) {
        if !self.h.is_live() {
            return;
        }
        let dir = self.h.dir(cg);
        for (i, (name, writable)) in PREPARED.into_iter().enumerate() {
            let path = dir.join(name);
            if self.cached(&path).is_some() {
                continue;
            }
            let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(writable)
                .open(&path)
            else {
                // Absent (memsw without swap accounting) or gone: opened on use.
                continue;
            };
            // The first read allocates the kernel's buffer for this open file.
            let mut buf = [0u8; 512];
            if name != "memory.force_empty" {
                let _ = f.read_at(&mut buf, 0);
            }
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.entry(dir.clone()).or_default()[i] = Some(Arc::new(f));
        }
    }

    fn forget(&self, cg: &CgroupPath) {
        let dir = self.h.dir(cg);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(&dir);
    }

    fn set_oom_kill_disable(&self, cg: &CgroupPath, disable: bool) -> Result<bool> {
        let kept = self
            .cached(&self.h.dir(cg).join("memory.oom_control"))
            .is_some();
        self.write(cg, "memory.oom_control", if disable { "1" } else { "0" })?;
        Ok(kept)
    }

    fn oom_probe(&self, cg: &CgroupPath) -> Result<Option<OomProbe>> {
        OomProbe::open(
            self.h.dir(cg).join("memory.oom_control"),
            parse::oom_control,
        )
    }

    fn register_threshold(&self, cg: &CgroupPath, bytes: u64) -> Result<Option<StallFd>> {
        let dir = self.h.dir(cg);
        let usage = dir.join("memory.usage_in_bytes");
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| CgroupError::Io {
                path: usage.clone(),
                source: e.into(),
            })?;
        // The descriptor kept open for episodes if there is one (no new kernel memory);
        // the kernel needs the file only while it reads the line.
        let kept = self.cached(&usage);
        let opened;
        let ufd = match &kept {
            Some(f) => f.as_raw_fd(),
            None => {
                opened = std::fs::File::open(&usage).map_err(|source| CgroupError::Read {
                    path: usage.clone(),
                    source,
                })?;
                opened.as_raw_fd()
            }
        };
        let line = format!("{} {} {bytes}", efd.as_raw_fd(), ufd);
        write_file(&dir.join("cgroup.event_control"), &line)?;
        Ok(Some(StallFd::new(efd.into(), StallSource::Threshold)))
    }

    fn register_stall(
        &self,
        cg: &CgroupPath,
        _psi: Option<&super::v2::PsiTrigger>,
    ) -> Result<StallWatch> {
        let dir = self.h.dir(cg);
        let control = dir.join("memory.oom_control");
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| CgroupError::Io {
                path: control.clone(),
                source: e.into(),
            })?;
        // The kernel keeps its own reference to the eventfd; the control file may close.
        let ocf = std::fs::File::open(&control).map_err(|source| CgroupError::Read {
            path: control.clone(),
            source,
        })?;
        let line = format!("{} {}", efd.as_raw_fd(), ocf.as_raw_fd());
        write_file(&dir.join("cgroup.event_control"), &line)?;
        Ok(StallWatch {
            fds: vec![StallFd::new(efd.into(), StallSource::OomEventFd)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Kind;

    fn fake() -> (tempfile::TempDir, V1) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("app");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(
            d.join("memory.oom_control"),
            "oom_kill_disable 1\nunder_oom 1\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.limit_in_bytes"), "67108864\n").unwrap();
        std::fs::write(d.join("memory.usage_in_bytes"), "67100000\n").unwrap();
        std::fs::write(d.join("cgroup.procs"), "10\n11\n").unwrap();
        let v = V1::new(Hierarchy::fake(t.path(), Kind::V1));
        (t, v)
    }

    #[test]
    fn reads_state_limits_usage_procs() {
        let (_t, v) = fake();
        let cg = CgroupPath::new("/app");
        let oc = v.oom_state(&cg).unwrap().unwrap();
        assert!(oc.oom_kill_disable && oc.under_oom);
        let l = v.limits(&cg).unwrap().unwrap();
        assert_eq!(
            l,
            Limits {
                memory: 64 << 20,
                memsw: None,
                high: None,
            }
        );
        assert_eq!(v.usage(&cg).unwrap(), Some(67100000));
        assert_eq!(v.procs(&cg).unwrap(), Some(vec![10, 11]));
    }

    #[test]
    fn probe_rereads_the_current_content() {
        let (t, v) = fake();
        let cg = CgroupPath::new("/app");
        let probe = v.oom_probe(&cg).unwrap().unwrap();
        assert!(probe.read().unwrap().unwrap().under_oom);
        std::fs::write(
            t.path().join("app/memory.oom_control"),
            "oom_kill_disable 1\nunder_oom 0\n",
        )
        .unwrap();
        assert!(!probe.read().unwrap().unwrap().under_oom);
        assert!(v.oom_probe(&CgroupPath::new("/gone")).unwrap().is_none());
    }

    #[test]
    fn missing_cgroup_reads_none() {
        let (_t, v) = fake();
        let gone = CgroupPath::new("/gone");
        assert!(v.oom_state(&gone).unwrap().is_none());
        assert!(v.limits(&gone).unwrap().is_none());
        assert!(v.usage(&gone).unwrap().is_none());
    }

    #[test]
    fn bad_content_is_a_parse_error_naming_the_file() {
        let (t, v) = fake();
        std::fs::write(t.path().join("app/memory.limit_in_bytes"), "lots\n").unwrap();
        let err = v.limits(&CgroupPath::new("/app")).unwrap_err();
        assert!(err.to_string().contains("memory.limit_in_bytes"), "{err}");
    }

    #[test]
    fn memsw_written_first_when_raising_and_last_when_lowering() {
        let (t, v) = fake();
        let d = t.path().join("app");
        std::fs::write(d.join("memory.memsw.limit_in_bytes"), "67108864\n").unwrap();
        let cg = CgroupPath::new("/app");
        let old = v.limits(&cg).unwrap().unwrap();
        assert_eq!(old.memsw, Some(64 << 20));
        // Make the memory file read-only: the write that comes second must not happen
        // if the first failed, so we can observe the order.
        let mem = d.join("memory.limit_in_bytes");
        let sw = d.join("memory.memsw.limit_in_bytes");
        let up = Limits {
            memory: 80 << 20,
            memsw: Some(80 << 20),
            high: None,
        };
        v.set_limits(&cg, old, up).unwrap();
        assert_eq!(
            std::fs::read_to_string(&mem).unwrap(),
            (80u64 << 20).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(&sw).unwrap(),
            (80u64 << 20).to_string()
        );
        // Lowering: remove the memsw file so its write fails; memory must already be
        // written by then.
        std::fs::remove_file(&sw).unwrap();
        let err = v.set_limits(&cg, up, old).unwrap_err();
        assert!(err.is_gone());
        assert_eq!(
            std::fs::read_to_string(&mem).unwrap(),
            (64u64 << 20).to_string()
        );
        // Raising with memsw missing: memsw first, so memory stays untouched.
        let err = v.set_limits(&cg, old, up).unwrap_err();
        assert!(err.is_gone());
        assert_eq!(
            std::fs::read_to_string(&mem).unwrap(),
            (64u64 << 20).to_string()
        );
    }

    #[test]
    fn unlimited_is_written_as_minus_one() {
        assert_eq!(limit_value(9223372036854771712), "-1");
        assert_eq!(limit_value(4096), "4096");
    }
}
