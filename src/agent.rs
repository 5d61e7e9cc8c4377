//! Wiring: builds the [`Shared`] state, starts the event loop, the episode workers and
//! the loan keeper, and runs the agent's start-up (journal recovery) and shutdown (give
//! loans back).

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::action::{raise::Restore, raise::TickEvent, Env, LoanBook};
use crate::audit::{Audit, Record};
use crate::cgroup::{self, Hierarchy};
use crate::config::Config;
use crate::dispatcher::Dispatcher;
use crate::episode;
use crate::journal::{Journal, LoanRecord};
use crate::metrics::Metrics;
use crate::policy::PolicySet;
use crate::shared::Shared;
use crate::watch::Watcher;

/// Loads config-driven policies (`--dry-run` turns them all to audit).
pub fn load_policies(cfg: &Config) -> Result<PolicySet, String> {
    let set = crate::policy::load_dir(&cfg.policies).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok(if cfg.dry_run { set.all_audit() } else { set })
}

/// Runs the agent until SIGTERM/SIGINT. `reload` re-reads config and policies on SIGHUP.
pub fn run(
    cfg: Config,
    policies: PolicySet,
    reload: Box<dyn Fn() -> Result<PolicySet, String> + Send>,
) -> anyhow::Result<()> {
    let h = Hierarchy::detect(&cfg.cgroup_root, &cfg.proc_root)?;
    let ctl = cgroup::open(h)?;
    let journal = Journal::open(&cfg.state_dir)?;
    let recs = journal
        .load()
        .with_context(|| "cannot read the journal of lent limits; refusing to start")?;
    let audit = match &cfg.audit_log {
        Some(p) => Audit::file(p)?,
        None => Audit::stderr(),
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        env: Env {
            ctl,
            proc_root: cfg.proc_root.clone(),
            self_pid: crate::sys::getpid(),
            loans: LoanBook::new(Some(journal)),
        },
        audit,
        metrics: Metrics::default(),
        dispatcher: Dispatcher::new(tx, cfg.sweep_interval, cfg.workers, cfg.max_workers),
        policies: RwLock::new(Arc::new(policies)),
        settle_poll: cfg.settle_poll,
        stop: AtomicBool::new(false),
    });
    recover_loans(&shared, recs);
    // Start from a fresh snapshot and an empty log.
    shared.env.loans.compact();

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
                .stack_size(256 * 1024)
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
            .spawn(move || keeper(s, every))?
    };
    if let Some(addr) = cfg.metrics {
        let l = TcpListener::bind(addr).with_context(|| format!("binding metrics on {addr}"))?;
        let s = shared.clone();
        crate::metrics::serve(
            l,
            Arc::new(move || s.metrics.render(s.env.loans.lent_bytes())),
        );
    }
    protect_self(&cfg);
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
    let res = watcher.run();

    // Shutdown: no new episodes; give every loan back where usage allows.
    shared.stop.store(true, Ordering::SeqCst);
    for (cg, r) in shared.env.loans.restore_all(shared.env.ctl.as_ref()) {
        match r {
            Ok(Restore::Restored { old, new }) => shared.audit.log(
                Record::new("restore", &cg)
                    .with("old_limit", old)
                    .with("new_limit", new)
                    .with("reason", "shutdown"),
            ),
            Ok(Restore::Busy) => log::warn!(
                "{cg}: usage is still above the original limit; the loan stays in the journal and is restored at the next start"
            ),
            Ok(other) => log::info!("{cg}: loan dropped at shutdown: {other:?}"),
            Err(e) => log::error!("{cg}: restoring at shutdown failed: {e}; kept in the journal"),
        }
    }
    watcher.write_status(false);
    drop(watcher);
    let _ = keeper.join();
    // Workers may be inside a long grace; they hold no state that must be saved.
    res
}

/// At start, every journaled loan is either given back (hold expired, or the
/// cgroup's limit no longer what we lent) or re-adopted with its remaining hold.
fn recover_loans(shared: &Shared, recs: Vec<LoanRecord>) {
    if recs.is_empty() {
        return;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (expired, live): (Vec<_>, Vec<_>) = recs
        .into_iter()
        .partition(|r| r.hold_until_unix_ms <= now_ms);
    let loans = &shared.env.loans;
    loans.adopt(live.clone());
    loans.adopt(expired.clone());
    for r in &live {
        log::info!(
            "re-adopted the loan on {} ({} -> {} bytes)",
            r.cgroup,
            r.original.memory,
            r.lent.memory
        );
    }
    for r in expired {
        match loans.restore(shared.env.ctl.as_ref(), &r.cgroup) {
            Ok(Restore::Restored { old, new }) => shared.audit.log(
                Record::new("restore", &r.cgroup)
                    .with("old_limit", old)
                    .with("new_limit", new)
                    .with("reason", "startup"),
            ),
            Ok(Restore::Busy) => log::warn!(
                "{}: hold expired while the agent was down and usage is above the original limit; keeping the loan",
                r.cgroup
            ),
            Ok(other) => log::info!("{}: journaled loan dropped: {other:?}", r.cgroup),
            Err(e) => log::error!("{}: restoring journaled loan failed: {e}", r.cgroup),
        }
    }
}

/// The loan keeper: gives headroom back and resumes episodes whose hold expired.
fn keeper(shared: Arc<Shared>, every: Duration) {
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(every);
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        for ev in shared
            .env
            .loans
            .tick(shared.env.ctl.as_ref(), Instant::now())
        {
            match ev {
                TickEvent::Restored {
                    cgroup,
                    old,
                    new,
                    reason,
                } => shared.audit.log(
                    Record::new("restore", &cgroup)
                        .with("old_limit", old)
                        .with("new_limit", new)
                        .with("reason", reason),
                ),
                TickEvent::Resume {
                    cgroup,
                    policy,
                    episode,
                    step,
                } => {
                    let set = shared.policies();
                    let p = set.policies().iter().find(|p| p.name == policy).cloned();
                    match p {
                        Some(p) if step < p.steps.len() => {
                            shared.dispatcher.resume(&cgroup, p, episode, step);
                        }
                        Some(_) => log::warn!(
                            "{cgroup}: hold expired, usage above the original limit, and policy {policy} has no step after raise_limit; retrying the restore"
                        ),
                        None => log::warn!(
                            "{cgroup}: hold expired but policy {policy} is gone; retrying the restore"
                        ),
                    }
                }
                TickEvent::Dropped { cgroup, why } => {
                    log::warn!("{cgroup}: loan dropped: {why}");
                }
            }
        }
    }
}

/// The agent must not be stalled or killed itself: lock memory, shield from the kernel
/// OOM killer (best effort; both need privileges); and it needs a descriptor per cgroup.
fn protect_self(cfg: &Config) {
    if cfg.mlock {
        if let Err(e) = crate::sys::mlockall() {
            log::warn!("mlockall failed ({e}); the agent may be slowed by reclaim");
        }
    }
    // One eventfd per watched cgroup: a host with thousands of cgroups needs more than
    // the usual soft limit of 1024 descriptors.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
    }
    let adj = cfg.proc_root.join("self/oom_score_adj");
    if let Err(e) = std::fs::write(&adj, "-1000") {
        log::debug!("{}: {e}", adj.display());
    }
}
