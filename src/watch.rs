//! The one event loop: OOM eventfds of every watched cgroup, inotify on every directory
//! of the hierarchy (cgroups come and go), signals (SIGHUP reload, SIGTERM/SIGINT stop)
//! and timers (the safety sweep, the rescan) in a single epoll. No thread per cgroup.
//!
//! The loop only notices and dispatches; episodes run on workers.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::audit::Record;
use crate::cgroup::{CgroupPath, OomControl, OomProbe, StallSource, StallWatch};
use crate::config::Config;
use crate::dispatcher::{Cause, Trigger};
use crate::policy::{Policy, PolicySet};
use crate::shared::{Shared, Status, WatchedStatus};

const TOKEN_INOTIFY: u64 = 1;
const TOKEN_HUP: u64 = 2;
const TOKEN_TERM: u64 = 3;
/// The agent moved a limit: re-register the early thresholds that follow it.
const TOKEN_MOVES: u64 = 4;
/// Container metadata changed (the Docker thread's eventfd).
const TOKEN_CONTAINERS: u64 = 5;
const FIRST_CGROUP_TOKEN: u64 = 16;

/// When a cgroup that appeared while the agent runs is read again, counted from its
/// discovery, while the kernel's OOM killer is still on for it. runc makes a container's
/// cgroup first and writes its limit and `oom_kill_disable` after (17 ms later, measured
/// on Docker 20.10), so the read at discovery finds the killer on and no policy for it;
/// without these re-reads the next sweep (1 s by default) would be the first to see it
/// set, and a container that stalls at once would wait for it.
const FRESH_RECHECKS: [Duration; 4] = [
    Duration::from_millis(10),
    Duration::from_millis(40),
    Duration::from_millis(150),
    Duration::from_millis(500),
];

/// A cgroup discovered while the agent runs, with its OOM killer still on: read again
/// at `since + FRESH_RECHECKS[step]`.
struct Fresh {
    since: Instant,
    step: usize,
    cg: CgroupPath,
}

impl Fresh {
    fn due(&self) -> Instant {
        self.since + FRESH_RECHECKS[self.step]
    }
}

/// A cgroup some policy could match: the agent keeps its oom_control open for the
/// sweep, remembers the oom_kill_disable it last chose a policy for, and, once a policy
/// applies, watches it.
#[derive(Default)]
struct Candidate {
    probe: Option<OomProbe>,
    /// None: choose the policy again on the next read.
    kill_disabled: Option<bool>,
    watched: Option<Watched>,
    /// The kernel's OOM kill counter at the last read (a rise is audited).
    oom_kills: Option<u64>,
    /// `memory.failcnt` at the last sweep, for the pinned-stall rule (see
    /// [`crate::pinned`]); None after an OOM, so that its failures are not counted.
    failcnt: Option<u64>,
    /// Seen at its wall with little cache by an earlier sweep: what the pinned-stall
    /// rule compares the next looks with.
    suspect: Option<crate::pinned::Suspect>,
    /// The sweep that last saw `memory.failcnt` rise: a pinned stall held here goes on
    /// only while its charges still fail (a cgroup that sits at its wall without a failed
    /// charge, an idle holder or page cache, is not stuck).
    failcnt_rose: Option<Instant>,
}

struct Watched {
    /// Polled fds; fd `i` has token `token + i`. None when registration failed: the
    /// sweep covers the cgroup meanwhile.
    stall: Option<StallWatch>,
    token: u64,
    policy: Arc<Policy>,
    /// When to retry a failed registration.
    retry: Retry,
    /// `[early]`: the usage threshold registered for the current limit.
    early: Option<Threshold>,
    /// The policy's v2 hold waits for the container's metadata
    /// ([`crate::identity::hold_waits_for_metadata`]).
    hold_deferred: bool,
}

/// A usage threshold eventfd and what it was registered for.
struct Threshold {
    /// None when none could be registered (or none applies at this limit).
    fd: Option<crate::cgroup::StallFd>,
    token: u64,
    /// The usage it fires at (None: the limit leaves no room before the wall).
    bytes: Option<u64>,
    /// The limit it was computed from: when the limit moves, the threshold follows.
    limit: u64,
    /// Registration failed: the sweep retries it.
    failed: bool,
    /// When an upward crossing of this registration last started an early episode.
    fired: Option<Instant>,
}

/// The backing-off schedule of registration retries: 1 s, 2 s ... up to a minute.
struct Retry {
    at: Instant,
    wait: Duration,
}

impl Retry {
    fn new() -> Retry {
        Retry {
            at: Instant::now() + Duration::from_secs(1),
            wait: Duration::from_secs(1),
        }
    }

    fn failed(&mut self, now: Instant) {
        self.wait = (self.wait * 2).min(Duration::from_secs(60));
        self.at = now + self.wait;
    }
}

enum Registration {
    Gone,
    Failed(String),
}

/// Test-only fault injection: `OOMWAKE_FAULT_EPOLL_ADD=N` makes the first N additions
/// of an OOM eventfd to the epoll fail (ENOMEM), so that tests can check that such a
/// cgroup stays covered. Never set it in production.
fn fault_epoll_add() -> bool {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static LEFT: OnceLock<AtomicU32> = OnceLock::new();
    let left = LEFT.get_or_init(|| {
        let n = std::env::var("OOMWAKE_FAULT_EPOLL_ADD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if n > 0 {
            log::warn!("TEST-ONLY fault injection: the first {n} epoll additions fail");
        }
        AtomicU32::new(n)
    });
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

pub struct Watcher {
    shared: Arc<Shared>,
    epoll: Epoll,
    inotify: Inotify,
    hup: std::fs::File,
    term: std::fs::File,
    dirs: HashMap<WatchDescriptor, CgroupPath>,
    dir_wds: HashMap<CgroupPath, WatchDescriptor>,
    candidates: BTreeMap<CgroupPath, Candidate>,
    tokens: HashMap<u64, CgroupPath>,
    /// Container cgroups by container id, so that metadata arriving after the cgroup
    /// leads back to it.
    by_container: HashMap<String, CgroupPath>,
    next_token: u64,
    events: bool,
    sweep_every: Duration,
    rescan_every: Duration,
    reload: crate::config::Reload,
    state_dir: std::path::PathBuf,
    cgroup_root: std::path::PathBuf,
    dry_run: bool,
    /// A SIGHUP whose reload failed while the agent's own cgroup was at its wall, where
    /// opening a file fails (ENOMEM): retried at every sweep until it reads, so the
    /// operator's reload is not lost (issue 6.11).
    reload_deferred: bool,
    status_dirty: bool,
    status_sig: (u64, usize, u64, u64, u64),
    holder: crate::holder::Holder,
    /// Cgroups discovered while running with the OOM killer still on.
    fresh: Vec<Fresh>,
    /// v1 usage thresholds on the kill kit's cgroup ([`crate::armed`]): each crossing
    /// refreshes the kit while there is still room to open files. With the cgroup and
    /// the limit they were registered for.
    kit_fds: Vec<(u64, crate::cgroup::StallFd)>,
    kit_for: Option<(CgroupPath, u64)>,
    /// The agent is PID 1 of its PID namespace (a container without `--init`) or a
    /// child subreaper: what its hooks leave behind becomes its children, reaped at
    /// every sweep ([`crate::sys::spawn::reap_orphans`]).
    reap_orphans: bool,
}

/// Where usage thresholds refresh the kill kit, in quarters of the limit (and 9/10).
const KIT_THRESHOLDS: [(u64, u64); 4] = [(1, 4), (1, 2), (3, 4), (9, 10)];

fn io_err(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

impl Watcher {
    pub fn new(
        shared: Arc<Shared>,
        cfg: &Config,
        reload: crate::config::Reload,
    ) -> std::io::Result<Watcher> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io_err)?;
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(io_err)?;
        epoll
            .add(
                inotify.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_INOTIFY),
            )
            .map_err(io_err)?;
        // Eventfds, not socket pairs: waking through them needs no kernel memory, which
        // the agent's cgroup may not have (it can share a stuck one).
        let hup = crate::sys::signal_eventfd(&[libc::SIGHUP])?;
        let term = crate::sys::signal_eventfd(&[libc::SIGTERM, libc::SIGINT])?;
        epoll
            .add(&hup, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_HUP))
            .map_err(io_err)?;
        epoll
            .add(&term, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_TERM))
            .map_err(io_err)?;
        epoll
            .add(
                shared.moves.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_MOVES),
            )
            .map_err(io_err)?;
        let holder = crate::holder::Holder::start(shared.clone())?;
        if let Some(fd) = shared.containers.wake_fd() {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONTAINERS))
                .map_err(io_err)?;
        }
        let mut w = Watcher {
            shared,
            epoll,
            inotify,
            hup,
            term,
            dirs: HashMap::new(),
            dir_wds: HashMap::new(),
            candidates: BTreeMap::new(),
            tokens: HashMap::new(),
            by_container: HashMap::new(),
            next_token: FIRST_CGROUP_TOKEN,
            events: cfg.events,
            sweep_every: cfg.sweep_interval,
            rescan_every: cfg.rescan_interval,
            reload,
            state_dir: cfg.state_dir.clone(),
            cgroup_root: cfg.cgroup_root.clone(),
            dry_run: cfg.dry_run,
            reload_deferred: false,
            status_dirty: true,
            status_sig: (0, 0, 0, 0, 0),
            holder,
            fresh: Vec::new(),
            kit_fds: Vec::new(),
            kit_for: None,
            reap_orphans: crate::sys::gets_orphans(),
        };
        if w.reap_orphans {
            log::info!(
                "the agent is PID {} and gets orphaned processes (PID 1 of its namespace, or a subreaper): it reaps them at every sweep",
                crate::sys::getpid()
            );
        }
        w.discover(&CgroupPath::root());
        // What exists at start is not being set up: the sweep covers its changes.
        w.fresh.clear();
        w.refresh_kit();
        // Holds journaled by an earlier run on cgroups no longer watched go back now.
        for cg in w.shared.holds.cgroups() {
            if w.watched(&cg).is_none() {
                w.release_hold(&cg, "startup");
            }
        }
        w.write_status(true);
        Ok(w)
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut next_sweep = Instant::now() + self.sweep_every;
        let mut next_rescan = Instant::now() + self.rescan_every;
        let mut notify = crate::notify::Notifier::from_env();
        notify.ready();
        loop {
            let now = Instant::now();
            let wake = next_sweep.min(next_rescan);
            let wake = notify.next_due().map_or(wake, |t| wake.min(t));
            let wake = self.fresh.iter().map(Fresh::due).fold(wake, Instant::min);
            let wait = wake.saturating_duration_since(now);
            let timeout = EpollTimeout::try_from(wait).unwrap_or(EpollTimeout::NONE);
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(anyhow::anyhow!("epoll_wait: {e}")),
            };
            let detected = Instant::now();
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_INOTIFY => self.on_inotify(),
                    TOKEN_HUP => {
                        drain(&mut self.hup);
                        self.on_reload();
                        // A shorter interval from the new config applies now.
                        next_sweep = next_sweep.min(Instant::now() + self.sweep_every);
                        next_rescan = next_rescan.min(Instant::now() + self.rescan_every);
                    }
                    TOKEN_TERM => {
                        drain(&mut self.term);
                        log::info!("stopping");
                        return Ok(());
                    }
                    TOKEN_MOVES => {
                        for cg in self.shared.moves.take() {
                            self.arm_early(&cg, detected);
                        }
                    }
                    TOKEN_CONTAINERS => self.on_containers(),
                    token => self.on_eventfd(token, detected),
                }
            }
            let now = Instant::now();
            self.recheck_fresh(now);
            if now >= next_rescan {
                self.rescan();
                next_rescan = now + self.rescan_every;
            }
            if now >= next_sweep {
                self.sweep_due();
                if self.reap_orphans {
                    let reaped = crate::sys::spawn::reap_orphans();
                    if !reaped.is_empty() {
                        log::debug!("reaped orphaned processes {reaped:?}");
                    }
                }
                next_sweep = now + self.sweep_every;
            }
            // Pinged only while the workers and the loan keeper are alive too.
            notify.watchdog_if(now, || self.shared.dispatcher.liveness.check(now));
        }
    }

    fn on_eventfd(&mut self, token: u64, detected: Instant) {
        if let Some((_, fd)) = self.kit_fds.iter().find(|(t, _)| *t == token) {
            fd.clear();
            self.refresh_kit();
            return;
        }
        let Some(cg) = self.tokens.get(&token).cloned() else {
            return;
        };
        let threshold = self
            .watched(&cg)
            .and_then(|w| w.early.as_ref())
            .filter(|t| t.token == token);
        if let Some(t) = threshold {
            if let Some(fd) = &t.fd {
                fd.clear();
            }
            let bytes = t.bytes;
            self.on_threshold(&cg, bytes, detected);
            return;
        }
        let mut source = None;
        if let Some(w) = self.watched(&cg) {
            let fd = token
                .checked_sub(w.token)
                .and_then(|i| w.stall.as_ref()?.fds.get(usize::try_from(i).ok()?));
            if let Some(fd) = fd {
                fd.clear();
                source = Some(fd.source());
            }
        }
        // The kernel also signals the eventfd when the cgroup is removed: the probe then
        // reads "gone" and forgets it.
        let st = self.probe(&cg);
        let stuck = st.is_some_and(|st| st.under_oom);
        let pressure = source == Some(StallSource::Pressure);
        // A PSI trigger is a stall by itself (pressure before any limit is reached).
        if pressure {
            log::info!("{cg}: memory pressure trigger fired");
        }
        if stuck || (pressure && self.watched(&cg).is_some()) {
            let trigger = match source {
                Some(StallSource::Pressure) => Trigger::Pressure,
                Some(StallSource::Events) => Trigger::Events,
                Some(StallSource::OomEventFd) => Trigger::OomEvent,
                // Thresholds start early episodes (above), never this path.
                Some(StallSource::Threshold) | None => Trigger::Recheck,
            };
            let rises = st.and_then(|s| s.rises);
            self.trigger(
                &cg,
                detected,
                Cause {
                    trigger,
                    rises,
                    own_wall: false,
                },
            );
        }
    }

    /// A usage threshold fired: crossed in either direction, so read usage (one pread
    /// of the kept-open file) and start an early episode only on the way up.
    fn on_threshold(&mut self, cg: &CgroupPath, bytes: Option<u64>, detected: Instant) {
        let Some(bytes) = bytes else { return };
        let usage = match self.shared.env.ctl.usage(cg) {
            Ok(Some(u)) => u,
            // Also signalled when the cgroup is removed: inotify forgets it.
            Ok(None) => return,
            Err(e) => {
                log::warn!("{cg}: {e}");
                return;
            }
        };
        if !crate::early::is_upward(usage, bytes) {
            log::debug!("{cg}: usage {usage} fell below the early threshold {bytes}");
            return;
        }
        let Some(t) = self
            .candidates
            .get_mut(cg)
            .and_then(|c| c.watched.as_mut())
            .and_then(|w| w.early.as_mut())
        else {
            return;
        };
        if !crate::early::may_repeat(t.fired, detected) {
            log::debug!("{cg}: usage crossed the early threshold again within a second");
            return;
        }
        t.fired = Some(detected);
        self.start_early(cg, detected);
    }

    fn start_early(&mut self, cg: &CgroupPath, detected: Instant) {
        let Some(policy) = self.watched(cg).map(|w| w.policy.clone()) else {
            return;
        };
        if policy.early.is_none() {
            return;
        }
        if let Some(id) = self.shared.dispatcher.trigger_early(cg, policy, detected) {
            log::debug!("{cg}: early episode {id} started");
        }
    }

    /// (Re-)registers the early threshold of a watched cgroup for its limit now: at
    /// watch, when the agent moved the limit, when the sweep finds it moved, at reload.
    /// The old eventfd is closed first (the only way to unregister a threshold). When
    /// usage is already past the new threshold (none of the kernel's crossings will
    /// come) and the wall did not move down, the early episode starts now: a restore
    /// moved it down because the workload fits, and lending again at once would flap.
    fn arm_early(&mut self, cg: &CgroupPath, detected: Instant) {
        let Some(w) = self.candidates.get_mut(cg).and_then(|c| c.watched.as_mut()) else {
            return;
        };
        let old = w.early.take();
        if let Some(t) = &old {
            if let Some(fd) = &t.fd {
                let _ = self.epoll.delete(fd.as_fd());
            }
            self.tokens.remove(&t.token);
        }
        let Some(early) = w.policy.early.clone() else {
            return;
        };
        if !self.events {
            return;
        }
        let ctl = self.shared.env.ctl.as_ref();
        let limit = match ctl.limits(cg) {
            Ok(Some(l)) => l.memory,
            Ok(None) => return,
            Err(e) => {
                log::warn!("{cg}: early threshold: {e}");
                return;
            }
        };
        let bytes = early.threshold(limit);
        let token = self.next_token;
        self.next_token += 1;
        let mut failed = false;
        let fd = match bytes.map(|b| ctl.register_threshold(cg, b)) {
            None => None,
            Some(Ok(fd)) => fd,
            Some(Err(e)) => {
                log::error!("{cg}: cannot register the early usage threshold: {e}");
                failed = true;
                None
            }
        };
        let fd = fd.filter(|fd| {
            match self
                .epoll
                .add(fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
            {
                Ok(()) => true,
                Err(e) => {
                    log::error!("{cg}: early threshold: epoll add: {e}");
                    failed = true;
                    false
                }
            }
        });
        if fd.is_some() {
            self.tokens.insert(token, cg.clone());
        }
        log::debug!("{cg}: early threshold {bytes:?} for limit {limit}");
        let moved_down = old.as_ref().is_some_and(|t| limit < t.limit);
        let registered = fd.is_some();
        if let Some(w) = self.candidates.get_mut(cg).and_then(|c| c.watched.as_mut()) {
            w.early = Some(Threshold {
                fd,
                token,
                bytes,
                limit,
                failed,
                fired: None,
            });
        }
        if let (true, false, Some(b)) = (registered, moved_down, bytes) {
            if matches!(ctl.usage(cg), Ok(Some(u)) if crate::early::is_upward(u, b)) {
                self.start_early(cg, detected);
            }
        }
    }

    /// The stall belongs to the highest cgroup still under OOM: the kernel marks the
    /// whole subtree of the cgroup whose limit was hit.
    fn trigger(&mut self, cg: &CgroupPath, detected: Instant, cause: Cause) {
        let ctl = self.shared.env.ctl.as_ref();
        let mut top = cg.clone();
        let mut top_state = None;
        // Whether the walk ended at a parent read as out of OOM (or at the root).
        let mut clear_above = true;
        while let Some(parent) = top.parent() {
            match ctl.oom_state(&parent) {
                Ok(Some(st)) if st.under_oom => {
                    top = parent;
                    top_state = Some(st);
                }
                Ok(_) => break,
                Err(_) => {
                    clear_above = false;
                    break;
                }
            }
        }
        // Where the wall is: the highest cgroup under OOM, at its own limit. Such a
        // stall is its own even right after an episode above it resolved.
        let cause = Cause {
            own_wall: clear_above && at_own_limit(ctl, &top),
            ..cause
        };
        let Some(own) = self.watched(cg).map(|w| w.policy.clone()) else {
            return;
        };
        let policy = if &top == cg {
            own
        } else {
            let kill_disabled = top_state.is_some_and(|s| s.oom_kill_disable);
            let info = self.shared.container_info(&top);
            match self.shared.policies().select(
                &top,
                kill_disabled,
                info.as_deref().map(|m| &m.info),
            ) {
                Some(p) => p.clone(),
                None => {
                    log::debug!(
                        "{top}: OOM reached {cg}; no policy of its own, using {}",
                        own.name
                    );
                    own
                }
            }
        };
        if let Some(id) = self
            .shared
            .dispatcher
            .trigger_by(&top, policy, detected, cause)
        {
            log::debug!("{top}: episode {id} started (event on {cg})");
        }
    }

    fn on_inotify(&mut self) {
        loop {
            let evs = match self.inotify.read_events() {
                Ok(e) => e,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => {
                    log::warn!("inotify read: {e}");
                    return;
                }
            };
            if evs.is_empty() {
                return;
            }
            for ev in evs {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    log::warn!("inotify queue overflow: rescanning the hierarchy");
                    self.rescan();
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    if let Some(cg) = self.dirs.remove(&ev.wd) {
                        self.dir_wds.remove(&cg);
                    }
                    continue;
                }
                if !ev.mask.contains(AddWatchFlags::IN_ISDIR) {
                    continue;
                }
                let (Some(parent), Some(name)) = (self.dirs.get(&ev.wd).cloned(), ev.name) else {
                    continue;
                };
                // Names are bytes: a cgroup whose name is not UTF-8 is watched too.
                let cg = parent.join(name);
                if ev.mask.contains(AddWatchFlags::IN_CREATE) {
                    self.discover(&cg);
                } else if ev.mask.contains(AddWatchFlags::IN_DELETE) {
                    self.forget_subtree(&cg, "removed");
                }
            }
        }
    }

    /// Adds `from` and everything below it: inotify watches, candidates, OOM watches.
    fn discover(&mut self, from: &CgroupPath) {
        let policies = self.shared.policies();
        for cg in self.shared.env.ctl.hierarchy().walk(from) {
            if !self.dir_wds.contains_key(&cg) {
                let dir = self.shared.env.ctl.hierarchy().dir(&cg);
                let flags =
                    AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_ONLYDIR;
                match self.inotify.add_watch(&dir, flags) {
                    Ok(wd) => {
                        self.dirs.insert(wd, cg.clone());
                        self.dir_wds.insert(cg.clone(), wd);
                    }
                    Err(e) => log::debug!("inotify on {}: {e}", dir.display()),
                }
            }
            let info = self.note_container(&cg);
            if policies.could_match(&cg, info.as_deref().map(|m| &m.info))
                && !self.candidates.contains_key(&cg)
            {
                self.candidates.insert(cg.clone(), Candidate::default());
                self.evaluate(&cg, &policies, "new cgroup");
                let killer_on = self
                    .candidates
                    .get(&cg)
                    .is_some_and(|c| c.watched.is_none() && c.kill_disabled == Some(false));
                if killer_on {
                    self.fresh.push(Fresh {
                        since: Instant::now(),
                        step: 0,
                        cg: cg.clone(),
                    });
                }
            }
        }
    }

    /// Reads again the fresh cgroups that are due (see [`FRESH_RECHECKS`]): one whose
    /// `oom_kill_disable` was set meanwhile gets its policy now.
    fn recheck_fresh(&mut self, now: Instant) {
        if !self.fresh.iter().any(|f| f.due() <= now) {
            return;
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fresh)
            .into_iter()
            .partition(|f| f.due() <= now);
        self.fresh = later;
        let policies = self.shared.policies();
        for Fresh { since, step, cg } in due {
            let Some(st) = self.probe(&cg) else {
                continue;
            };
            let known = self.candidates.get(&cg).and_then(|c| c.kill_disabled);
            if known != Some(st.oom_kill_disable) {
                self.apply(&cg, st, &policies, "oom_kill_disable changed");
                self.status_dirty = true;
            }
            let step = step + 1;
            if !st.oom_kill_disable && self.watched(&cg).is_none() && step < FRESH_RECHECKS.len() {
                self.fresh.push(Fresh { since, step, cg });
            }
        }
    }

    /// Remembers a container cgroup by its id and returns what is known of it; asks
    /// the engine in the background when nothing is (the answer wakes the loop).
    fn note_container(&mut self, cg: &CgroupPath) -> Option<Arc<crate::container::Meta>> {
        let ident = crate::container::identify(cg.as_bytes())?;
        if !ident.is_container() {
            return None;
        }
        let docker_may_know = ident.docker_may_know();
        let id = ident.container_id?;
        let info = self.shared.containers.get(&id);
        // containerd's and CRI-O's containers: Docker would answer 404 to each.
        if info.is_none() && docker_may_know {
            self.shared.containers.request(&id);
        }
        self.by_container.insert(id, cg.clone());
        info
    }

    /// Metadata of some containers changed (arrived, renamed, gone): their cgroups
    /// become candidates, are watched under another policy, or no longer.
    fn on_containers(&mut self) {
        let policies = self.shared.policies();
        for id in self.shared.containers.take_changed() {
            let Some(cg) = self.by_container.get(&id).cloned() else {
                continue;
            };
            log::debug!("{cg}: container metadata changed; choosing its policy again");
            self.reconsider(&cg, &policies, "container changed");
            // A stall held while the metadata was unknown is retried now, under the
            // policy it names (see crate::identity).
            self.shared.dispatcher.kick(&cg);
            self.status_dirty = true;
        }
    }

    /// Decides again whether `cg` is a candidate and under which policy.
    fn reconsider(&mut self, cg: &CgroupPath, policies: &PolicySet, reason: &str) {
        let info = self.shared.container_info(cg);
        let could = policies.could_match(cg, info.as_deref().map(|m| &m.info));
        match (self.candidates.contains_key(cg), could) {
            (true, false) => {
                self.unwatch(cg, reason);
                self.candidates.remove(cg);
            }
            (false, true) => {
                self.candidates.insert(cg.clone(), Candidate::default());
                self.evaluate(cg, policies, reason);
            }
            (true, true) => {
                self.evaluate(cg, policies, reason);
            }
            (false, false) => {}
        }
    }

    fn watched(&self, cg: &CgroupPath) -> Option<&Watched> {
        self.candidates.get(cg).and_then(|c| c.watched.as_ref())
    }

    /// Decides whether a candidate is watched, and under which policy; `reason` is why
    /// it is asked again (the unwatch line's reason when the policy changes).
    fn evaluate(&mut self, cg: &CgroupPath, policies: &PolicySet, reason: &str) {
        if let Some(st) = self.probe(cg) {
            self.apply(cg, st, policies, reason);
        }
    }

    /// Watches, unwatches or re-assigns `cg` given its OOM state; `reason`: see
    /// [`Watcher::evaluate`].
    fn apply(&mut self, cg: &CgroupPath, st: OomControl, policies: &PolicySet, reason: &str) {
        let Some(c) = self.candidates.get_mut(cg) else {
            return;
        };
        c.kill_disabled = Some(st.oom_kill_disable);
        let current = c.watched.as_ref().map(|w| w.policy.clone());
        let info = self.shared.container_info(cg);
        let want = policies
            .select(cg, st.oom_kill_disable, info.as_deref().map(|m| &m.info))
            .cloned();
        match (current, want) {
            (None, Some(p)) => self.watch(cg, p),
            (Some(_), None) => {
                let why = if st.oom_kill_disable {
                    "no policy matches"
                } else {
                    "oom_kill_disable cleared"
                };
                self.unwatch(cg, why);
            }
            (Some(old), Some(new)) if old.name != new.name => {
                self.unwatch(cg, reason);
                self.watch(cg, new);
            }
            (Some(old), Some(new)) => {
                let deferred = self.watched(cg).is_some_and(|w| w.hold_deferred);
                let defer = new.v2.hold_at.is_some() && self.hold_waits(cg, &new);
                let hold_changed =
                    old.v2.hold_at != new.v2.hold_at || old.mode != new.mode || deferred != defer;
                let early_changed =
                    !Arc::ptr_eq(&old, &new) && (old.early.is_some() || new.early.is_some());
                if let Some(w) = self.candidates.get_mut(cg).and_then(|c| c.watched.as_mut()) {
                    w.policy = new.clone();
                }
                if early_changed {
                    self.arm_early(cg, Instant::now());
                }
                if hold_changed {
                    if let Some(w) = self.candidates.get_mut(cg).and_then(|c| c.watched.as_mut()) {
                        w.hold_deferred = false;
                    }
                    if new.v2.hold_at.is_none() {
                        self.release_hold(cg, reason);
                    } else if defer {
                        self.release_hold(cg, reason);
                        self.defer_hold(cg, &new);
                    } else {
                        self.apply_hold(cg, &new);
                    }
                }
            }
            (None, None) => {}
        }
    }

    fn watch(&mut self, cg: &CgroupPath, policy: Arc<Policy>) {
        let registered = if self.events {
            match self.register(cg, &policy) {
                Ok(r) => Some(r),
                Err(Registration::Gone) => return,
                Err(Registration::Failed(e)) => {
                    log::error!(
                        "{cg}: cannot register for OOM events: {e}; the sweep covers it and registration is retried"
                    );
                    None
                }
            }
        } else {
            None
        };
        let (stall, token) = match registered {
            Some((stall, base)) => (Some(stall), base),
            None => {
                self.next_token += 1;
                (None, self.next_token - 1)
            }
        };
        // Keep open what an episode here needs: no kernel allocation on the OOM path.
        self.shared.env.ctl.prepare(cg);
        if policy.pinned {
            if let Ok(Some(l)) = self.shared.env.ctl.limits(cg) {
                if memsw_walls_first(l) {
                    log::warn!(
                        "{cg}: its memsw limit ({}) is its memory limit ({}): charges fail at memsw first, where the kernel counts no failcnt, so a stall pinned at this wall cannot be seen (only real OOMs are)",
                        l.memsw.unwrap_or_default(),
                        l.memory
                    );
                }
            }
        }
        self.tokens.insert(token, cg.clone());
        self.shared
            .audit
            .log(Record::new("watch", cg).with("policy", policy.name.clone()));
        self.candidates.entry(cg.clone()).or_default().watched = Some(Watched {
            stall,
            token,
            policy,
            retry: Retry::new(),
            early: None,
            hold_deferred: false,
        });
        self.arm_early(cg, Instant::now());
        self.status_dirty = true;
        self.update_watched_metric();
        if let Some(p) = self.watched(cg).map(|w| w.policy.clone()) {
            if p.v2.hold_at.is_some() && self.hold_waits(cg, &p) {
                self.defer_hold(cg, &p);
            } else {
                self.apply_hold(cg, &p);
            }
        }
    }

    /// Whether the hold of `policy` on `cg` waits for the container's metadata.
    fn hold_waits(&self, cg: &CgroupPath, policy: &Policy) -> bool {
        let kill_disabled = self
            .candidates
            .get(cg)
            .and_then(|c| c.kill_disabled)
            .unwrap_or(true);
        crate::identity::hold_waits_for_metadata(&self.shared, cg, policy, kill_disabled)
    }

    fn defer_hold(&mut self, cg: &CgroupPath, policy: &Policy) {
        log::info!(
            "{cg}: the hold of policy {} waits for the container's metadata (a policy keyed on it may apply)",
            policy.name
        );
        if let Some(w) = self.candidates.get_mut(cg).and_then(|c| c.watched.as_mut()) {
            w.hold_deferred = true;
        }
    }

    /// v2 `hold_at`: the holder thread sets memory.high of a watched cgroup.
    fn apply_hold(&self, cg: &CgroupPath, policy: &Arc<Policy>) {
        self.holder.hold(cg, policy.clone());
    }

    /// The holder thread gives a hold back; nothing if `cg` is not held.
    fn release_hold(&self, cg: &CgroupPath, reason: &str) {
        self.holder.release(cg, reason);
    }

    /// At shutdown: what the holder has queued is made, then every hold goes back.
    pub fn release_holds(&mut self, reason: &str) {
        self.holder.finish();
        for cg in self.shared.holds.cgroups() {
            crate::holder::release(&self.shared, &cg, reason);
        }
    }

    /// Opens the stall notifications of `cg` and adds them to the epoll under fresh
    /// tokens (returns the first). Either step failing undoes what was done and leaves
    /// the cgroup to the sweep; the caller retries later.
    fn register(
        &mut self,
        cg: &CgroupPath,
        policy: &Policy,
    ) -> Result<(StallWatch, u64), Registration> {
        let stall = match self
            .shared
            .env
            .ctl
            .register_stall(cg, policy.v2.trigger.as_ref())
        {
            Ok(s) => s,
            Err(e) if e.is_gone() => return Err(Registration::Gone),
            Err(e) => return Err(Registration::Failed(e.to_string())),
        };
        let base = self.next_token;
        for (i, fd) in stall.fds.iter().enumerate() {
            let flags = if fd.priority() {
                EpollFlags::EPOLLPRI
            } else {
                EpollFlags::EPOLLIN
            };
            let t = base + i as u64;
            let res = if fault_epoll_add() {
                Err(nix::errno::Errno::ENOMEM)
            } else {
                self.epoll.add(fd.as_fd(), EpollEvent::new(flags, t))
            };
            if let Err(e) = res {
                for (j, fd) in stall.fds[..i].iter().enumerate() {
                    let _ = self.epoll.delete(fd.as_fd());
                    self.tokens.remove(&(base + j as u64));
                }
                return Err(Registration::Failed(format!("epoll add: {e}")));
            }
            self.tokens.insert(t, cg.clone());
        }
        self.next_token += stall.fds.len().max(1) as u64;
        Ok((stall, base))
    }

    /// Retries the registration of watched cgroups that have no eventfd (backing off
    /// per cgroup); until it succeeds the sweep covers them.
    fn retry_registrations(&mut self, now: Instant) {
        if !self.events {
            return;
        }
        let due: Vec<(CgroupPath, u64, Arc<Policy>)> = self
            .candidates
            .iter()
            .filter_map(|(cg, c)| {
                let w = c.watched.as_ref()?;
                (w.stall.is_none() && now >= w.retry.at)
                    .then(|| (cg.clone(), w.token, w.policy.clone()))
            })
            .collect();
        for (cg, old_token, policy) in due {
            let res = self.register(&cg, &policy);
            if let Ok((_, base)) = &res {
                self.tokens.remove(&old_token);
                self.tokens.insert(*base, cg.clone());
            }
            let Some(w) = self
                .candidates
                .get_mut(&cg)
                .and_then(|c| c.watched.as_mut())
            else {
                continue;
            };
            match res {
                Ok((stall, base)) => {
                    log::info!("{cg}: registered for OOM events on retry");
                    w.stall = Some(stall);
                    w.token = base;
                }
                Err(Registration::Gone) => w.retry.failed(now),
                Err(Registration::Failed(e)) => {
                    log::debug!("{cg}: registering for OOM events failed again: {e}");
                    w.retry.failed(now);
                }
            }
        }
    }

    fn unwatch(&mut self, cg: &CgroupPath, reason: &str) {
        let Some(w) = self.candidates.get_mut(cg).and_then(|c| c.watched.take()) else {
            return;
        };
        self.release_hold(cg, reason);
        self.shared.env.ctl.forget(cg);
        self.tokens.remove(&w.token);
        if let Some(t) = &w.early {
            if let Some(fd) = &t.fd {
                let _ = self.epoll.delete(fd.as_fd());
            }
            self.tokens.remove(&t.token);
        }
        if let Some(stall) = &w.stall {
            for (i, fd) in stall.fds.iter().enumerate() {
                let _ = self.epoll.delete(fd.as_fd());
                self.tokens.remove(&(w.token + i as u64));
            }
        }
        self.shared.audit.log(
            Record::new("unwatch", cg)
                .with("policy", w.policy.name.clone())
                .with("reason", reason),
        );
        self.status_dirty = true;
        self.update_watched_metric();
    }

    fn forget_subtree(&mut self, top: &CgroupPath, reason: &str) {
        let gone: Vec<CgroupPath> = self
            .candidates
            .keys()
            .filter(|c| c.is_within(top))
            .cloned()
            .collect();
        self.by_container.retain(|_, cg| !cg.is_within(top));
        self.fresh.retain(|f| !f.cg.is_within(top));
        for cg in gone {
            self.unwatch(&cg, reason);
            self.candidates.remove(&cg);
            self.shared.dispatcher.forget(&cg);
        }
        let dirs: Vec<CgroupPath> = self
            .dir_wds
            .keys()
            .filter(|c| c.is_within(top))
            .cloned()
            .collect();
        for cg in dirs {
            if let Some(wd) = self.dir_wds.remove(&cg) {
                self.dirs.remove(&wd);
                // Already gone with the directory in the usual case.
                let _ = self.inotify.rm_watch(wd);
            }
        }
    }

    /// How many cgroups are watched now.
    pub fn watched_count(&self) -> usize {
        self.candidates
            .values()
            .filter(|c| c.watched.is_some())
            .count()
    }

    fn update_watched_metric(&self) {
        self.shared.metrics.set_watched(self.watched_count());
    }

    /// The safety sweep: picks up OOMs no eventfd reported (and starts while already
    /// stuck), oom_kill_disable flips, the end of held stalls, and changes that make an
    /// unresolved stall worth retrying at once; retries failed registrations.
    fn sweep(&mut self) {
        // Holds whose release waited for a loan to come back.
        for cg in self.shared.holds.cgroups() {
            if self.watched(&cg).is_none() {
                self.release_hold(&cg, "unwatched");
            }
        }
        let policies = self.shared.policies();
        let now = Instant::now();
        self.retry_registrations(now);
        let ctl = self.shared.env.ctl.as_ref();
        for (cg, before) in self.shared.dispatcher.waiting_pictures() {
            let Some(pic) = crate::episode::picture(ctl, &cg) else {
                continue;
            };
            if let Some(why) = before.changed(&pic) {
                log::info!("{cg}: {why}: retrying the unresolved stall now");
                self.shared.dispatcher.kick(&cg);
            }
        }
        let cgs: Vec<CgroupPath> = self.candidates.keys().cloned().collect();
        for cg in cgs {
            let Some(st) = self.probe(&cg) else {
                continue;
            };
            // The policy choice depends only on oom_kill_disable (and the policy set,
            // which a reload marks stale): re-select only when it changed.
            let known = self.candidates.get(&cg).and_then(|c| c.kill_disabled);
            if known != Some(st.oom_kill_disable) {
                self.apply(&cg, st, &policies, "oom_kill_disable changed");
            }
            // A limit someone else moved (or one whose move the loop missed): the
            // early threshold follows it.
            // A registration that failed is retried here too.
            let early_limit = self
                .watched(&cg)
                .and_then(|w| w.early.as_ref())
                .map(|t| (t.limit, t.failed));
            if let Some((was, failed)) = early_limit {
                let now_limit = self
                    .shared
                    .env
                    .ctl
                    .limits(&cg)
                    .ok()
                    .flatten()
                    .map(|l| l.memory);
                if failed || now_limit.is_some_and(|l| l != was) {
                    self.arm_early(&cg, now);
                }
            }
            let watched = self.watched(&cg).is_some();
            if st.under_oom {
                if let Some(c) = self.candidates.get_mut(&cg) {
                    c.failcnt = None;
                    c.suspect = None;
                }
            }
            let pinned = if watched && !st.under_oom {
                self.look_pinned(&cg, now)
            } else {
                None
            };
            if watched && st.under_oom {
                let cause = Cause {
                    trigger: Trigger::Sweep,
                    rises: st.rises,
                    own_wall: false,
                };
                self.trigger(&cg, now, cause);
            } else if let Some(p) = pinned {
                self.trigger_pinned(&cg, now, p);
            } else if !st.under_oom && !self.held_at_wall(&cg) {
                for end in self.shared.dispatcher.clear_held(&cg) {
                    let stalled = end.since.elapsed().unwrap_or_default();
                    self.shared.audit.log(
                        Record::new("resolved", &end.cgroup)
                            .with("episode", end.episode)
                            .with("policy", end.policy)
                            .with("stalled_ms", stalled.as_millis() as u64)
                            .with("by_step", serde_json::Value::Null)
                            .with("unaided", end.unaided),
                    );
                }
            }
        }
        self.follow_own_cgroup();
        self.refresh_kit();
        self.shared
            .metrics
            .set_stuck(&self.shared.dispatcher.stuck_by_policy());
        let sig = self.status_signature();
        if self.status_dirty || sig != self.status_sig {
            self.status_sig = sig;
            self.write_status(true);
        }
    }

    /// Follows the agent's own memory cgroup when someone moved it after start (its PID
    /// written into another `cgroup.procs`): a raise of it writes the limit first,
    /// `kill_all` never writes `cgroup.kill` of a cgroup holding it, and the kill kit
    /// arms its new cgroup. A read that fails (at its wall) keeps what was known.
    fn follow_own_cgroup(&mut self) {
        let env = &self.shared.env;
        let Ok(text) = std::fs::read(env.proc_root.join("self/cgroup")) else {
            return;
        };
        let h = env.ctl.hierarchy();
        let now =
            crate::cgroup::parse::proc_memory_cgroup_bytes(&text).and_then(|p| h.from_proc_path(p));
        let was = env.loans.own_cgroup();
        if now == was {
            return;
        }
        log::warn!(
            "the agent's memory cgroup is now {} (was {}): following it",
            now.as_ref()
                .map_or("outside the hierarchy".to_string(), |c| c.to_string()),
            was.as_ref()
                .map_or("outside the hierarchy".to_string(), |c| c.to_string()),
        );
        if let Some(c) = &now {
            env.ctl.prepare(c);
        }
        env.loans.set_own_cgroup(now);
    }

    /// The kill kit's subtree: the highest watched cgroup that holds the agent and
    /// whose policy signals processes (None when the agent shares no such cgroup).
    fn kit_top(&self) -> Option<CgroupPath> {
        let mut top = None;
        let mut cg = self.shared.env.loans.own_cgroup();
        while let Some(c) = cg {
            if self.watched(&c).is_some_and(|w| w.policy.signals()) {
                top = Some(c.clone());
            }
            cg = c.parent();
        }
        top
    }

    /// Refreshes the kill kit ([`crate::armed`]), at every sweep and when usage climbs
    /// towards the limit; not while its cgroup is at the wall (nothing new opens there,
    /// and the kit as armed before is what the kill reads), and follows its limit with
    /// the usage thresholds.
    fn refresh_kit(&mut self) {
        let top = self.kit_top();
        let env = &self.shared.env;
        if let Some(t) = &top {
            if matches!(env.ctl.oom_state(t), Ok(Some(st)) if st.under_oom) {
                return;
            }
        }
        env.armed
            .refresh(env.ctl.as_ref(), &env.proc_root, env.self_pid, top.as_ref());
        let limit = top
            .as_ref()
            .and_then(|t| env.ctl.limits(t).ok().flatten())
            .map(|l| l.memory);
        let want = top.zip(limit);
        if want == self.kit_for {
            return;
        }
        for (_, fd) in self.kit_fds.drain(..) {
            let _ = self.epoll.delete(fd.as_fd());
        }
        self.kit_for = want.clone();
        let Some((top, limit)) = want else {
            return;
        };
        if !self.events || crate::cgroup::parse::is_unlimited(limit) {
            return;
        }
        for (num, den) in KIT_THRESHOLDS {
            let bytes = limit / den * num;
            let fd = match self.shared.env.ctl.register_threshold(&top, bytes) {
                Ok(Some(fd)) => fd,
                Ok(None) => return,
                Err(e) => {
                    log::debug!("{top}: kill kit threshold: {e}");
                    continue;
                }
            };
            let token = self.next_token;
            self.next_token += 1;
            if self
                .epoll
                .add(fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
                .is_ok()
            {
                self.kit_fds.push((token, fd));
            }
        }
    }

    /// The pinned-stall rule's look at a watched cgroup not under OOM: one read of
    /// `memory.failcnt`, and more only when it rose or the cgroup is a suspect (see
    /// [`crate::pinned`]). Nothing for a policy with `pinned = false`.
    fn look_pinned(&mut self, cg: &CgroupPath, at: Instant) -> Option<crate::pinned::Pinned> {
        use crate::pinned::{file_bytes, judge_every, progress, tasks, Look, Verdict, Wall};
        if !self.watched(cg)?.policy.pinned {
            let c = self.candidates.get_mut(cg)?;
            c.failcnt = None;
            c.suspect = None;
            return None;
        }
        let ctl = self.shared.env.ctl.as_ref();
        let proc_root = self.shared.env.proc_root.as_path();
        let now = match ctl.failcnt(cg) {
            Ok(n) => n?,
            Err(e) => {
                log::debug!("{cg}: {e}");
                return None;
            }
        };
        let c = self.candidates.get_mut(cg)?;
        let prev = c.failcnt.replace(now)?;
        if now > prev {
            c.failcnt_rose = Some(at);
        }
        let verdict = judge_every(
            at,
            Look { failcnt: prev },
            Look { failcnt: now },
            c.suspect.take(),
            self.sweep_every,
            || {
                let stat = ctl.stat(cg).ok()??;
                let mut wall = Wall {
                    usage: ctl.usage(cg).ok()??,
                    limit: ctl.limits(cg).ok()??.memory,
                    file_bytes: file_bytes(&stat)?,
                    progress: progress(&stat)?,
                    tasks: None,
                };
                // The processes (a walk and a /proc read each) only for a cgroup
                // cornered at its wall: one full of page cache is judged clear without.
                if wall.cornered() {
                    wall.tasks = subtree_procs(ctl, cg).and_then(|p| tasks(proc_root, &p));
                }
                Some(wall)
            },
        );
        match verdict {
            Verdict::Clear => None,
            Verdict::Suspect(s) => {
                c.suspect = Some(s);
                None
            }
            Verdict::Pinned(p) => Some(p),
        }
    }

    fn trigger_pinned(&mut self, cg: &CgroupPath, detected: Instant, p: crate::pinned::Pinned) {
        let Some(policy) = self.watched(cg).map(|w| w.policy.clone()) else {
            return;
        };
        if let Some(id) = self
            .shared
            .dispatcher
            .trigger_pinned(cg, policy, detected, p)
        {
            log::info!(
                "{cg}: pinned at its limit ({} of {} bytes, failcnt +{}, {} bytes of file cache, {} page charge events and {} ms of CPU in {} ms) without an OOM: episode {id}",
                p.usage,
                p.limit,
                p.failcnt_delta,
                p.file_bytes,
                p.progress_events,
                p.cpu_ms,
                p.window_ms
            );
        }
    }

    /// Whether a stall held at `cg` (or an ancestor) is a pinned one still at its
    /// wall, its charges still failing: `under_oom 0` does not end it, but a cgroup
    /// back at its wall without a failed charge since [`crate::pinned::suspect_for`]
    /// (the pinned workload gone, an idle holder or page cache filling the room) is no
    /// longer stuck.
    fn held_at_wall(&self, cg: &CgroupPath) -> bool {
        let ctl = self.shared.env.ctl.as_ref();
        let failing = crate::pinned::suspect_for(self.sweep_every);
        self.shared.dispatcher.held_at(cg).iter().any(|h| {
            let still_failing = self
                .candidates
                .get(h)
                .is_none_or(|c| c.failcnt_rose.is_some_and(|t| t.elapsed() <= failing));
            still_failing && at_own_limit(ctl, h)
        })
    }

    /// Reads a candidate's OOM state through its kept-open probe (one pread).
    /// `None` if it is gone (then forgotten) or unreadable (logged).
    fn probe(&mut self, cg: &CgroupPath) -> Option<OomControl> {
        let entry = self.candidates.get_mut(cg)?;
        if entry.probe.is_none() {
            match self.shared.env.ctl.oom_probe(cg) {
                Ok(Some(f)) => entry.probe = Some(f),
                Ok(None) => {
                    self.removed_or_made_again(cg);
                    return None;
                }
                Err(e) => {
                    log::warn!("{cg}: {e}");
                    return None;
                }
            }
        }
        let res = entry.probe.as_ref().map(|f| f.read());
        match res {
            Some(Ok(Some(st))) => {
                self.note_oom_kills(cg, st.oom_kill);
                Some(st)
            }
            Some(Ok(None)) => {
                self.removed_or_made_again(cg);
                None
            }
            Some(Err(e)) => {
                log::warn!("{cg}: {e}");
                None
            }
            None => None,
        }
    }

    /// A candidate's kept-open probe says its cgroup is gone. When a directory is at its
    /// path again, that is a new cgroup made there (seen when inotify's queue overflowed
    /// and the rescan found the path present, so neither the removal nor the creation was
    /// noticed): it is watched at once instead of at the next rescan, 30 s later.
    fn removed_or_made_again(&mut self, cg: &CgroupPath) {
        self.forget_subtree(cg, "removed");
        if self.shared.env.ctl.hierarchy().dir(cg).is_dir() {
            log::info!("{cg}: removed and made again; watching the new cgroup");
            self.discover(cg);
        }
    }

    /// Audits a rise of the kernel's OOM kill counter of a watched cgroup: the kernel
    /// killed anyway (on v2 at memory.max).
    fn note_oom_kills(&mut self, cg: &CgroupPath, now: u64) {
        let Some(c) = self.candidates.get_mut(cg) else {
            return;
        };
        let before = c.oom_kills.replace(now);
        let Some(before) = before.filter(|&b| now > b) else {
            return;
        };
        if let Some(w) = &c.watched {
            let policy = w.policy.name.clone();
            log::warn!("{cg}: the kernel OOM-killed {} task(s)", now - before);
            self.shared.audit.log(
                Record::new("kernel_oom_kill", cg)
                    .with("policy", policy)
                    .with("oom_kill", now)
                    .with("killed", now - before),
            );
        }
    }

    /// Changes `oomwake status` should show: loans, running episodes, holds.
    fn status_signature(&self) -> (u64, usize, u64, u64, u64) {
        (
            self.shared.env.loans.generation(),
            self.shared.dispatcher.running_count(),
            self.shared.dispatcher.generation(),
            self.shared.holds.generation(),
            self.shared.env.armed.generation(),
        )
    }

    /// Walks the whole hierarchy: catches what inotify could not report (cgroups
    /// created through another mount, queue overflows).
    fn rescan(&mut self) {
        let (all, complete) = self
            .shared
            .env
            .ctl
            .hierarchy()
            .walk_checked(&CgroupPath::root());
        let present: std::collections::HashSet<&CgroupPath> = all.iter().collect();
        // A directory the walk could not list (the agent inside a cgroup at its wall,
        // where opening one fails) hides cgroups that are still there: none is taken
        // for removed then; inotify and the next rescan tell.
        let stale: Vec<CgroupPath> = if complete {
            self.dir_wds
                .keys()
                .filter(|c| !present.contains(c))
                .cloned()
                .collect()
        } else {
            log::warn!(
                "rescan: a cgroup directory could not be listed; keeping the cgroups not seen"
            );
            Vec::new()
        };
        for cg in stale {
            self.forget_subtree(&cg, "removed");
        }
        let new: Vec<CgroupPath> = all
            .iter()
            .filter(|c| !self.dir_wds.contains_key(*c))
            .cloned()
            .collect();
        for cg in new {
            self.discover(&cg);
        }
    }

    /// The periodic sweep, after the next try of a deferred reload (whose success
    /// sweeps already).
    fn sweep_due(&mut self) {
        if self.reload_deferred {
            self.on_reload();
            if !self.reload_deferred {
                return;
            }
        }
        self.sweep();
    }

    fn on_reload(&mut self) {
        // logrotate's SIGHUP: reopen even if the policies on disk are refused below.
        // A deferred reload's later tries reopen again, said once (at the SIGHUP). The
        // open itself runs on the audit writer thread, never here.
        let asked = if self.reload_deferred {
            self.shared.audit.reopen_retry()
        } else {
            self.shared.audit.reopen()
        };
        if let Err(e) = asked {
            if !self.reload_deferred {
                log::error!("reopening the audit log: {e}");
            }
        }
        match (self.reload)() {
            Ok(crate::config::Reloaded {
                policies: set,
                config,
            }) => {
                self.sweep_every = config.sweep_interval;
                self.rescan_every = config.rescan_interval;
                self.dry_run = config.dry_run;
                if std::mem::take(&mut self.reload_deferred) {
                    log::info!("the deferred reload went through");
                }
                log::info!(
                    "reloaded: {} polic{}",
                    set.policies().len(),
                    if set.policies().len() == 1 {
                        "y"
                    } else {
                        "ies"
                    }
                );
                *self
                    .shared
                    .policies
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                let policies = self.shared.policies();
                let known: Vec<CgroupPath> = self.dir_wds.keys().cloned().collect();
                for cg in known {
                    self.reconsider(&cg, &policies, "reload");
                }
                // Held and unresolved stalls are evaluated again, at once, under the
                // new policies (an audit policy switched to enforce acts now).
                self.shared.dispatcher.reloaded();
                self.sweep();
                self.write_status(true);
            }
            Err(e) => match self.own_cgroup_at_its_wall() {
                Some(own) => {
                    if !std::mem::replace(&mut self.reload_deferred, true) {
                        log::warn!(
                            "reload deferred: the agent's own cgroup {own} is at its wall, where opening a file fails; keeping the current config and policies and trying again at every sweep:\n{e}"
                        );
                    }
                }
                None => {
                    self.reload_deferred = false;
                    log::error!("reload refused, keeping the current config and policies:\n{e}")
                }
            },
        }
    }

    /// The agent's own memory cgroup when it is under OOM (on v1 the kernel marks the
    /// whole subtree of the cgroup whose limit was hit, so an ancestor's stall counts).
    fn own_cgroup_at_its_wall(&self) -> Option<CgroupPath> {
        let own = self.shared.env.loans.own_cgroup()?;
        match self.shared.env.ctl.oom_state(&own) {
            Ok(Some(st)) if st.under_oom => Some(own),
            // Its control files are kept open from the start (see agent::run), but a
            // read that needs a new open at the wall fails just the same.
            Err(crate::cgroup::CgroupError::Read { source, .. })
                if source.raw_os_error() == Some(libc::ENOMEM) =>
            {
                Some(own)
            }
            _ => None,
        }
    }

    /// After the loop ended: waits up to `wait` for another SIGTERM/SIGINT.
    pub fn stop_requested(&mut self, wait: Duration) -> bool {
        // An error or a timeout both come down to the read below finding nothing.
        let _ = nix::poll::poll(
            &mut [nix::poll::PollFd::new(
                self.term.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )],
            nix::poll::PollTimeout::try_from(wait).unwrap_or(nix::poll::PollTimeout::ZERO),
        );
        let mut buf = [0u8; 64];
        matches!(self.term.read(&mut buf), Ok(n) if n > 0)
    }

    /// Writes `<state_dir>/status.json` for `oomwake status`.
    pub fn write_status(&mut self, running: bool) {
        let status = Status {
            pid: crate::sys::getpid(),
            running,
            updated: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            cgroup_root: self.cgroup_root.clone(),
            policies: self
                .shared
                .policies()
                .policies()
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            dry_run: self.dry_run,
            watched: self
                .candidates
                .iter()
                .filter_map(|(cg, c)| {
                    let w = c.watched.as_ref()?;
                    let ident = crate::container::identify(cg.as_bytes());
                    let meta = self.shared.container_info(cg);
                    Some(WatchedStatus {
                        cgroup: cg.clone(),
                        policy: w.policy.name.clone(),
                        container_id: ident.and_then(|i| i.container_id),
                        container_name: meta
                            .as_ref()
                            .map(|m| crate::audit::cap_value(&m.info.name)),
                        image: meta
                            .as_ref()
                            .map(|m| crate::audit::cap_value(&m.info.image)),
                    })
                })
                .collect(),
            episodes_running: self.shared.dispatcher.running(),
            stuck: self.shared.dispatcher.stuck(),
            loans: self.shared.env.loans.records(),
            journal_damage: self.shared.env.loans.journal_damage(),
            holds: self.shared.holds.records(),
            kill_kit: self.shared.env.armed.status(),
        };
        let path = self.state_dir.join("status.json");
        let tmp = self.state_dir.join("status.json.tmp");
        let body = match serde_json::to_vec_pretty(&status) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("status: {e}");
                return;
            }
        };
        if let Err(e) = std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, &path)) {
            log::warn!("{}: {e}", path.display());
        }
        self.status_dirty = false;
    }
}

/// Resets a signal eventfd (reads need 8 bytes at least).
fn drain(s: &mut impl Read) {
    let mut buf = [0u8; 64];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// Whether `cg`'s usage is at its own limit (within [`crate::pinned::wall_margin`]):
/// the cgroup whose limit was hit, not one marked by a stall above it. False when
/// either read fails or the cgroup has no limit of its own.
fn at_own_limit(ctl: &dyn crate::cgroup::Controller, cg: &CgroupPath) -> bool {
    let Ok(Some(limits)) = ctl.limits(cg) else {
        return false;
    };
    let unlimited = crate::cgroup::parse::is_unlimited(limits.memory);
    matches!(ctl.usage(cg), Ok(Some(u)) if !unlimited && crate::pinned::at_wall(u, limits.memory))
}

/// Whether a v1 cgroup's memsw limit is (within the wall margin) its memory limit:
/// then its charges fail on the memsw counter first (without swap the two usages are
/// equal), and the kernel counts `failcnt` on the memory counter only
/// (`memory.memsw.failcnt` reads 0: measured on 6.18), so the pinned rule, which needs
/// a failcnt rise, never sees a stall at this wall (Docker's `--memory-swap` equal to
/// `--memory`).
fn memsw_walls_first(l: crate::cgroup::Limits) -> bool {
    use crate::cgroup::parse::is_unlimited;
    match l.memsw {
        Some(sw) if !is_unlimited(sw) && !is_unlimited(l.memory) => {
            sw <= l
                .memory
                .saturating_add(crate::pinned::wall_margin(l.memory))
        }
        _ => false,
    }
}

/// The processes of `cg` and of every cgroup below it, for the pinned rule's CPU
/// evidence: a limit on a parent (a pod) with its processes in children (containers)
/// is the usual layout, and the parent's own `cgroup.procs` is empty there, which
/// would prove any busy subtree idle. `None` when the subtree could not all be listed
/// or read, or holds more than [`crate::pinned::MAX_TASKS`] processes: then nothing
/// proves it idle.
fn subtree_procs(ctl: &dyn crate::cgroup::Controller, cg: &CgroupPath) -> Option<Vec<i32>> {
    let (cgroups, complete) = ctl.hierarchy().walk_checked(cg);
    if !complete || cgroups.first() != Some(cg) {
        return None;
    }
    let mut pids = Vec::new();
    for c in &cgroups {
        match ctl.procs(c) {
            Ok(Some(p)) => pids.extend(p),
            // A child removed since the walk: its processes are gone or moved (the
            // fingerprint of the set tells the next look).
            Ok(None) if c != cg => {}
            _ => return None,
        }
        if pids.len() > crate::pinned::MAX_TASKS {
            return None;
        }
    }
    Some(pids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{v2::V2, Controller, Hierarchy, Kind, Limits, OomProbe, Reclaimed};
    use std::path::Path;
    use std::sync::mpsc;
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_memsw_limit_at_the_memory_limit_walls_first() {
        let l = |memory: u64, memsw: Option<u64>| Limits {
            memory,
            memsw,
            high: None,
        };
        let unl = 9_223_372_036_854_771_712;
        assert!(memsw_walls_first(l(16 * MIB, Some(16 * MIB))));
        assert!(memsw_walls_first(l(16 * MIB, Some(16 * MIB + MIB / 2))));
        assert!(!memsw_walls_first(l(16 * MIB, Some(32 * MIB))));
        assert!(!memsw_walls_first(l(16 * MIB, Some(unl))));
        assert!(!memsw_walls_first(l(16 * MIB, None)));
        assert!(!memsw_walls_first(l(unl, Some(unl))));
    }

    /// The agent's shared state for a watcher test: `ctl`, `policies`, the audit log in
    /// `dir`, and a Docker cache when given (its metadata then goes into audit lines).
    fn test_shared(
        dir: &Path,
        ctl: Box<dyn Controller>,
        policies: Vec<crate::policy::Policy>,
        containers: Option<Arc<crate::container::Containers>>,
    ) -> Arc<Shared> {
        let (jobs, _rx) = crossbeam_channel::unbounded();
        let mut audit = crate::audit::Audit::file(&dir.join("audit.jsonl")).unwrap();
        if let Some(c) = &containers {
            audit = audit.with_containers(c.clone());
        }
        Arc::new(Shared {
            env: crate::action::Env {
                ctl,
                proc_root: "/proc".into(),
                self_pid: 0,
                loans: crate::loan::LoanBook::new(None),
                armed: crate::armed::Armed::new(),
            },
            audit,
            metrics: crate::metrics::Metrics::default(),
            dispatcher: crate::dispatcher::Dispatcher::new(jobs, Duration::from_secs(60), 1, 1),
            policies: std::sync::RwLock::new(Arc::new(PolicySet::new(policies, false))),
            settle_poll: Duration::from_millis(1),
            stop: std::sync::atomic::AtomicBool::new(false),
            holds: crate::hold::Holds::in_memory(),
            moves: Arc::new(crate::moves::Moves::new().unwrap()),
            containers: containers
                .unwrap_or_else(|| Arc::new(crate::container::Containers::disabled())),
            metadata_wait: Duration::from_secs(2),
        })
    }

    /// A configuration watching `root`, with its state dir in `dir` and no OOM events.
    fn test_config(dir: &Path, root: &Path) -> Config {
        Config {
            cgroup_root: root.to_path_buf(),
            state_dir: dir.join("state"),
            events: false,
            ..Config::default()
        }
    }

    /// A reload that fails while the agent's own cgroup is under OOM (opening a file
    /// there fails with ENOMEM) is tried again at the next sweep and applied then; one
    /// that fails while the agent's cgroup is not stuck is refused, not deferred.
    #[test]
    fn a_reload_failing_while_the_agents_own_cgroup_is_stuck_is_retried_not_lost() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cg");
        let pod = root.join("pod");
        std::fs::create_dir_all(&pod).unwrap();
        let oom = |under: u8| format!("oom_kill_disable 1\nunder_oom {under}\noom_kill 0\n");
        std::fs::write(pod.join("memory.oom_control"), oom(1)).unwrap();
        let load = |name: &str| {
            crate::policy::load::load_str(
                &format!("name = \"{name}\"\n[match]\ncgroup = [\"/elsewhere\"]\n[[step]]\naction = \"kill\"\n"),
                "p.toml",
            )
            .unwrap()
        };
        let shared = test_shared(
            t.path(),
            Box::new(crate::cgroup::v1::V1::new(Hierarchy::fake(&root, Kind::V1))),
            vec![load("old")],
            None,
        );
        shared
            .env
            .loans
            .set_own_cgroup(Some(CgroupPath::new("/pod")));
        let cfg = test_config(t.path(), &root);
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        // Fails on the first try (no memory to open the files), reads on the second,
        // fails again after that.
        let tries = Arc::new(AtomicUsize::new(0));
        let reload = {
            let tries = tries.clone();
            let cfg = cfg.clone();
            move || match tries.fetch_add(1, Ordering::SeqCst) {
                1 => Ok(crate::config::Reloaded {
                    policies: PolicySet::new(vec![load("new")], false),
                    config: cfg.clone(),
                }),
                _ => Err("p.toml: Cannot allocate memory (os error 12)".to_string()),
            }
        };
        let mut w = Watcher::new(shared.clone(), &cfg, Box::new(reload)).unwrap();
        let name = |s: &Shared| s.policies().policies()[0].name.clone();
        w.on_reload();
        assert!(
            w.reload_deferred,
            "a reload failing in its own stuck cgroup was dropped"
        );
        assert_eq!(name(&shared), "old");
        w.sweep_due();
        assert_eq!(
            tries.load(Ordering::SeqCst),
            2,
            "not tried again at the sweep"
        );
        assert!(!w.reload_deferred);
        assert_eq!(name(&shared), "new", "the deferred reload was not applied");
        // Not stuck: a failing reload is refused as always, not retried.
        std::fs::write(pod.join("memory.oom_control"), oom(0)).unwrap();
        w.on_reload();
        assert!(
            !w.reload_deferred,
            "deferred although the agent's cgroup is not stuck"
        );
        w.sweep_due();
        assert_eq!(
            tries.load(Ordering::SeqCst),
            3,
            "a refused reload was tried again"
        );
        assert_eq!(name(&shared), "new");
    }

    /// v2 on a TempDir whose memory.high writes wait until the test lets them go, as a
    /// write below usage waits for the kernel's reclaim.
    struct SlowHigh {
        v: V2,
        entered: Mutex<mpsc::Sender<()>>,
        go: Mutex<mpsc::Receiver<()>>,
    }

    type R<T> = crate::cgroup::Result<T>;

    impl Controller for SlowHigh {
        fn hierarchy(&self) -> &Hierarchy {
            self.v.hierarchy()
        }
        fn oom_state(&self, cg: &CgroupPath) -> R<Option<OomControl>> {
            self.v.oom_state(cg)
        }
        fn limits(&self, cg: &CgroupPath) -> R<Option<Limits>> {
            self.v.limits(cg)
        }
        fn usage(&self, cg: &CgroupPath) -> R<Option<u64>> {
            self.v.usage(cg)
        }
        fn set_limits(&self, cg: &CgroupPath, from: Limits, to: Limits) -> R<()> {
            if to.high != from.high {
                let _ = self.entered.lock().unwrap().send(());
                let _ = self
                    .go
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            }
            self.v.set_limits(cg, from, to)
        }
        fn reclaim(&self, cg: &CgroupPath, t: Duration) -> R<Option<Reclaimed>> {
            self.v.reclaim(cg, t)
        }
        fn procs(&self, cg: &CgroupPath) -> R<Option<Vec<i32>>> {
            self.v.procs(cg)
        }
        fn stat(&self, cg: &CgroupPath) -> R<Option<std::collections::BTreeMap<String, u64>>> {
            self.v.stat(cg)
        }
        fn register_stall(
            &self,
            cg: &CgroupPath,
            psi: Option<&crate::cgroup::v2::PsiTrigger>,
        ) -> R<StallWatch> {
            self.v.register_stall(cg, psi)
        }
        fn oom_probe(&self, cg: &CgroupPath) -> R<Option<OomProbe>> {
            self.v.oom_probe(cg)
        }
    }

    /// A watcher on the fake v1 tree at `root`, its state and audit log in `dir`.
    fn v1_watcher(
        dir: &Path,
        root: &Path,
        policies: Vec<crate::policy::Policy>,
        containers: Option<Arc<crate::container::Containers>>,
    ) -> (Arc<Shared>, Watcher) {
        let shared = test_shared(
            dir,
            Box::new(crate::cgroup::v1::V1::new(Hierarchy::fake(root, Kind::V1))),
            policies,
            containers,
        );
        let cfg = test_config(dir, root);
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let w = Watcher::new(shared.clone(), &cfg, Box::new(|| Err("no reload".into()))).unwrap();
        (shared, w)
    }

    /// A watcher on a fake v1 tree holding one container cgroup `/docker/<id>`
    /// (`oom_kill_disable 1`, `under_oom` as given), with `policies` and a Docker cache
    /// the test fills: (its directory, the shared state, the watcher, the cgroup, the
    /// cache).
    fn container_watcher(
        id: &str,
        under_oom: bool,
        policies: Vec<crate::policy::Policy>,
    ) -> (
        tempfile::TempDir,
        Arc<Shared>,
        Watcher,
        CgroupPath,
        Arc<crate::container::Containers>,
    ) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cg");
        crate::shared::fake_container_cgroup(&root, id, under_oom);
        let containers = Arc::new(crate::container::Containers::detached().unwrap());
        let (shared, w) = v1_watcher(t.path(), &root, policies, Some(containers.clone()));
        let cg = CgroupPath::new(&format!("/docker/{id}"));
        (t, shared, w, cg, containers)
    }

    /// Issue 16.2: a stall held unresolved while its container's metadata was unknown
    /// (its retry backed off) is due again as soon as the metadata arrives.
    #[test]
    fn a_stall_held_without_metadata_is_retried_when_it_arrives() {
        let id = "9".repeat(64);
        let all = crate::policy::load::load_str(
            "name='all'\n[match]\ncgroup=['/docker/*']\n[[step]]\naction='kill'\n",
            "all.toml",
        )
        .unwrap();
        let db = crate::policy::load::load_str(
            "name='db'\nmode='audit'\npriority=50\n[match]\ncontainer_name=['db-*']\n[[step]]\naction='kill'\n",
            "db.toml",
        )
        .unwrap();
        let (_t, shared, mut w, cg, containers) = container_watcher(&id, true, vec![all, db]);
        let policy = w.watched(&cg).map(|x| x.policy.clone()).unwrap();
        assert_eq!(policy.name, "all");
        // The episode ran audit-only for want of the name: the stall waits for a retry.
        let job = crate::dispatcher::Job::new(cg.clone(), policy, 1, Instant::now());
        let end = crate::dispatcher::End::Unresolved {
            reason: crate::episode::METADATA_UNKNOWN.into(),
            help: String::new(),
            failed: false,
        };
        let picture = crate::dispatcher::Picture {
            limit: 1,
            usage: 1,
            tasks: 1,
        };
        shared.dispatcher.finish(&job, &end, Some(picture));
        assert_eq!(shared.dispatcher.waiting_pictures().len(), 1);
        containers.put(crate::container::Meta {
            id: id.clone(),
            info: crate::policy::ContainerInfo {
                name: "db-1".into(),
                ..Default::default()
            },
        });
        w.on_containers();
        assert_eq!(
            w.watched(&cg).map(|x| x.policy.name.clone()).as_deref(),
            Some("db")
        );
        assert!(
            shared.dispatcher.waiting_pictures().is_empty(),
            "the held stall's retry is due now"
        );
    }

    /// A container whose cgroup appears before the engine names it (the usual order:
    /// runc makes the cgroup, then Docker reports the start) is watched as soon as the
    /// name arrives, and unwatched when the container is renamed away from the policy.
    #[test]
    fn metadata_arriving_after_the_cgroup_is_matched_at_once() {
        let id = "e".repeat(64);
        let policy = crate::policy::load::load_str(
            "[match]\ncontainer_name = [\"api\"]\n[[step]]\naction = \"kill\"\n",
            "p.toml",
        )
        .unwrap();
        let other = crate::policy::load::load_str(
            "[match]\ncontainer_name = [\"api-2\"]\n[[step]]\naction = \"kill\"\n",
            "q.toml",
        )
        .unwrap();
        let (t, shared, mut w, cg, containers) = container_watcher(&id, false, vec![policy, other]);
        assert!(w.watched(&cg).is_none(), "no name yet: no policy matches");
        let meta = |name: &str| crate::container::Meta {
            id: id.clone(),
            info: crate::policy::ContainerInfo {
                name: name.into(),
                image: "img:1".into(),
                labels: Default::default(),
            },
        };
        containers.put(meta("api"));
        // The loop is woken through the cache's eventfd.
        let mut evs = [EpollEvent::empty(); 8];
        let n = w.epoll.wait(&mut evs, EpollTimeout::from(1000u16)).unwrap();
        assert!(evs[..n].iter().any(|e| e.data() == TOKEN_CONTAINERS));
        w.on_containers();
        assert_eq!(
            w.watched(&cg).map(|x| x.policy.name.clone()).as_deref(),
            Some("p")
        );
        // Renamed into another policy's name: watched under that one, and the unwatch
        // line says why (not "reload").
        containers.put(meta("api-2"));
        w.on_containers();
        assert_eq!(
            w.watched(&cg).map(|x| x.policy.name.clone()).as_deref(),
            Some("q")
        );
        containers.put(meta("web"));
        w.on_containers();
        assert!(w.watched(&cg).is_none(), "renamed away from the policies");
        assert!(shared.audit.flush(Duration::from_secs(5)));
        let audit = std::fs::read_to_string(t.path().join("audit.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["event"], "watch");
        assert_eq!(lines[0]["container_name"], "api");
        let seen: Vec<_> = lines
            .iter()
            .map(|v| {
                (
                    v["event"].as_str().unwrap_or(""),
                    v["policy"].as_str().unwrap_or(""),
                    v["reason"].as_str().unwrap_or(""),
                    v["container_name"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("watch", "p", "", "api"),
                ("unwatch", "p", "container changed", "api-2"),
                ("watch", "q", "", "api-2"),
                ("unwatch", "q", "container changed", "web"),
            ]
        );
        assert_eq!(lines[1]["container_id"], id.as_str());
    }

    /// runc makes a container's cgroup, then sets its limit and oom_kill_disable: the
    /// cgroup is watched once that is written, by the re-reads after its discovery (no
    /// sweep here), and a cgroup whose killer stays on is read only so many times.
    #[test]
    fn a_cgroup_whose_oom_killer_is_disabled_just_after_it_appears_is_watched_without_a_sweep() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cg");
        std::fs::create_dir_all(&root).unwrap();
        let policy = crate::policy::load::load_str(
            "[match]\ncgroup = [\"/docker/*\"]\n[[step]]\naction = \"kill\"\n",
            "p.toml",
        )
        .unwrap();
        let (_shared, mut w) = v1_watcher(t.path(), &root, vec![policy], None);
        let make = |name: &str| {
            let dir = root.join("docker").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("memory.oom_control"),
                "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
            )
            .unwrap();
            dir
        };
        let a = make("a");
        make("b");
        w.discover(&CgroupPath::new("/docker"));
        let (cga, cgb) = (CgroupPath::new("/docker/a"), CgroupPath::new("/docker/b"));
        assert!(w.watched(&cga).is_none(), "the OOM killer is still on");
        assert_eq!(w.fresh.len(), 2);
        // Set up a moment later, as runc does.
        std::fs::write(
            a.join("memory.oom_control"),
            "oom_kill_disable 1\nunder_oom 0\noom_kill 0\n",
        )
        .unwrap();
        let start = Instant::now();
        w.recheck_fresh(start);
        assert!(w.watched(&cga).is_none(), "not due yet");
        w.recheck_fresh(start + FRESH_RECHECKS[0]);
        assert_eq!(
            w.watched(&cga).map(|x| x.policy.name.clone()).as_deref(),
            Some("p")
        );
        // b keeps its killer: read again at each of the times, then left to the sweep.
        assert_eq!(w.fresh.len(), 1);
        for d in FRESH_RECHECKS {
            w.recheck_fresh(start + d + Duration::from_secs(1));
        }
        assert!(w.fresh.is_empty(), "{:?}", w.fresh.len());
        assert!(w.watched(&cgb).is_none());
        // Removed before it is due: nothing left to read.
        let c = make("c");
        w.discover(&CgroupPath::new("/docker/c"));
        assert_eq!(w.fresh.len(), 1);
        std::fs::remove_dir_all(&c).unwrap();
        w.forget_subtree(&CgroupPath::new("/docker/c"), "removed");
        assert!(w.fresh.is_empty());
    }

    /// v2: a container cgroup seen before its name, under a catch-all that holds at
    /// 75% while a policy by container name (no hold) ranks above it. The catch-all's
    /// memory.high was written at once: the lower policy acted on a workload whose
    /// metadata was unknown. The hold waits for the metadata: none when the name selects
    /// `db`, the catch-all's once the engine says the container is not its own.
    #[test]
    fn no_hold_of_a_lower_policy_while_the_container_name_is_unknown() {
        const MIB: u64 = 1 << 20;
        let id = "a".repeat(64);
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cg");
        let ctr = root.join("docker").join(&id);
        std::fs::create_dir_all(&ctr).unwrap();
        for (f, v) in [
            ("memory.max", (64 * MIB).to_string()),
            ("memory.high", "max".to_string()),
            ("memory.current", (10 * MIB).to_string()),
            (
                "memory.events",
                "high 0\nmax 0\noom 0\noom_kill 0\n".to_string(),
            ),
        ] {
            std::fs::write(ctr.join(f), v).unwrap();
        }
        let load = |text: &str, name: &str| crate::policy::load::load_str(text, name).unwrap();
        let policies = vec![
            load(
                "name='all'\npriority=0\n[match]\ncgroup=['/docker/*']\n[v2]\nhold_at='75%'\n[[step]]\naction='kill'\n",
                "all.toml",
            ),
            load(
                "name='db'\nmode='audit'\npriority=50\n[match]\ncontainer_name=['db-*']\n[[step]]\naction='kill'\n",
                "db.toml",
            ),
        ];
        let containers = Arc::new(crate::container::Containers::detached().unwrap());
        let shared = test_shared(
            t.path(),
            Box::new(V2::new(Hierarchy::fake(&root, Kind::V2))),
            policies,
            Some(containers.clone()),
        );
        let cfg = test_config(t.path(), &root);
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let mut w =
            Watcher::new(shared.clone(), &cfg, Box::new(|| Err("no reload".into()))).unwrap();
        let cg = CgroupPath::new(&format!("/docker/{id}"));
        assert_eq!(
            w.watched(&cg).map(|x| x.policy.name.clone()).as_deref(),
            Some("all")
        );
        let high = || std::fs::read_to_string(ctr.join("memory.high")).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            high(),
            "max",
            "the catch-all held a container of unknown name"
        );
        // The engine says it has no such container: the catch-all's hold is made.
        containers.set_absent(&id);
        w.on_containers();
        let held = (48 * MIB).to_string();
        let until = Instant::now() + Duration::from_secs(10);
        while high() != held && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(high(), held);
        w.release_holds("shutdown");
    }

    #[test]
    fn a_slow_memory_high_write_does_not_hold_up_the_event_loop() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cg");
        let app = root.join("app");
        std::fs::create_dir_all(&app).unwrap();
        for (f, v) in [
            ("memory.max", (64 * MIB).to_string()),
            ("memory.high", "max".to_string()),
            ("memory.current", (10 * MIB).to_string()),
            (
                "memory.events",
                "high 0\nmax 0\noom 0\noom_kill 0\n".to_string(),
            ),
        ] {
            std::fs::write(app.join(f), v).unwrap();
        }
        let (entered_tx, entered) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let ctl = SlowHigh {
            v: V2::new(Hierarchy::fake(&root, Kind::V2)),
            entered: Mutex::new(entered_tx),
            go: Mutex::new(go_rx),
        };
        let policy = crate::policy::load::load_str(
            "[match]\ncgroup = [\"/app\"]\n[v2]\nhold_at = \"75%\"\n[[step]]\naction = \"kill\"\n",
            "p.toml",
        )
        .unwrap();
        let shared = test_shared(t.path(), Box::new(ctl), vec![policy], None);
        let cfg = test_config(t.path(), &root);
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let (started_tx, started) = mpsc::channel();
        let (stop_tx, stop) = mpsc::channel::<()>();
        let s = shared.clone();
        let loop_thread = std::thread::spawn(move || {
            // Watching /app asks for its hold; the loop thread must not make the write.
            let mut w = Watcher::new(s, &cfg, Box::new(|| Err("no reload".into()))).unwrap();
            started_tx.send(()).unwrap();
            let _ = stop.recv_timeout(Duration::from_secs(30));
            w.release_holds("shutdown");
        });
        let high = || std::fs::read_to_string(app.join("memory.high")).unwrap();
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the hold was never written");
        // While the write is held up the holds can be read (the loop reads them for its
        // status): the journaled record is there, and nobody waits for the write.
        let (read_tx, read) = mpsc::channel();
        let s = shared.clone();
        std::thread::spawn(move || {
            let _ = read_tx.send(s.holds.records().len());
        });
        assert_eq!(
            read.recv_timeout(Duration::from_secs(10)),
            Ok(1),
            "reading the holds waited for the memory.high write"
        );
        started
            .recv_timeout(Duration::from_secs(10))
            .expect("the event loop waited for the memory.high write");
        assert_eq!(high(), "max", "still writing");
        go.send(()).unwrap();
        let held = (48 * MIB).to_string();
        let until = Instant::now() + Duration::from_secs(10);
        while high() != held && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(high(), held);
        // Shutdown gives it back (the release writes memory.high too).
        stop_tx.send(()).unwrap();
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        go.send(()).unwrap();
        loop_thread.join().unwrap();
        assert_eq!(high(), "max");
        assert!(shared.audit.flush(Duration::from_secs(5)));
        let audit = std::fs::read_to_string(t.path().join("audit.jsonl")).unwrap();
        assert!(audit.contains("\"event\":\"hold\""), "{audit}");
        assert!(audit.contains("\"event\":\"unhold\""), "{audit}");
    }

    /// Issue 16.19: a probe kept open on a cgroup that was removed and made again at the
    /// same path reads "gone" (ENODEV on the old file); the new cgroup there is watched
    /// at once, not forgotten until the next rescan.
    #[test]
    fn a_cgroup_made_again_behind_a_stale_probe_is_watched_again() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cg");
        let app = root.join("app");
        std::fs::create_dir_all(&app).unwrap();
        std::fs::write(
            app.join("memory.oom_control"),
            "oom_kill_disable 1\nunder_oom 0\noom_kill 0\n",
        )
        .unwrap();
        let policy = crate::policy::load::load_str(
            "[match]\ncgroup = [\"/app\"]\n[[step]]\naction = \"kill\"\n",
            "p.toml",
        )
        .unwrap();
        let (_shared, mut w) = v1_watcher(t.path(), &root, vec![policy], None);
        let cg = CgroupPath::new("/app");
        assert!(w.watched(&cg).is_some());
        // What a kept-open file of the removed cgroup reads: gone (ENODEV), while a new
        // cgroup is at the path.
        w.candidates.get_mut(&cg).unwrap().probe = Some(crate::cgroup::OomProbe::custom(
            app.join("memory.oom_control"),
            Box::new(|| Ok(None)),
        ));
        assert!(w.probe(&cg).is_none());
        assert!(
            w.watched(&cg).is_some(),
            "the cgroup made again at the path is not watched"
        );
        // Really gone: forgotten.
        w.candidates.get_mut(&cg).unwrap().probe = Some(crate::cgroup::OomProbe::custom(
            app.join("memory.oom_control"),
            Box::new(|| Ok(None)),
        ));
        std::fs::remove_dir_all(&app).unwrap();
        assert!(w.probe(&cg).is_none());
        assert!(w.watched(&cg).is_none());
    }
}
