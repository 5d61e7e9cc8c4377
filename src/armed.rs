//! The kill kit for the cgroups the agent shares: what a kill or signal step needs,
//! opened ahead of time for the subtree of the highest watched cgroup that holds the
//! agent itself (a sidecar sharing its pod's limit).
//!
//! At that cgroup's wall every new kernel object the agent needs is charged to the stuck
//! cgroup and refused (ENOMEM): the `struct file` of an open, a pidfd, the seq_file
//! buffer of a first read. So the listing and the victim's facts cannot be read fresh
//! there. Instead the watcher keeps, refreshed at every sweep and when usage climbs
//! towards the limit (v1 usage thresholds):
//!
//! - each cgroup's `cgroup.procs` of the subtree, open and read once (the kernel keeps
//!   the read buffer with the open file; re-reading from offset 0 needs nothing new);
//! - per task: a pidfd (opened, then its identity confirmed by start time), its facts
//!   (comm, cmdline, oom_score, start time) and `/proc/PID/stat` and
//!   `/proc/PID/oom_score_adj`, open, for the RSS and the shield as they are at the wall.
//!
//! At the wall, [`Armed::listing`] re-reads the task lists and the two per-task files
//! through those descriptors and hands the kill step a listing with a pidfd per task:
//! choosing and signalling need no open, no new pidfd and no thread. A SIGKILL queues
//! no `sigqueue` (the one signal allocation), and `process_mrelease` frees the victim's
//! memory through the same pidfd.
//!
//! What it cannot know it says: a task that appeared since the last refresh (or a task
//! list that cannot be re-read) is read live if the kernel lets it, and otherwise is a
//! gap, which makes the step refuse rather than choose among the tasks it knows (the
//! unknown one may be the one growing).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::cgroup::{CgroupPath, Controller};
use crate::sys::PidFd;
use crate::victim::{self, Gaps, Task};

/// At most this many cgroups of the shared subtree are armed (two descriptors each:
/// the task list and the directory, re-read at the wall for a child made since).
pub const MAX_CGROUPS: usize = 64;
/// At most this many tasks are armed (three descriptors each). A pod with more is
/// armed only in part, and a kill at its wall refuses (the listing has a gap).
pub const MAX_TASKS: usize = 128;

/// What the kill kit holds (see the module documentation).
#[derive(Default)]
pub struct Armed {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The subtree armed: the highest watched cgroup that holds the agent (and has a
    /// step that signals), or none.
    top: Option<CgroupPath>,
    /// Each cgroup of the subtree: its `cgroup.procs`, open and read once, and its
    /// directory, open, to tell at the wall a child cgroup made since.
    cgroups: Vec<(CgroupPath, File, File)>,
    tasks: HashMap<i32, Entry>,
    /// Changes whenever the armed tasks or the subtree change (for `status.json`).
    generation: u64,
    /// Why the last refresh could not arm everything it listed: a cgroup beyond
    /// [`MAX_CGROUPS`] or a task beyond [`MAX_TASKS`]. None when it could.
    incomplete: Option<String>,
}

struct Entry {
    /// The facts read at arming time; `rss_bytes`, `oom_score_adj` and `cgroup` are
    /// read again at the wall.
    task: Task,
    pidfd: Arc<PidFd>,
    stat: File,
    adj: File,
}

/// The kit as `oomwake status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KitStatus {
    /// The cgroup whose subtree is armed.
    pub cgroup: CgroupPath,
    /// The armed tasks' PIDs, in order.
    pub pids: Vec<i32>,
    /// How many cgroups of the subtree have their task list kept open.
    pub cgroups: usize,
    /// Why not everything is armed (more tasks or cgroups than the kit holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
}

/// A task list read at the wall through the armed descriptors.
pub struct Listing {
    /// Every task of the cgroup's subtree (never pid 1 nor the agent), shielded ones
    /// included, with the RSS and oom_score_adj read now.
    pub tasks: Vec<Task>,
    /// A pidfd per task of `tasks`, by pid, each confirmed to be that task.
    pub pidfds: HashMap<i32, Arc<PidFd>>,
    /// What could not be read or was not armed.
    pub gaps: Gaps,
}

impl Listing {
    /// The pidfd of a listed task.
    pub fn pidfd(&self, pid: i32) -> Option<&Arc<PidFd>> {
        self.pidfds.get(&pid)
    }
}

/// Reads a small file (a task list, a `/proc` file) from offset 0 through a kept
/// descriptor, into a buffer from the heap (its locked reserve at the wall).
fn read_kept(f: &File) -> std::io::Result<String> {
    let mut out = Vec::with_capacity(4096);
    let mut buf = [0u8; 4096];
    loop {
        match f.read_at(&mut buf, out.len() as u64) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(out).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn parse_pids(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// RSS in pages (field 24) of a `/proc/PID/stat` line, with its start time.
pub fn parse_stat_rss(s: &str) -> Option<(u64, u64)> {
    let close = s.rfind(')')?;
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3; starttime is field 22, rss field 24.
    let start = rest.get(19)?.parse().ok()?;
    let rss = rest.get(21)?.parse().ok()?;
    Some((rss, start))
}

fn is_gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

impl Armed {
    pub fn new() -> Armed {
        Armed::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subtree armed now, if any.
    pub fn top(&self) -> Option<CgroupPath> {
        self.lock().top.clone()
    }

    /// How many tasks and cgroups are armed, and why not all if not (for logs and
    /// tests).
    pub fn summary(&self) -> (usize, usize, Option<String>) {
        let st = self.lock();
        (st.tasks.len(), st.cgroups.len(), st.incomplete.clone())
    }

    /// What `status.json` shows; None when nothing is armed.
    pub fn status(&self) -> Option<KitStatus> {
        let st = self.lock();
        let mut pids: Vec<i32> = st.tasks.keys().copied().collect();
        pids.sort_unstable();
        Some(KitStatus {
            cgroup: st.top.clone()?,
            pids,
            cgroups: st.cgroups.len(),
            incomplete: st.incomplete.clone(),
        })
    }

    /// Changes whenever what [`Armed::status`] shows changes.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Arms `top`'s subtree (or disarms, with None): called by the watcher at every
    /// sweep and when usage climbs towards the limit. Opens what is new, drops what is
    /// gone; outside the wall every open succeeds, at the wall what was armed before
    /// stays.
    pub fn refresh(
        &self,
        ctl: &dyn Controller,
        proc_root: &Path,
        self_pid: i32,
        top: Option<&CgroupPath>,
    ) {
        let mut st = self.lock();
        if st.top.as_ref() != top {
            match top {
                Some(t) => log::info!(
                    "kill kit: {t} holds the agent and its policy signals: its tasks are kept ready for a kill at its wall"
                ),
                None if st.top.is_some() => log::info!("kill kit: disarmed"),
                None => {}
            }
            *st = State {
                top: top.cloned(),
                generation: st.generation + 1,
                ..State::default()
            };
        }
        let Some(top) = top else {
            return;
        };
        let mut incomplete = None;
        // The cgroups of the subtree: new ones opened, removed ones dropped (only when
        // the walk saw the whole subtree).
        // A walk or read that fails (at the wall, ENOMEM) keeps what was armed: the
        // listing at the wall reads the kept task lists, and a task it does not know
        // is a gap there. Only the bounds make the kit incomplete for good.
        let (walked, complete) = ctl.hierarchy().walk_checked(top);
        if complete {
            st.cgroups.retain(|(cg, _, _)| walked.contains(cg));
        } else {
            log::debug!("kill kit: {top}: the subtree could not be listed");
        }
        for cg in walked {
            if st.cgroups.iter().any(|(c, _, _)| *c == cg) {
                continue;
            }
            if st.cgroups.len() >= MAX_CGROUPS {
                incomplete = Some(format!(
                    "{top}: more than {MAX_CGROUPS} cgroups below it, only {MAX_CGROUPS} armed"
                ));
                break;
            }
            let dir = ctl.hierarchy().dir(&cg);
            let path = dir.join("cgroup.procs");
            let opened = File::open(&path).and_then(|procs| {
                use std::os::unix::fs::OpenOptionsExt;
                let d = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(&dir)?;
                Ok((procs, d))
            });
            match opened {
                Ok((procs, d)) => st.cgroups.push((cg, procs, d)),
                Err(e) if is_gone(&e) => {}
                Err(e) => log::debug!("kill kit: {}: {e}", path.display()),
            }
        }
        // The tasks now, by cgroup.
        let mut listed: HashMap<i32, CgroupPath> = HashMap::new();
        let mut all_read = true;
        st.cgroups.retain(|(cg, f, _)| match read_kept(f) {
            Ok(text) => {
                for pid in parse_pids(&text) {
                    listed.insert(pid, cg.clone());
                }
                true
            }
            // Removed (ENODEV on a kept kernfs file): dropped.
            Err(e) if is_gone(&e) || e.raw_os_error() == Some(libc::ENODEV) => false,
            Err(e) => {
                log::debug!("kill kit: {cg}/cgroup.procs: {e}");
                all_read = false;
                true
            }
        });
        // A task no list shows any more is gone (or moved out); with a list unread,
        // its tasks are kept (their kept files tell at the wall whether they live).
        let before = st.tasks.len();
        if all_read {
            st.tasks.retain(|pid, _| listed.contains_key(pid));
        }
        let mut changed = st.tasks.len() != before;
        let mut pids: Vec<(i32, CgroupPath)> = listed.into_iter().collect();
        pids.sort_by_key(|(p, _)| *p);
        for (pid, cg) in pids {
            if pid <= 1 || pid == self_pid {
                continue;
            }
            if let Some(e) = st.tasks.get_mut(&pid) {
                // The same process still (its kept stat reads, with its start time)?
                // Else the PID was reused: armed anew below.
                if e.alive() {
                    e.task.cgroup = cg;
                    continue;
                }
                st.tasks.remove(&pid);
                changed = true;
            }
            if st.tasks.len() >= MAX_TASKS {
                incomplete = Some(format!(
                    "{top}: more than {MAX_TASKS} tasks below it, only {MAX_TASKS} armed"
                ));
                continue;
            }
            match arm_task(proc_root, pid, &cg) {
                Ok(Some(entry)) => {
                    st.tasks.insert(pid, entry);
                    changed = true;
                }
                Ok(None) => {}
                // Read live at the wall, or a gap there.
                Err(e) => log::debug!("kill kit: pid {pid}: {e}"),
            }
        }
        if !complete && incomplete.is_none() {
            // Not known to be complete, not known to overflow: as before.
            incomplete = st.incomplete.clone();
        }
        if let Some(why) = &incomplete {
            if st.incomplete.as_ref() != Some(why) {
                log::warn!("kill kit for {top}: {why}");
            }
        }
        if changed || st.incomplete != incomplete {
            st.generation += 1;
        }
        st.incomplete = incomplete;
    }

    /// The tasks of `within`'s subtree as they are now, read through the armed
    /// descriptors, with a pidfd each. None when `within` is not in the armed subtree
    /// (the caller reads `/proc` as usual).
    pub fn listing(&self, proc_root: &Path, within: &CgroupPath, self_pid: i32) -> Option<Listing> {
        let st = self.lock();
        let top = st.top.as_ref()?;
        if !within.is_within(top) {
            return None;
        }
        let mut gaps = Gaps::default();
        let mut gap = |what: String, oom: bool| {
            gaps.out_of_memory |= oom;
            if gaps.first.is_none() {
                gaps.first = Some(what);
            }
        };
        if let Some(why) = &st.incomplete {
            gap(format!("the kill kit is incomplete: {why}"), false);
        }
        let mut tasks = Vec::new();
        let mut pidfds = HashMap::new();
        for (cg, f, dir) in st.cgroups.iter().filter(|(cg, _, _)| cg.is_within(within)) {
            // A child cgroup the kit has not seen (made since the last refresh) holds
            // tasks no kept list shows: a gap. Listed through the kept directory
            // (getdents from offset 0 needs no new kernel memory).
            match subdirs(dir) {
                Ok(names) => {
                    for name in names {
                        let child = cg.join(std::ffi::OsStr::from_bytes(&name));
                        if !st.cgroups.iter().any(|(c, _, _)| *c == child) {
                            gap(
                                format!("the cgroup {child} appeared since the agent last looked"),
                                false,
                            );
                        }
                    }
                }
                Err(e) if is_gone(&e) || e.raw_os_error() == Some(libc::ENODEV) => continue,
                Err(e) => gap(
                    format!("{cg}: listing its children: {e}"),
                    e.raw_os_error() == Some(libc::ENOMEM),
                ),
            }
            let text = match read_kept(f) {
                Ok(t) => t,
                Err(e) if is_gone(&e) || e.raw_os_error() == Some(libc::ENODEV) => continue,
                Err(e) => {
                    gap(
                        format!("{cg}/cgroup.procs: {e}"),
                        e.raw_os_error() == Some(libc::ENOMEM),
                    );
                    continue;
                }
            };
            for pid in parse_pids(&text) {
                if pid <= 1 || pid == self_pid {
                    continue;
                }
                // Not armed, or armed as a process that has exited since (the PID was
                // reused): a task the kit does not know.
                let armed = st.tasks.get(&pid).and_then(|e| e.now().map(|n| (e, n)));
                let Some((e, (pages, adj))) = armed else {
                    // Not armed: appeared since the last refresh. Read live if the
                    // kernel lets it (outside the wall it does).
                    victim::take_gaps();
                    let t = victim::read_task(proc_root, pid, cg);
                    let pfd = t.as_ref().and_then(|t| live_pidfd(proc_root, t));
                    let live = victim::take_gaps();
                    match (t, pfd) {
                        (Some(t), Some(pfd)) => {
                            pidfds.insert(pid, Arc::new(pfd));
                            tasks.push(t);
                        }
                        _ if live.any() => gap(
                            format!(
                                "pid {pid} in {cg} appeared since the agent last looked and cannot be read now ({})",
                                live.first.as_deref().unwrap_or("")
                            ),
                            live.out_of_memory,
                        ),
                        // Gone meanwhile.
                        _ => {}
                    }
                    continue;
                };
                let mut t = e.task.clone();
                t.rss_bytes = pages.saturating_mul(crate::loan::kernel_page_size());
                t.oom_score_adj = adj;
                t.cgroup = cg.clone();
                pidfds.insert(pid, e.pidfd.clone());
                tasks.push(t);
            }
        }
        Some(Listing {
            tasks,
            pidfds,
            gaps,
        })
    }
}

impl Entry {
    /// RSS in pages and oom_score_adj now, read through the kept files; None once the
    /// process has exited (its kept files answer ESRCH or nothing). An unreadable
    /// oom_score_adj counts as shielded.
    fn now(&self) -> Option<(u64, i64)> {
        let (pages, start) = parse_stat_rss(&read_kept(&self.stat).ok()?)?;
        if start != self.task.start_ticks {
            return None;
        }
        let adj = read_kept(&self.adj)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(victim::SHIELDED);
        Some((pages, adj))
    }

    fn alive(&self) -> bool {
        read_kept(&self.stat)
            .ok()
            .and_then(|s| parse_stat_rss(&s))
            .is_some_and(|(_, start)| start == self.task.start_ticks)
    }
}

/// The names of the subdirectories of an open directory, read with getdents64 from
/// offset 0 into a buffer on the stack (no allocation in the kernel: a kept kernfs
/// directory can be listed at the wall).
fn subdirs(dir: &File) -> std::io::Result<Vec<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    let fd = dir.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    if unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: the kernel writes at most buf.len() bytes of dirent64 records into
        // our stack buffer, and returns how many.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(out);
        }
        let n = n as usize;
        let mut off = 0;
        // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name (NUL-ended).
        while off + 19 <= n {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen == 0 || off + reclen > n {
                break;
            }
            let kind = buf[off + 18];
            let name = &buf[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if kind == libc::DT_DIR && name != b"." && name != b".." {
                out.push(name.to_vec());
            }
            off += reclen;
        }
    }
}

/// Opens a pidfd for a task read live and confirms it is that task.
fn live_pidfd(proc_root: &Path, t: &Task) -> Option<PidFd> {
    let pfd = match PidFd::open(t.pid) {
        Ok(p) => p,
        Err(e) => {
            victim::note_read_error(Path::new(&format!("pidfd_open({})", t.pid)), &e);
            return None;
        }
    };
    (victim::start_ticks(proc_root, t.pid) == Some(t.start_ticks)).then_some(pfd)
}

/// Arms one task: a pidfd, its facts, and its `stat` and `oom_score_adj` kept open.
/// `Ok(None)`: it exited meanwhile (or is a kernel thread).
fn arm_task(proc_root: &Path, pid: i32, cg: &CgroupPath) -> Result<Option<Entry>, String> {
    let pidfd = match PidFd::open(pid) {
        Ok(p) => p,
        Err(e) if is_gone(&e) => return Ok(None),
        Err(e) => return Err(format!("pidfd_open: {e}")),
    };
    let dir = proc_root.join(pid.to_string());
    let open = |name: &str| match File::open(dir.join(name)) {
        Ok(f) => Ok(Some(f)),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(format!("{}: {e}", dir.join(name).display())),
    };
    let (Some(stat), Some(adj)) = (open("stat")?, open("oom_score_adj")?) else {
        return Ok(None);
    };
    // Opened after the pidfd: the same start time in the kept file proves that the
    // pidfd, the file and the facts are of one process (not a later one with its PID).
    victim::take_gaps();
    let Some(task) = victim::read_task(proc_root, pid, cg) else {
        let g = victim::take_gaps();
        return match g.first {
            Some(why) => Err(why),
            None => Ok(None),
        };
    };
    let Ok(text) = read_kept(&stat) else {
        return Ok(None);
    };
    match parse_stat_rss(&text) {
        Some((_, start)) if start == task.start_ticks => {}
        _ => return Ok(None),
    }
    let _ = read_kept(&adj);
    Ok(Some(Entry {
        task,
        pidfd: Arc::new(pidfd),
        stat,
        adj,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_rss_and_start() {
        let s = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 77 18446744073709551615";
        assert_eq!(parse_stat_rss(s), Some((77, 98765)));
        assert_eq!(parse_stat_rss("1 (x) S"), None);
    }

    #[test]
    fn pids_of_a_task_list() {
        assert_eq!(parse_pids("1\n22\n\n333\n"), vec![1, 22, 333]);
        assert!(parse_pids("").is_empty());
    }
}
