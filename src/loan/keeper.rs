//! The agent-facing side of loans: recovery of journaled loans at start, the keeper
//! thread that gives headroom back (and resumes episodes whose hold expired), the
//! restores at shutdown, and the one builder of the `restore` audit line.
//!
//! In a dry run (`--dry-run`) nothing here writes: loans found in the journal are kept
//! as they are, in the journal and in the cgroups, and the audit log says what would be
//! given back (`restore` with `outcome` "would").

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{resume_step, GivenUp, Restore, TickEvent};
use crate::audit::Record;
use crate::cgroup::CgroupPath;
use crate::journal::Recovered;
use crate::policy::Mode;
use crate::shared::Shared;

/// The `restore` audit line: a loan given back.
pub fn restore_record(cg: &CgroupPath, old: u64, new: u64, reason: &str) -> Record {
    Record::new("restore", cg)
        .with("old_limit", old)
        .with("new_limit", new)
        .with("reason", reason)
}

fn given_up_record(g: &GivenUp) -> Record {
    Record::new("loan_given_up", &g.cgroup)
        .with("original_limit", g.original)
        .with("lent_limit", g.lent)
        .with(
            "current_limit",
            g.current
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::Null),
        )
        .with("reason", g.why)
}

/// Audits the loans the book gave up since the last call.
fn audit_given_up(shared: &Shared) {
    for g in shared.env.loans.take_given_up() {
        shared.audit.log(given_up_record(&g));
    }
}

/// At start: reports a damaged journal loudly (log, audit line, status), then checks
/// every journaled loan against the kernel: given back when its hold expired (and the
/// workload fits) or a restore got half way, re-adopted with its remaining hold
/// otherwise. Ends with a fresh snapshot of what is left.
pub fn recover(shared: &Shared, found: Recovered) {
    let loans = &shared.env.loans;
    for d in &found.damage {
        log::error!(
            "the journal of lent limits {} is damaged ({}); {} unreadable part(s) left out, {}; starting with what could be read",
            d.file.display(),
            d.error,
            d.skipped,
            match &d.moved_to {
                Some(p) => format!("the file is moved to {}", p.display()),
                None => "the file is left as it is (dry run)".to_string(),
            }
        );
        shared.audit.log(
            Record::new("journal_corrupt", &CgroupPath::root())
                .with("file", d.file.display().to_string())
                .with(
                    "moved_to",
                    d.moved_to
                        .as_ref()
                        .map(|p| serde_json::Value::from(p.display().to_string()))
                        .unwrap_or(serde_json::Value::Null),
                )
                .with("error", d.error.clone())
                .with("skipped", d.skipped)
                .with("loans_recovered", found.loans.len()),
        );
    }
    loans.set_journal_damage(found.damage);
    let ctl = shared.env.ctl.as_ref();
    let cgroups: Vec<CgroupPath> = found.loans.iter().map(|r| r.cgroup.clone()).collect();
    loans.adopt(found.loans);
    let now = Instant::now();
    for cg in cgroups {
        if loans.is_read_only() {
            let what = match loans.restore(ctl, &cg) {
                Ok(Restore::Would { old, new }) => {
                    let rec = restore_record(&cg, old, new, "startup")
                        .with("mode", "audit")
                        .with("outcome", "would");
                    shared.audit.log(rec);
                    "would give it back; dry run: kept as it is"
                }
                _ => "dry run: kept as it is",
            };
            log::info!("{cg}: journaled loan found; {what}");
            continue;
        }
        if !loans.reconcile(ctl, &cg) {
            continue;
        }
        if !loans.hold_expired(&cg, now) && !loans.restore_in_flight(&cg) {
            if let Some(o) = loans.original(&cg) {
                log::info!(
                    "re-adopted the loan on {cg} (original limit {} bytes)",
                    o.memory
                );
            }
            continue;
        }
        match loans.restore(ctl, &cg) {
            Ok(Restore::Restored { old, new }) => {
                shared
                    .audit
                    .log(restore_record(&cg, old, new, "startup"))
            }
            Ok(Restore::DoesNotFit) | Ok(Restore::MemoryOnly { .. }) => log::warn!(
                "{cg}: hold expired while the agent was down and usage does not fit the original limit; keeping the loan (the keeper resumes its episode)"
            ),
            Ok(other) => log::info!("{cg}: journaled loan: {other:?}"),
            Err(e) => log::error!("{cg}: restoring journaled loan failed: {e}"),
        }
    }
    audit_given_up(shared);
    // Start from a fresh snapshot and an empty log.
    loans.rewrite_snapshot();
}

/// What a resumed episode learns from trying to give the loan back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// Given back (or nothing left to give back): the episode is over.
    Yes,
    /// The workload does not fit under the original limit yet.
    NotYet,
    Gone,
}

/// The check of an episode resumed at hold expiry: gives the loan back once usage fits
/// (below `restore_below` of the original), and says so in the audit log.
pub fn give_back_resumed(shared: &Shared, cg: &CgroupPath) -> Returned {
    let r = shared.env.loans.restore(shared.env.ctl.as_ref(), cg);
    audit_given_up(shared);
    match r {
        Ok(Restore::Restored { old, new }) => {
            shared
                .audit
                .log(restore_record(cg, old, new, "hold_expired"));
            Returned::Yes
        }
        // Memory is back (the workload fits); the keeper finishes memsw.
        Ok(Restore::MemoryOnly { .. }) => Returned::Yes,
        Ok(Restore::DoesNotFit) => Returned::NotYet,
        Ok(Restore::Gone) => Returned::Gone,
        Ok(Restore::GivenUp { .. }) | Ok(Restore::NoLoan) | Ok(Restore::Would { .. }) => {
            Returned::Yes
        }
        Err(e) => {
            log::warn!("{cg}: restore failed: {e}");
            Returned::NotYet
        }
    }
}

/// The keeper thread: gives headroom back and resumes episodes whose hold expired.
pub fn run(shared: Arc<Shared>, every: Duration) {
    let live = &shared.dispatcher.liveness;
    live.keeper_started(every);
    while !shared.stop.load(Ordering::SeqCst) {
        live.keeper_beat();
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
                } => shared.audit.log(restore_record(&cgroup, old, new, reason)),
                TickEvent::Resume {
                    cgroup,
                    policy,
                    episode,
                    step,
                } => resume(&shared, &cgroup, &policy, episode, step),
                TickEvent::GivenUp(g) => shared.audit.log(given_up_record(&g)),
            }
        }
    }
}

/// Resumes the episode of a loan whose hold expired with a workload that does not fit.
/// The loan belongs to the cgroup, not to a policy name: the policy is the one that
/// matches the cgroup now (a reload may have renamed, changed or removed the one that
/// lent), chosen with the container's metadata as known now (a policy may match by
/// name, label or image), and the step the one after its `raise_limit`. With no such
/// policy or step, or an audit-mode policy, the keeper gives the loan back as soon as
/// the workload fits. When the metadata is unknown and a policy keyed on it could
/// apply, the resumed episode waits for it and otherwise runs audit-only
/// ([`crate::identity`]); the keeper asks again at the next expiry.
fn resume(shared: &Shared, cg: &CgroupPath, lent_by: &str, episode: u64, journaled: usize) {
    let set = shared.policies();
    let kill_disabled = shared.kill_disabled(cg);
    let meta = shared.container_info(cg);
    let info = meta.as_deref().map(|m| &m.info);
    let Some(p) = set.select(cg, kill_disabled, info).cloned() else {
        let unknown = crate::container::docker_id(cg.as_bytes())
            .filter(|id| info.is_none() && !shared.containers.is_absent(id))
            .filter(|_| {
                set.outranking_container_policy(cg, kill_disabled, None)
                    .is_some()
            });
        match &unknown {
            Some(id) => log::warn!(
                "{cg}: hold expired, usage does not fit the original limit, and the container's metadata is unknown ({}), so no policy keyed on it can be chosen (it was {lent_by}); asking again at the next expiry, and the loan is given back once the workload fits",
                shared.containers.unknown_reason(id)
            ),
            None => log::warn!(
                "{cg}: hold expired, usage does not fit the original limit, and no policy matches the cgroup any more (it was {lent_by}); the loan is given back once the workload fits"
            ),
        }
        if let Some(id) = unknown {
            shared.containers.request(&id);
        }
        return;
    };
    if p.mode == Mode::Audit {
        log::warn!(
            "{cg}: hold expired, usage does not fit the original limit; policy {} is in audit mode, so no step runs; the loan is given back once the workload fits",
            p.name
        );
        return;
    }
    let Some(step) = resume_step(&p, journaled) else {
        log::warn!(
            "{cg}: hold expired, usage does not fit the original limit, and policy {} has no step after raise_limit; the loan is given back once the workload fits",
            p.name
        );
        return;
    };
    if p.name != lent_by || step != journaled {
        log::info!(
            "{cg}: resuming with policy {} at step {step} (the loan was made by {lent_by}, to resume at step {journaled})",
            p.name
        );
    }
    shared.dispatcher.resume(cg, p, episode, step);
}

/// At shutdown: gives every loan back where usage allows; what does not fit stays in
/// the journal for the next start. A dry run gives nothing back.
pub fn restore_all(shared: &Shared) {
    if shared.env.loans.is_read_only() {
        return;
    }
    for (cg, r) in shared.env.loans.restore_all(shared.env.ctl.as_ref()) {
        match r {
            Ok(Restore::Restored { old, new }) => {
                shared.audit.log(restore_record(&cg, old, new, "shutdown"))
            }
            Ok(Restore::DoesNotFit) => log::warn!(
                "{cg}: usage does not fit the original limit; the loan stays in the journal and is restored at the next start"
            ),
            Ok(Restore::MemoryOnly { .. }) => log::warn!(
                "{cg}: memory is back at the original limit but the kernel refused memsw; the loan stays in the journal and the next start finishes it"
            ),
            Ok(other) => log::info!("{cg}: loan at shutdown: {other:?}"),
            Err(e) => log::error!("{cg}: restoring at shutdown failed: {e}; kept in the journal"),
        }
    }
    audit_given_up(shared);
    shared.env.loans.fsync_and_compact_if_long();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{Containers, Meta};
    use crate::policy::{load_str, ContainerInfo, Policy};

    const ID: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    const LEND_THEN: &str = "[[step]]\naction='raise_limit'\nby='50%'\nmax_extra='100%'\nhold='1s'\n[[step]]\naction='kill'\n";

    fn policies(catch_all: bool) -> Vec<Policy> {
        let mut v = vec![load_str(
            &format!("name='db'\npriority=50\n[match]\ncontainer_name=['db-*']\n{LEND_THEN}"),
            "db.toml",
        )
        .unwrap()];
        if catch_all {
            v.push(
                load_str(
                    &format!("name='all'\npriority=0\n[match]\ncgroup=['/docker/*']\n{LEND_THEN}"),
                    "all.toml",
                )
                .unwrap(),
            );
        }
        v
    }

    /// A fake tree with the container's cgroup, a shared state on it, and the
    /// dispatcher's job queue.
    fn setup(
        containers: Containers,
        catch_all: bool,
    ) -> (
        tempfile::TempDir,
        Shared,
        crossbeam_channel::Receiver<crate::dispatcher::Job>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("memory");
        crate::shared::fake_container_cgroup(&root, ID, false);
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Shared::for_test(
            dir.path(),
            &root,
            policies(catch_all),
            Arc::new(containers),
            tx,
            Duration::from_millis(100),
        );
        (dir, shared, rx)
    }

    fn db_meta() -> Meta {
        Meta {
            id: ID.into(),
            info: ContainerInfo {
                name: "db-1".into(),
                ..Default::default()
            },
        }
    }

    /// Issue 16.4: at hold expiry, the episode of a workload whose policy matches by
    /// container name resumes under that policy (not "no policy matches", nor the
    /// catch-all), with the metadata the cache has.
    #[test]
    fn hold_expiry_resumes_under_the_policy_that_matches_by_container_name() {
        let cg = CgroupPath::new(&format!("/docker/{ID}"));
        for catch_all in [false, true] {
            let (_d, shared, rx) = setup(Containers::fixed(vec![db_meta()]), catch_all);
            resume(&shared, &cg, "db", 7, 1);
            let job = rx
                .try_recv()
                .unwrap_or_else(|_| panic!("no episode resumed (catch-all {catch_all})"));
            assert_eq!(job.policy.name, "db", "catch-all {catch_all}");
            assert_eq!((job.episode, job.start_step, job.resume), (7, 1, true));
        }
    }

    /// Unknown metadata at hold expiry: with no other policy, nothing resumes (asked
    /// again at the next expiry); with a catch-all, its episode resumes but runs
    /// audit-only (crate::identity), never its kill.
    #[test]
    fn hold_expiry_with_unknown_metadata_fails_closed() {
        let cg = CgroupPath::new(&format!("/docker/{ID}"));
        let (_d, shared, rx) = setup(Containers::detached().unwrap(), false);
        resume(&shared, &cg, "db", 7, 1);
        assert!(rx.try_recv().is_err());

        let (_d, shared, rx) = setup(Containers::detached().unwrap(), true);
        resume(&shared, &cg, "db", 7, 1);
        let job = rx.try_recv().expect("the catch-all's episode is resumed");
        assert_eq!(job.policy.name, "all");
        let s = crate::identity::settle(&shared, &cg, &job.policy, shared.metadata_wait, &|| false);
        assert_eq!(s.policy.mode, Mode::Audit, "the catch-all must not act");
        assert_eq!(s.unknown.map(|u| u.outranked_by).as_deref(), Some("db"));
    }
}
