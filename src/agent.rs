//! Wiring: builds the [`Shared`] state, starts the event loop, the episode workers and
//! the loan keeper, and runs the agent's start-up (journal recovery) and shutdown (stop
//! episodes, then give loans back, then exit; a second signal exits at once).

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::action::Env;
use crate::audit::Audit;
use crate::cgroup::{self, Hierarchy};
use crate::config::Config;
use crate::dispatcher::Dispatcher;
use crate::episode;
use crate::journal::Journal;
use crate::loan::{self, LoanBook};
use crate::metrics::Metrics;
use crate::policy::PolicySet;
use crate::shared::Shared;
use crate::watch::Watcher;

/// Loads config-driven policies (`--dry-run` turns them all to audit).
pub fn load_policies(cfg: &Config) -> Result<PolicySet, String> {
    let set = crate::policy::load_dir_with(&cfg.policies, cfg.trust).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok(if cfg.dry_run { set.all_audit() } else { set })
}

/// Runs the agent until SIGTERM/SIGINT. `reload` re-reads config and policies on SIGHUP.
pub fn run(cfg: Config, policies: PolicySet, reload: crate::config::Reload) -> anyhow::Result<()> {
    let h = Hierarchy::detect(&cfg.cgroup_root, &cfg.proc_root)?;
    let ctl = cgroup::open(h)?;
    // For kernel_oom_kill's record of its victims: opened now, as the agent may share
    // a cgroup where nothing can be opened at the wall. Optional.
    if let Err(e) = crate::kmsg::open_at_start(std::path::Path::new("/dev/kmsg")) {
        log::info!("/dev/kmsg: {e}: kernel_oom_kill steps will not name their victims");
    }
    loan::fault::init();
    // The start judged the nearest directory that existed: made now if missing, the
    // state dir is judged again as it is, before anything in it is read (in a sticky
    // directory such as /tmp, another user could have made it in between, theirs).
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    if let crate::perm::Checks::Strict(owners) = cfg.trust.checks() {
        crate::perm::check(&cfg.state_dir, "the state dir", owners)
            .with_context(|| "untrusted state dir, not starting")?;
    }
    // A dry run reads the journal and never writes it (nor any cgroup).
    let journal = if cfg.dry_run {
        Journal::read_only(&cfg.state_dir)
    } else {
        Journal::open(&cfg.state_dir)?
    };
    // A damaged journal is moved aside and reported, never a reason not to start.
    let found = journal.recover()?;
    let holds = crate::hold::Holds::open(&cfg.state_dir)
        .with_context(|| "cannot read the journal of held memory.high values; refusing to start")?;
    let containers = match &cfg.docker_socket {
        Some(sock) => {
            crate::container::Containers::start(sock, !cfg.docker_socket_explicit, cfg.insecure())
                .with_context(|| format!("starting the Docker client for {}", sock.display()))?
        }
        None => Arc::new(crate::container::Containers::disabled()),
    };
    let audit = match &cfg.audit_log {
        Some(p) => Audit::file_with(p, cfg.trust)?,
        None => Audit::stderr(),
    }
    .with_containers(containers.clone());
    let (tx, rx) = crossbeam_channel::unbounded();
    let moves = Arc::new(crate::moves::Moves::new()?);
    let loans = LoanBook::new(Some(journal));
    let told = moves.clone();
    loans.on_limit_moved(Box::new(move |cg| told.moved(cg)));
    let shared = Arc::new(Shared {
        env: Env {
            ctl,
            proc_root: cfg.proc_root.clone(),
            self_pid: crate::sys::getpid(),
            loans,
            armed: crate::armed::Armed::new(),
        },
        audit,
        metrics: Metrics::default(),
        dispatcher: Dispatcher::new(tx, cfg.unresolved_retry_max, cfg.workers, cfg.max_workers),
        policies: RwLock::new(Arc::new(policies)),
        settle_poll: cfg.settle_poll,
        stop: AtomicBool::new(false),
        holds,
        moves,
        containers,
        metadata_wait: cfg.container_metadata_wait,
    });
    loan::keeper::recover(&shared, found);
    if !cfg.dry_run {
        // A kernel_oom_kill hand-off of the previous run that did not put
        // oom_kill_disable back (the agent died between its two writes).
        let ctl = shared.env.ctl.as_ref();
        for (cg, result) in crate::action::handoff::recover(ctl, &cfg.state_dir) {
            log::warn!(
                "{cg}: a kernel_oom_kill hand-off was interrupted; oom_kill_disable 1: {result}"
            );
            shared.audit.log(
                crate::audit::Record::new("oom_kill_disable_restored", &cg)
                    .with("reason", "startup")
                    .with("result", result),
            );
        }
    }

    {
        let weak = Arc::downgrade(&shared);
        let seq = std::sync::atomic::AtomicUsize::new(0);
        shared.dispatcher.start_workers(Box::new(move || {
            let Some(s) = weak.upgrade() else {
                return false;
            };
            let r = rx.clone();
            let i = seq.fetch_add(1, Ordering::Relaxed);
            std::thread::Builder::new()
                .name(format!("episode-{i}"))
                // Episodes need little stack; many idle workers should cost little.
                .stack_size(crate::sys::THREAD_STACK)
                .spawn(move || episode::worker(s, r))
                .map_err(|e| log::error!("cannot start an episode worker: {e}"))
                .is_ok()
        }));
    }
    let keeper = {
        let s = shared.clone();
        let every = cfg.restore_check_interval;
        std::thread::Builder::new()
            .name("keeper".into())
            // Locked whole by mlockall: no more stack than it needs.
            .stack_size(crate::sys::THREAD_STACK)
            .spawn(move || loan::keeper::run(s, every))?
    };
    // The shutdown thread exists from the start, so that its stack is locked with the
    // rest: at shutdown the agent may share a stuck cgroup, where a new thread's stack
    // would park it in the stall.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let stopping = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("shutdown".into())
            .stack_size(crate::sys::THREAD_STACK)
            .spawn(move || {
                if stop_rx.recv().is_ok() {
                    shut_down(&s, keeper);
                }
            })?
    };
    if let Some(addr) = cfg.metrics {
        let l = TcpListener::bind(addr).with_context(|| format!("binding metrics on {addr}"))?;
        // The address bound (port 0 picks a free one): said once, for tools and tests.
        match l.local_addr() {
            Ok(a) => log::info!("serving metrics on http://{a}/metrics"),
            Err(e) => log::warn!("metrics: local address: {e}"),
        }
        let s = shared.clone();
        crate::metrics::serve(
            l,
            Arc::new(move || {
                let loans = s.env.loans.lent();
                let lent: Vec<crate::metrics::Lent> = loans
                    .iter()
                    .map(|(policy, bytes)| crate::metrics::Lent {
                        policy,
                        bytes: *bytes,
                    })
                    .collect();
                s.metrics.render(&lent)
            }),
        );
    }
    // Known before the first stall: a raise of the agent's own cgroup (or an ancestor)
    // then writes the limit before the journal (see LoanBook::lend).
    let own = own_cgroup(&shared, &cfg);
    if let Some(own) = &own {
        // Read again at a reload that fails (see Watcher::on_reload): opening a file
        // in the agent's own stuck cgroup fails, so its control files are opened now.
        shared.env.ctl.prepare(own);
    }
    shared.env.loans.set_own_cgroup(own.clone());
    // While a cgroup holding the agent is stuck, the pool does not grow, and that
    // cgroup's episodes go first.
    shared.dispatcher.set_own_cgroup(own.clone());
    if warn_if_inside_managed(&shared, own.as_ref()) {
        // A worker of its own for the stall the agent shares, started (and locked
        // below) before any stall: see episode::reserved_worker.
        let s = shared.clone();
        std::thread::Builder::new()
            .name("episode-own".into())
            .stack_size(crate::sys::THREAD_STACK)
            .spawn(move || episode::reserved_worker(s))?;
    }
    let locked = protect_self(&cfg);
    log::info!(
        "oomwake {} watching {} ({:?}), {} polic{}{}",
        env!("CARGO_PKG_VERSION"),
        shared.env.ctl.hierarchy().root().display(),
        shared.env.ctl.hierarchy().kind(),
        shared.policies().policies().len(),
        if shared.policies().policies().len() == 1 {
            "y"
        } else {
            "ies"
        },
        if cfg.dry_run { " (dry run)" } else { "" }
    );

    let mut watcher = Watcher::new(shared.clone(), &cfg, reload)?;
    if locked {
        // On top of what watching the hierarchy took (its heap was locked as it grew),
        // so that all of it is free for the episodes (see HEAP_RESERVE).
        crate::sys::reserve_heap(HEAP_RESERVE);
        if let Some((rss, locked)) = crate::sys::memory_footprint(&cfg.proc_root) {
            log::info!(
                "memory locked: {} KiB resident, {} KiB locked, {} watched",
                rss >> 10,
                locked >> 10,
                watcher.watched_count()
            );
        }
    }
    let res = watcher.run();

    // Shutdown, in order: episodes stop (no new step; waits are cut short and running
    // hooks killed), then loans are given back, then the agent exits. The slow part
    // runs on a thread so that a second SIGTERM/SIGINT can cut it short: what is not
    // given back by then stays in the journal for the next start.
    shared.stop.store(true, Ordering::SeqCst);
    shared.dispatcher.stop();
    let _ = stop_tx.send(());
    while !stopping.is_finished() {
        if watcher.stop_requested(Duration::from_millis(20)) {
            log::warn!(
                "second stop signal: exiting now; loans not given back stay in the journal for the next start"
            );
            watcher.write_status(false);
            // What is already queued for the audit log gets a moment, not more.
            let _ = shared.audit.flush(Duration::from_millis(200));
            crate::audit::flush_stderr(Duration::from_millis(200));
            std::process::exit(1);
        }
    }
    let _ = stopping.join();
    // v2 holds of memory.high go back too (the watcher owns them).
    watcher.release_holds("shutdown");
    watcher.write_status(false);
    drop(watcher);
    // The audit lines of the shutdown (restores) are written before the process exits,
    // unless the sink does not move (a pipe nobody reads): then exit anyway.
    if !shared.audit.flush(crate::audit::DRAIN_TIMEOUT) {
        log::warn!("the audit log did not drain at shutdown; lines may be lost");
    }
    res
}

/// The agent's own memory cgroup, from /proc/self/cgroup (None if not in the hierarchy).
fn own_cgroup(shared: &Shared, cfg: &Config) -> Option<cgroup::CgroupPath> {
    let text = std::fs::read(cfg.proc_root.join("self/cgroup")).ok()?;
    let h = shared.env.ctl.hierarchy();
    cgroup::parse::proc_memory_cgroup_bytes(&text).and_then(|p| h.from_proc_path(p))
}

/// Says loudly when the agent runs in a cgroup that a policy manages (itself or an
/// ancestor): it is not parked there (everything is locked) and a raise of that cgroup
/// writes the limit before the journal, but what needs new page cache there (the
/// audit file, status.json, the agent's log) waits for the headroom. True if it does.
fn warn_if_inside_managed(shared: &Shared, own: Option<&cgroup::CgroupPath>) -> bool {
    let Some(own) = own else {
        return false;
    };
    let policies = shared.policies();
    let mut cg = Some(own.clone());
    while let Some(c) = cg {
        let info = shared.container_info(&c);
        if !c.is_root() && policies.could_match(&c, info.as_deref().map(|m| &m.info)) {
            log::warn!(
                "the agent runs inside {own}, which a policy manages ({c}): at that cgroup's wall a raise writes the limit before its journal line, and the audit log, status and exec hooks wait for the headroom; run the agent in a cgroup of its own"
            );
            return true;
        }
        cg = c.parent();
    }
    false
}

/// Free heap kept resident for what runs during a stall, added once the hierarchy is
/// watched (malloc keeps it: see sys::tune_malloc). Measured with heaptrack at 1000
/// watched cgroups (release build): an episode through an exec hook, reclaim and a
/// kill peaks at about 18 KiB (16 KiB of it the victim scan's /proc reads), so the 16
/// workers at once need about 0.3 MiB; the event loop's status.json write during a
/// stall about 0.4 MiB (it grows with the watched cgroups); audit lines queued behind
/// a writer that cannot write some KiB each episode. 2 MiB is more than twice that.
/// More at once (the pool grows past 16 workers, thousands of watched cgroups) takes
/// fresh heap, which is locked as it is mapped, but can stall if the agent shares the
/// stuck cgroup.
const HEAP_RESERVE: usize = 2 << 20;

/// How long shutdown waits for running episodes to end their current step.
const EPISODES_STOP_WAIT: Duration = Duration::from_secs(5);

/// Waits (bounded) for the episodes to stop and the keeper to exit, then gives loans
/// back: nothing lends after this.
fn shut_down(shared: &Shared, keeper: std::thread::JoinHandle<()>) {
    let deadline = Instant::now() + EPISODES_STOP_WAIT;
    while shared.dispatcher.running_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = shared.dispatcher.running();
    if !left.is_empty() {
        log::warn!(
            "episodes still running after {EPISODES_STOP_WAIT:?} at shutdown: {}",
            left.iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = keeper.join();
    loan::keeper::restore_all(shared);
}

/// The agent must not be stalled or killed itself: lock memory, shield from the kernel
/// OOM killer (best effort; both need privileges); and it needs a descriptor per cgroup.
/// True if memory is locked (the caller then adds the heap reserve once the hierarchy
/// is watched).
fn protect_self(cfg: &Config) -> bool {
    let mut locked = false;
    if cfg.mlock {
        // Everything a rescue needs must be resident before the first stall: the agent
        // may share the stuck cgroup, where a new page would park it in the same wait.
        // The worker pool's minimum, the keeper and the writer threads exist already
        // (their stacks, sys::THREAD_STACK each, get locked whole); the main thread's
        // stack gets a reserve for the loop. Whatever is mapped later (the watcher's
        // heap, the holder's stack) is populated and locked as it is mapped.
        crate::sys::reserve_stack();
        match crate::sys::mlockall() {
            Ok(()) => locked = true,
            Err(e) => log::warn!(
                "mlockall failed ({e}); the agent may be slowed by reclaim, and stalled if it shares a stuck cgroup"
            ),
        }
    }
    // One eventfd per watched cgroup: a host with thousands of cgroups needs more than
    // the usual soft limit of 1024 descriptors.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        // Hooks get the limit the agent started with, not the raised one.
        crate::sys::spawn::remember_nofile_soft(soft);
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
    }
    let adj = cfg.proc_root.join("self/oom_score_adj");
    if let Err(e) = std::fs::write(&adj, "-1000") {
        log::warn!(
            "{}: {e}: the kernel OOM killer may choose the agent itself",
            adj.display()
        );
    }
    locked
}
