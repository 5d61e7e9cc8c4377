//! A controller double for loan tests: cgroup v1 files in a TempDir that behave like the
//! kernel where it matters to loans (limits stored in whole pages of a chosen size,
//! "-1" stored as the maximum, memory <= memsw enforced with EINVAL), with faults
//! injected per cgroup and file: an errno for the next N writes, or a write (or a
//! limits read) that blocks until the test releases it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::cgroup::{
    self, parse, v1::V1, CgroupError, CgroupPath, Controller, Hierarchy, Kind, Limits, OomControl,
    OomProbe,
};

pub const MEM: &str = "memory.limit_in_bytes";
pub const SW: &str = "memory.memsw.limit_in_bytes";
/// The key of a blocking limits read.
pub const READ_LIMITS: &str = "read-limits";

/// A point a test holds shut: whoever reaches it waits until released.
#[derive(Default)]
pub struct Blocker {
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Blocker {
    fn wait(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        self.cv.notify_all();
        while !s.1 {
            s = self.cv.wait(s).unwrap();
        }
    }

    /// Waits (bounded) until somebody is held at this point.
    pub fn wait_entered(&self) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self
            .cv
            .wait_timeout_while(s, Duration::from_secs(10), |s| !s.0)
            .unwrap();
        s.0
    }

    pub fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

enum Fault {
    Errno(i32, usize),
    Block(Arc<Blocker>),
}

pub struct Double {
    _t: tempfile::TempDir,
    pub root: PathBuf,
    v1: V1,
    page: u64,
    faults: Mutex<HashMap<(CgroupPath, &'static str), Fault>>,
}

impl Double {
    /// A hierarchy whose kernel stores limits in pages of `page` bytes.
    pub fn new(page: u64) -> Double {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        Double {
            v1: V1::new(Hierarchy::fake(&root, Kind::V1)),
            _t: t,
            root,
            page,
            faults: Mutex::new(HashMap::new()),
        }
    }

    /// A cgroup with these limits (memsw None: no swap accounting) and usage.
    pub fn cgroup(&self, name: &str, limit: u64, memsw: Option<u64>, usage: u64) -> CgroupPath {
        let d = self.root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(MEM), limit.to_string()).unwrap();
        if let Some(sw) = memsw {
            std::fs::write(d.join(SW), sw.to_string()).unwrap();
        }
        std::fs::write(d.join("memory.usage_in_bytes"), usage.to_string()).unwrap();
        std::fs::write(
            d.join("memory.oom_control"),
            "oom_kill_disable 1\nunder_oom 0\n",
        )
        .unwrap();
        CgroupPath::new(name)
    }

    pub fn read(&self, cg: &CgroupPath, file: &str) -> u64 {
        std::fs::read_to_string(self.root.join(cg.relative()).join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn limit(&self, cg: &CgroupPath) -> u64 {
        self.read(cg, MEM)
    }

    pub fn memsw(&self, cg: &CgroupPath) -> u64 {
        self.read(cg, SW)
    }

    /// Sets a limit as somebody else would (no rounding, no checks).
    pub fn set_raw(&self, cg: &CgroupPath, file: &str, v: u64) {
        std::fs::write(self.root.join(cg.relative()).join(file), v.to_string()).unwrap();
    }

    pub fn set_usage(&self, cg: &CgroupPath, u: u64) {
        self.set_raw(cg, "memory.usage_in_bytes", u);
    }

    pub fn remove(&self, cg: &CgroupPath) {
        std::fs::remove_dir_all(self.root.join(cg.relative())).unwrap();
    }

    /// The next `times` writes of `file` in `cg` fail with `errno`.
    pub fn fail(&self, cg: &CgroupPath, file: &'static str, errno: i32, times: usize) {
        self.faults
            .lock()
            .unwrap()
            .insert((cg.clone(), file), Fault::Errno(errno, times));
    }

    /// The next write of `file` (or [`READ_LIMITS`]) in `cg` blocks until released.
    pub fn block(&self, cg: &CgroupPath, file: &'static str) -> Arc<Blocker> {
        let b = Arc::new(Blocker::default());
        self.faults
            .lock()
            .unwrap()
            .insert((cg.clone(), file), Fault::Block(b.clone()));
        b
    }

    /// Applies (and consumes) a fault for `file`; Err if the operation must fail.
    fn fault(&self, cg: &CgroupPath, file: &'static str) -> io::Result<()> {
        let key = (cg.clone(), file);
        let f = self.faults.lock().unwrap().remove(&key);
        match f {
            None => Ok(()),
            Some(Fault::Block(b)) => {
                b.wait();
                Ok(())
            }
            Some(Fault::Errno(e, n)) => {
                if n > 1 {
                    self.faults
                        .lock()
                        .unwrap()
                        .insert(key, Fault::Errno(e, n - 1));
                }
                Err(io::Error::from_raw_os_error(e))
            }
        }
    }

    fn kernel_max(&self) -> u64 {
        i64::MAX as u64 / self.page * self.page
    }

    /// One limit write, as the v1 kernel takes it.
    fn write(&self, cg: &CgroupPath, file: &'static str, value: u64) -> cgroup::Result<()> {
        let path = self.root.join(cg.relative()).join(file);
        let err = |source| CgroupError::Write {
            path: path.clone(),
            value: value.to_string(),
            source,
        };
        self.fault(cg, file).map_err(err)?;
        if !path.exists() {
            return Err(err(io::Error::from_raw_os_error(libc::ENOENT)));
        }
        let stored = if parse::is_unlimited(value) {
            self.kernel_max()
        } else {
            value.min(self.kernel_max()) / self.page * self.page
        };
        let d = self.root.join(cg.relative());
        let other = |f: &str| -> Option<u64> {
            std::fs::read_to_string(d.join(f))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        // v1 keeps memory <= memsw.
        let ok = match file {
            MEM => other(SW).is_none_or(|sw| stored <= sw),
            SW => other(MEM).is_none_or(|m| m <= stored),
            _ => true,
        };
        if !ok {
            return Err(err(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        std::fs::write(&path, stored.to_string()).map_err(err)
    }
}

impl Controller for Double {
    fn hierarchy(&self) -> &Hierarchy {
        self.v1.hierarchy()
    }
    fn oom_state(&self, cg: &CgroupPath) -> cgroup::Result<Option<OomControl>> {
        self.v1.oom_state(cg)
    }
    fn limits(&self, cg: &CgroupPath) -> cgroup::Result<Option<Limits>> {
        let _ = self.fault(cg, READ_LIMITS);
        self.v1.limits(cg)
    }
    fn usage(&self, cg: &CgroupPath) -> cgroup::Result<Option<u64>> {
        self.v1.usage(cg)
    }
    /// The same order as the v1 controller: memsw first when it rises, last when it
    /// falls.
    fn set_limits(&self, cg: &CgroupPath, from: Limits, to: Limits) -> cgroup::Result<()> {
        match to.memsw.filter(|&sw| Some(sw) != from.memsw) {
            Some(sw) if from.memsw.is_some_and(|old| sw >= old) => {
                self.write(cg, SW, sw)?;
                self.write(cg, MEM, to.memory)
            }
            Some(sw) => {
                self.write(cg, MEM, to.memory)?;
                self.write(cg, SW, sw)
            }
            None => self.write(cg, MEM, to.memory),
        }
    }
    fn reclaim(
        &self,
        cg: &CgroupPath,
        timeout: Duration,
    ) -> cgroup::Result<Option<cgroup::Reclaimed>> {
        self.v1.reclaim(cg, timeout)
    }
    fn procs(&self, cg: &CgroupPath) -> cgroup::Result<Option<Vec<i32>>> {
        self.v1.procs(cg)
    }
    fn stat(&self, cg: &CgroupPath) -> cgroup::Result<Option<BTreeMap<String, u64>>> {
        self.v1.stat(cg)
    }
    fn register_stall(
        &self,
        cg: &CgroupPath,
        psi: Option<&cgroup::v2::PsiTrigger>,
    ) -> cgroup::Result<cgroup::StallWatch> {
        self.v1.register_stall(cg, psi)
    }
    fn oom_probe(&self, cg: &CgroupPath) -> cgroup::Result<Option<OomProbe>> {
        self.v1.oom_probe(cg)
    }
}
