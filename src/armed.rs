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
//!   the read buffer with the open file; re-reading from offset 0 needs nothing new).
//!   On v1 the kernel also caches the list itself for a second after every read, for
//!   every descriptor that has read it before: a refresh reads through a descriptor
//!   opened for it, and the wall reads once that second has passed ([`LIST_CACHE`]);
//! - per task: a pidfd (opened, then its identity confirmed by start time), its facts
//!   (comm, cmdline, oom_score, start time) and `/proc/PID/stat`,
//!   `/proc/PID/oom_score_adj` and `/proc/PID/cgroup`, open, for the RSS, the shield
//!   and the cgroup as they are at the wall.
//!
//! At the wall, [`Armed::listing`] re-reads the task lists and the three per-task files
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
use std::time::{Duration, Instant};

use crate::cgroup::{CgroupPath, Controller};
use crate::sys::PidFd;
use crate::victim::{self, Gaps, Task};

/// At most this many cgroups of the shared subtree are armed (two descriptors each:
/// the task list and the directory, re-read at the wall for a child made since).
pub const MAX_CGROUPS: usize = 64;
/// At most this many tasks are armed (five descriptors each: a pidfd, and its `stat`,
/// `oom_score_adj`, `cgroup` and `cmdline` in `/proc`). A pod with more is
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
    cgroups: Vec<Kept>,
    tasks: HashMap<i32, Entry>,
    /// Changes whenever the armed tasks or the subtree change (for `status.json`).
    generation: u64,
    /// Why the last refresh could not arm everything it listed: a cgroup beyond
    /// [`MAX_CGROUPS`] or a task beyond [`MAX_TASKS`]. None when it could.
    incomplete: Option<String>,
}

/// One cgroup of the armed subtree.
struct Kept {
    cg: CgroupPath,
    /// Its `cgroup.procs`, open and read (the last descriptor a refresh read it through).
    procs: File,
    /// Its directory, open.
    dir: File,
    /// When the agent last read its task list, and whether that list is a v1 one that
    /// the kernel caches (see [`LIST_CACHE`]).
    read_at: Instant,
    cached: bool,
    /// v1: its `tasks` file (every thread), open and read once at arming. The kernel
    /// caches that list apart from `cgroup.procs`, and only the wall reads it again, so
    /// there it is fresh: when its threads are exactly those of the armed tasks it
    /// shows, the cgroup holds no task the kit does not know, and the listing needs no
    /// `cgroup.procs` (whose cache would make it wait, see [`LIST_CACHE`]).
    tasks: Option<File>,
    tasks_read_at: Instant,
}

/// How long the v1 kernel keeps a cgroup's task list after a read (`cgroup_pidlist`,
/// one per cgroup, list type and PID namespace, destroyed a second (`HZ`) after the
/// last read by anyone). A descriptor that has read `cgroup.procs` before and reads it
/// again from offset 0 within that second gets the list as it was loaded, not as it
/// is: a task that joined since is missing, one that left is still there. Only a
/// descriptor read for the first time loads the list anew. So a refresh reads through
/// a descriptor opened for it, and the wall, which cannot open one, reads only once
/// this long has passed since the agent's own last read (with a margin for the
/// kernel's delayed work).
pub const LIST_CACHE: Duration = Duration::from_millis(1250);

/// True on the v1 cgroup file system, whose `cgroup.procs` lists are cached (see
/// [`LIST_CACHE`]); v2's and a test's plain files are not.
fn is_cgroup_v1_fs(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs writes one struct statfs into the zeroed value we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the descriptor is ours and open.
    let rc = unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type as i64 == crate::sys::CGROUP_SUPER_MAGIC
}

struct Entry {
    /// The facts read at arming time; `rss_bytes`, `oom_score_adj` and `cgroup` are
    /// read again at the wall.
    task: Task,
    pidfd: Arc<PidFd>,
    stat: File,
    adj: File,
    /// Its `/proc/PID/cgroup`, open and read once: where the task is at the wall.
    cgroup: File,
    /// Its `/proc/PID/cmdline`, open: the command line at the wall (it may have exec'd).
    cmdline: File,
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
    let out = read_kept_bytes(f)?;
    String::from_utf8(out).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// [`read_kept`] for a file that may hold any bytes (`/proc/PID/cgroup` names cgroups,
/// and a cgroup's name need not be UTF-8).
fn read_kept_bytes(f: &File) -> std::io::Result<Vec<u8>> {
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
    Ok(out)
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
        // Opened now: the wall cannot open it.
        let _ = own_threads();
        let mut incomplete = None;
        // The cgroups of the subtree: new ones opened, removed ones dropped (only when
        // the walk saw the whole subtree).
        // A walk or read that fails (at the wall, ENOMEM) keeps what was armed: the
        // listing at the wall reads the kept task lists, and a task it does not know
        // is a gap there. Only the bounds make the kit incomplete for good.
        let (walked, complete) = ctl.hierarchy().walk_checked(top);
        if complete {
            st.cgroups.retain(|k| walked.contains(&k.cg));
        } else {
            log::debug!("kill kit: {top}: the subtree could not be listed");
        }
        for cg in walked {
            if st.cgroups.iter().any(|k| k.cg == cg) {
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
                Ok((procs, d)) => {
                    let cached = is_cgroup_v1_fs(&procs);
                    let tasks = if cached {
                        File::open(dir.join("tasks")).ok().inspect(|f| {
                            // Allocates the read buffer now, not at the wall.
                            let _ = read_kept(f);
                        })
                    } else {
                        None
                    };
                    st.cgroups.push(Kept {
                        cg,
                        procs,
                        dir: d,
                        read_at: Instant::now(),
                        cached,
                        tasks,
                        tasks_read_at: Instant::now(),
                    })
                }
                Err(e) if is_gone(&e) => {}
                Err(e) => log::debug!("kill kit: {}: {e}", path.display()),
            }
        }
        // The tasks now, by cgroup.
        let mut listed: HashMap<i32, CgroupPath> = HashMap::new();
        let mut all_read = true;
        // Each list read through a descriptor opened now: a kept one that has read
        // before gets the kernel's cached list (see [`LIST_CACHE`]). One that cannot be
        // opened is not read through the kept one either (that would keep the cached
        // list alive): its tasks stay as armed.
        let hierarchy = ctl.hierarchy();
        st.cgroups.retain_mut(|k| {
            let path = hierarchy.dir(&k.cg).join("cgroup.procs");
            let fresh = match File::open(&path) {
                Ok(f) => f,
                Err(e) if is_gone(&e) => return false,
                Err(e) => {
                    log::debug!("kill kit: {}: {e}", path.display());
                    all_read = false;
                    return true;
                }
            };
            match read_kept(&fresh) {
                Ok(text) => {
                    for pid in parse_pids(&text) {
                        listed.insert(pid, k.cg.clone());
                    }
                    k.procs = fresh;
                    k.read_at = Instant::now();
                    true
                }
                // Removed (ENODEV on a kernfs file): dropped.
                Err(e) if crate::cgroup::io_is_gone(&e) => false,
                Err(e) => {
                    log::debug!("kill kit: {}: {e}", path.display());
                    all_read = false;
                    true
                }
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
    ///
    /// A v1 task list read again within [`LIST_CACHE`] of the agent's last read is the
    /// kernel's cached one: the listing first waits until that has passed (at most
    /// [`LIST_CACHE`], in practice only right after a refresh). Each armed task's kept
    /// `/proc/PID/cgroup` is read as well: one listed in the subtree that is no longer
    /// in it is never offered, and is a gap (the lists were not what they are now, so a
    /// task that joined may be missing).
    pub fn listing(
        &self,
        ctl: &dyn Controller,
        proc_root: &Path,
        within: &CgroupPath,
        self_pid: i32,
    ) -> Option<Listing> {
        // v1: the cgroups whose `tasks` list shows exactly the threads of armed tasks
        // (and the agent's): their processes are known without `cgroup.procs`.
        let resolved: HashMap<CgroupPath, Vec<i32>> = {
            let mut st = self.lock();
            let top = st.top.as_ref()?;
            if !within.is_within(top) {
                return None;
            }
            let State {
                cgroups,
                tasks: armed,
                ..
            } = &mut *st;
            cgroups
                .iter_mut()
                .filter(|k| k.cg.is_within(within))
                .filter_map(|k| Some((k.cg.clone(), k.threads_known(armed, self_pid)?)))
                .collect()
        };
        // Wait (without the lock: status and refresh go on) until no other list of
        // the subtree is still cached from the agent's own last read.
        for _ in 0..4 {
            let wait = {
                let st = self.lock();
                let top = st.top.as_ref()?;
                if !within.is_within(top) {
                    return None;
                }
                st.cgroups
                    .iter()
                    .filter(|k| k.cached && k.cg.is_within(within) && !resolved.contains_key(&k.cg))
                    .map(|k| LIST_CACHE.saturating_sub(k.read_at.elapsed()))
                    .max()
                    .unwrap_or_default()
            };
            if wait.is_zero() {
                break;
            }
            log::debug!(
                "kill kit: waiting {} ms for the kernel's cached task lists of {within} to expire",
                wait.as_millis()
            );
            std::thread::sleep(wait);
        }
        let mut st = self.lock();
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
        let now = Instant::now();
        let State {
            cgroups,
            tasks: armed,
            ..
        } = &mut *st;
        for k in cgroups.iter().filter(|k| k.cg.is_within(within)) {
            let cg = &k.cg;
            // A child cgroup the kit has not seen (made since the last refresh) holds
            // tasks no kept list shows: a gap. Listed through the kept directory
            // (getdents from offset 0 needs no new kernel memory).
            match subdirs(&k.dir) {
                Ok(names) => {
                    for name in names {
                        let child = cg.join(std::ffi::OsStr::from_bytes(&name));
                        if !cgroups.iter().any(|c| c.cg == child) {
                            gap(
                                format!("the cgroup {child} appeared since the agent last looked"),
                                false,
                            );
                        }
                    }
                }
                Err(e) if crate::cgroup::io_is_gone(&e) => continue,
                Err(e) => gap(
                    format!("{cg}/cgroup.procs: listing its children: {e}"),
                    e.raw_os_error() == Some(libc::ENOMEM),
                ),
            }
            let pids = if let Some(pids) = resolved.get(cg) {
                pids.clone()
            } else {
                if k.cached && now.duration_since(k.read_at) < LIST_CACHE {
                    gap(
                        format!("{cg}/cgroup.procs: the kernel's cached list may be out of date (read again too soon)"),
                        false,
                    );
                    continue;
                }
                match read_kept(&k.procs) {
                    Ok(t) => parse_pids(&t),
                    Err(e) if crate::cgroup::io_is_gone(&e) => continue,
                    Err(e) => {
                        gap(
                            format!("{cg}/cgroup.procs: {e}"),
                            e.raw_os_error() == Some(libc::ENOMEM),
                        );
                        continue;
                    }
                }
            };
            for pid in pids {
                if pid <= 1 || pid == self_pid {
                    continue;
                }
                // Not armed, or armed as a process that has exited since (the PID was
                // reused): a task the kit does not know.
                let known = armed.get(&pid).and_then(|e| e.now().map(|n| (e, n)));
                let Some((e, now_facts)) = known else {
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
                // Where the task is now, by its own kept `/proc/PID/cgroup`: never
                // offered for a kill in a cgroup it has left.
                let now_in = match e.cgroup_now(ctl) {
                    Ok(c) => c,
                    Err(why) => {
                        gap(format!("pid {pid} in {cg}: {why}"), false);
                        continue;
                    }
                };
                if !now_in.is_within(within) {
                    gap(
                        format!("pid {pid} is listed in {cg} but is in {now_in} now (the task lists are out of date)"),
                        false,
                    );
                    continue;
                }
                let mut t = e.task.clone();
                t.rss_bytes = now_facts
                    .pages
                    .saturating_mul(crate::loan::kernel_page_size());
                t.oom_score_adj = now_facts.adj;
                t.comm = now_facts.comm;
                t.cmdline = now_facts.cmdline;
                t.cgroup = now_in;
                pidfds.insert(pid, e.pidfd.clone());
                tasks.push(t);
            }
        }
        for k in cgroups
            .iter_mut()
            .filter(|k| k.cg.is_within(within) && !resolved.contains_key(&k.cg))
        {
            k.read_at = Instant::now();
        }
        Some(Listing {
            tasks,
            pidfds,
            gaps,
        })
    }
}

impl Kept {
    /// v1, at the wall: the armed processes of this cgroup, when its `tasks` list (read
    /// through the kept descriptor, fresh unless the agent read it within
    /// [`LIST_CACHE`]) holds exactly their threads and the agent's. None when it cannot
    /// tell: no `tasks` kept, read too recently, a read failed, or a thread it does not
    /// account for (a task that joined since, or a thread moved on its own): the
    /// caller then reads `cgroup.procs`.
    fn threads_known(&mut self, armed: &HashMap<i32, Entry>, self_pid: i32) -> Option<Vec<i32>> {
        let f = self.tasks.as_ref()?;
        if self.tasks_read_at.elapsed() < LIST_CACHE {
            return None;
        }
        let text = read_kept(f);
        self.tasks_read_at = Instant::now();
        let tids = parse_pids(&text.ok()?);
        let mut known = Vec::new();
        let mut threads = 0u64;
        for &tid in &tids {
            if tid == self_pid {
                threads += own_threads()?;
            } else if let Some(e) = armed.get(&tid) {
                threads += e.threads()?;
                known.push(tid);
            }
        }
        (threads == tids.len() as u64).then_some(known)
    }
}

/// The agent's own thread count (`Threads` is fixed once its pool started; read from
/// `/proc/self/stat` through a descriptor opened once).
fn own_threads() -> Option<u64> {
    static SELF_STAT: std::sync::OnceLock<Option<File>> = std::sync::OnceLock::new();
    let f = SELF_STAT
        .get_or_init(|| {
            let f = File::open("/proc/self/stat").ok()?;
            let _ = read_kept(&f);
            Some(f)
        })
        .as_ref()?;
    parse_stat_threads(&read_kept(f).ok()?)
}

/// `num_threads` (field 20) of a `/proc/PID/stat` line.
pub fn parse_stat_threads(s: &str) -> Option<u64> {
    let close = s.rfind(')')?;
    s.get(close + 1..)?.split_whitespace().nth(17)?.parse().ok()
}

/// An armed task's facts as they are at the wall.
struct Now {
    pages: u64,
    adj: i64,
    comm: String,
    cmdline: Option<String>,
}

impl Entry {
    /// Its thread count now, through the kept `stat`; None once it has exited.
    fn threads(&self) -> Option<u64> {
        let text = read_kept(&self.stat).ok()?;
        let (_, start) = parse_stat_rss(&text)?;
        (start == self.task.start_ticks).then_some(())?;
        parse_stat_threads(&text)
    }

    /// RSS in pages and oom_score_adj now, read through the kept files; None once the
    /// process has exited (its kept files answer ESRCH or nothing). An unreadable
    /// oom_score_adj counts as shielded.
    fn now(&self) -> Option<Now> {
        let stat = read_kept(&self.stat).ok()?;
        let (pages, start) = parse_stat_rss(&stat)?;
        if start != self.task.start_ticks {
            return None;
        }
        let (comm, _) = victim::parse_stat(&stat)?;
        let adj = read_kept(&self.adj)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(victim::SHIELDED);
        // The program may have changed since arming (a task armed while `runc init`
        // or a shell was about to exec): the name and command line the policy's
        // prefer/avoid rules match are the ones it has now. Unreadable: None, which
        // ranks as avoided.
        let cmdline = read_kept_bytes(&self.cmdline)
            .ok()
            .map(|b| victim::cmdline_text(&b));
        Some(Now {
            pages,
            adj,
            comm,
            cmdline,
        })
    }

    /// The memory cgroup the task is in now, read through its kept `/proc/PID/cgroup`.
    fn cgroup_now(&self, ctl: &dyn Controller) -> Result<CgroupPath, String> {
        let text = read_kept_bytes(&self.cgroup).map_err(|e| format!("/proc/PID/cgroup: {e}"))?;
        crate::cgroup::parse::proc_memory_cgroup_bytes(&text)
            .and_then(|p| ctl.hierarchy().from_proc_path(p))
            .ok_or_else(|| "its memory cgroup cannot be told from /proc/PID/cgroup".to_string())
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
    let (Some(stat), Some(adj), Some(cgroup), Some(cmdline)) = (
        open("stat")?,
        open("oom_score_adj")?,
        open("cgroup")?,
        open("cmdline")?,
    ) else {
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
    // Read once now, so that the read at the wall finds its buffer there.
    let _ = read_kept(&adj);
    let _ = read_kept_bytes(&cgroup);
    let _ = read_kept_bytes(&cmdline);
    Ok(Some(Entry {
        task,
        pidfd: Arc::new(pidfd),
        stat,
        adj,
        cgroup,
        cmdline,
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
