//! Fail closed on an unknown container identity (issue 16.2, 16.4). A policy keyed on
//! container metadata (`container_name`, `label`, `image`) can only match once the
//! engine has described the container; until then [`PolicySet::select`] gives the next
//! policy down, often a catch-all that kills. When such a higher-priority policy could
//! match the cgroup by its path and the metadata is not known, an episode first waits
//! (at most `container_metadata_wait`, 2 s by default) for the metadata, choosing again
//! with it if it comes; if it does not, the episode runs audit-only (every step reports
//! `would`) and its `oom` line says `"metadata": "unknown"` with why. The stall is left
//! held and retried like any unresolved one (the retry is due at once when the
//! metadata arrives), so the right policy acts as soon as the engine answers.
//!
//! The choice of audit-only for the whole episode, rather than letting the lower
//! policy's "harmless" steps (reclaim, raise_limit) run: the higher policy may be in
//! audit mode, or lend less, or set other ceilings; nothing the lower one does is known
//! to be what the operator chose for that workload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cgroup::CgroupPath;
use crate::policy::{Mode, Policy};
use crate::shared::Shared;

/// How often the cache is looked at while waiting for a container's metadata.
const POLL: Duration = Duration::from_millis(5);

/// The metadata was still unknown when the wait ended.
#[derive(Debug, Clone)]
pub struct Unknown {
    /// Why (the engine does not answer, or has not described the container).
    pub reason: String,
    /// The container-keyed policy that could have applied.
    pub outranked_by: String,
    /// The policy selection gave without the metadata (now audit-only).
    pub fallback: String,
}

/// The policy an episode runs with, after the metadata question.
#[derive(Debug, Clone)]
pub struct Settled {
    pub policy: Arc<Policy>,
    /// How long the episode waited for the metadata (None: it did not wait).
    pub waited: Option<Duration>,
    pub unknown: Option<Unknown>,
}

impl Settled {
    fn as_is(policy: &Arc<Policy>) -> Settled {
        Settled {
            policy: policy.clone(),
            waited: None,
            unknown: None,
        }
    }

    /// The fields an audit line carries about it (none when nothing was waited for).
    pub fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(w) = self.waited {
            let ms = (w.as_secs_f64() * 1e6).round() / 1e3;
            m.insert("metadata_wait_ms".into(), ms.into());
        }
        if let Some(u) = &self.unknown {
            m.insert("metadata".into(), "unknown".into());
            m.insert("metadata_reason".into(), u.reason.clone().into());
            m.insert("outranked_by".into(), u.outranked_by.clone().into());
            m.insert("fallback_policy".into(), u.fallback.clone().into());
        }
        m
    }
}

/// The policy for an episode of `cg` that was handed `policy` (chosen with what was
/// known then): the same when no container-keyed policy could outrank it; the one chosen with the container's metadata when known (at once
/// or within `wait`); otherwise `policy` in audit mode, with why. `stopping` ends the
/// wait early. Waits on the calling thread (an episode worker or the keeper, never the
/// event loop).
pub fn settle(
    shared: &Shared,
    cg: &CgroupPath,
    policy: &Arc<Policy>,
    wait: Duration,
    stopping: &dyn Fn() -> bool,
) -> Settled {
    let containers = &shared.containers;
    let as_is = || Settled::as_is(policy);
    let set = shared.policies();
    // The common case, no policy keyed on container metadata: nothing read, nothing
    // allocated before the first step.
    if !set.policies().iter().any(|p| p.matcher.needs_container()) {
        return as_is();
    }
    // Only the Docker engine describes containers: one of containerd or CRI-O has no
    // metadata to wait for, and no policy keyed on it can match (as with no engine).
    let Some(id) = crate::container::docker_id(cg.as_bytes()) else {
        return as_is();
    };
    let kill_disabled = shared.kill_disabled(cg);
    let Some(over) = set
        .outranking_container_policy(cg, kill_disabled, Some(&**policy))
        .map(|p| p.name.clone())
    else {
        return as_is();
    };
    let start = Instant::now();
    let mut asked = false;
    loop {
        if let Some(meta) = containers.get(&id) {
            let chosen = set.select(cg, kill_disabled, Some(&meta.info)).cloned();
            let waited = asked.then(|| start.elapsed());
            return Settled {
                policy: chosen.unwrap_or_else(|| policy.clone()),
                waited,
                unknown: None,
            };
        }
        if containers.is_absent(&id) {
            // The engine said it has no such container: its metadata will not come,
            // and no policy keyed on it can match; the choice stands.
            return Settled {
                policy: policy.clone(),
                waited: asked.then(|| start.elapsed()),
                unknown: None,
            };
        }
        if !containers.enabled() {
            // No engine (a fixed listing, or none): what is not known now never will be,
            // and policies keyed on it never match (as `check` warns); nothing to wait for.
            return as_is();
        }
        if !asked {
            // The lookup may have been dropped from a full queue: ask again.
            containers.request(&id);
            asked = true;
        }
        let elapsed = start.elapsed();
        if elapsed >= wait || stopping() {
            break;
        }
        std::thread::sleep(POLL.min(wait - elapsed));
    }
    let reason = containers.unknown_reason(&id);
    let waited = Some(start.elapsed());
    log::warn!(
        "{cg}: container metadata unknown after {:?} ({reason}); policy {over} may apply, so {} runs audit-only",
        start.elapsed(),
        policy.name
    );
    let mut audit_only = Policy::clone(policy);
    audit_only.mode = Mode::Audit;
    Settled {
        policy: Arc::new(audit_only),
        waited,
        unknown: Some(Unknown {
            reason,
            outranked_by: over,
            fallback: policy.name.clone(),
        }),
    }
}

/// True when a v2 hold of `policy` on `cg` must wait: the container's metadata is not
/// known yet (and may still come) and a policy keyed on it could outrank `policy`. The
/// watcher makes the hold once the metadata is known, or the engine says it has no
/// such container.
pub fn hold_waits_for_metadata(
    shared: &Shared,
    cg: &CgroupPath,
    policy: &Policy,
    kill_disabled: bool,
) -> bool {
    let containers = &shared.containers;
    let set = shared.policies();
    if !containers.enabled() || !set.policies().iter().any(|p| p.matcher.needs_container()) {
        return false;
    }
    let Some(id) = crate::container::docker_id(cg.as_bytes()) else {
        return false;
    };
    containers.get(&id).is_none()
        && !containers.is_absent(&id)
        && set
            .outranking_container_policy(cg, kill_disabled, Some(policy))
            .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{Containers, Meta};
    use crate::policy::{load_str, ContainerInfo};

    const ID: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    /// Issue 16.2's pair: `db` by container name, audit only, above a catch-all that
    /// kills.
    fn policies() -> Vec<Policy> {
        vec![
            load_str(
                "name='all'\npriority=0\n[match]\ncgroup=['/docker/*']\n[[step]]\naction='kill'\n",
                "all.toml",
            )
            .unwrap(),
            load_str(
                "name='db'\nmode='audit'\npriority=50\n[match]\ncontainer_name=['db-*']\n[[step]]\naction='kill'\n",
                "db.toml",
            )
            .unwrap(),
        ]
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

    struct Fixture {
        _dir: tempfile::TempDir,
        shared: Shared,
        cg: CgroupPath,
    }

    fn fixture(containers: Containers) -> Fixture {
        fixture_at(containers, &format!("/docker/{ID}"), policies())
    }

    fn fixture_at(containers: Containers, cg: &str, policies: Vec<Policy>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("memory");
        crate::shared::fake_cgroup(&root, cg, true);
        let (tx, _rx) = crossbeam_channel::unbounded();
        let shared = Shared::for_test(
            dir.path(),
            &root,
            policies,
            Arc::new(containers),
            tx,
            Duration::from_secs(2),
        );
        Fixture {
            _dir: dir,
            shared,
            cg: CgroupPath::new(cg),
        }
    }

    fn chosen(f: &Fixture) -> Arc<Policy> {
        f.shared
            .policies()
            .select(&f.cg, true, None)
            .cloned()
            .unwrap()
    }

    /// Without the name, selection gives the catch-all; the episode must not act with
    /// it: after the bounded wait it runs audit-only and says why.
    #[test]
    fn unknown_metadata_under_a_container_keyed_policy_is_audit_only_after_a_bounded_wait() {
        let f = fixture(Containers::detached().unwrap());
        let all = chosen(&f);
        assert_eq!((all.name.as_str(), all.mode), ("all", Mode::Enforce));
        let t = Instant::now();
        let s = settle(&f.shared, &f.cg, &all, Duration::from_millis(100), &|| {
            false
        });
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(s.policy.name, "all");
        assert_eq!(s.policy.mode, Mode::Audit, "the catch-all must not act");
        let u = s.unknown.as_ref().expect("metadata unknown");
        assert_eq!(u.outranked_by, "db");
        assert_eq!(u.fallback, "all");
        let fields = s.fields();
        assert_eq!(fields["metadata"], "unknown");
        assert!(
            fields["metadata_reason"]
                .as_str()
                .is_some_and(|r| r.contains("Docker engine")),
            "{fields:?}"
        );
        assert!(fields["metadata_wait_ms"].as_f64().unwrap() >= 100.0);
        // The job's own policy is left as it was (the dispatcher retries the stall).
        assert_eq!(all.mode, Mode::Enforce);
    }

    /// Metadata that arrives during the wait decides: the container-keyed policy runs.
    #[test]
    fn metadata_that_arrives_during_the_wait_chooses_the_policy() {
        let f = fixture(Containers::detached().unwrap());
        let all = chosen(&f);
        let containers = f.shared.containers.clone();
        let put = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            containers.put(db_meta());
        });
        let s = settle(&f.shared, &f.cg, &all, Duration::from_secs(10), &|| false);
        put.join().unwrap();
        assert_eq!(s.policy.name, "db");
        assert!(s.unknown.is_none());
        let w = s.waited.expect("it waited");
        assert!(
            w >= Duration::from_millis(40) && w < Duration::from_secs(10),
            "{w:?}"
        );
    }

    /// Known metadata: no wait, the policy it selects (also when the job was handed the
    /// catch-all before the name was known).
    #[test]
    fn known_metadata_is_used_at_once() {
        for f in [
            fixture(Containers::fixed(vec![db_meta()])),
            fixture({
                let c = Containers::detached().unwrap();
                c.put(db_meta());
                c
            }),
        ] {
            let all = chosen(&f);
            let t = Instant::now();
            let s = settle(&f.shared, &f.cg, &all, Duration::from_secs(10), &|| false);
            assert!(t.elapsed() < Duration::from_secs(1));
            assert_eq!(s.policy.name, "db");
            assert!(s.waited.is_none() && s.unknown.is_none());
            assert!(s.fields().is_empty());
        }
        // No engine at all (disabled): nothing is waited for, the choice stands.
        let f = fixture(Containers::disabled());
        let all = chosen(&f);
        let s = settle(&f.shared, &f.cg, &all, Duration::from_secs(10), &|| false);
        assert!(Arc::ptr_eq(&s.policy, &all) && s.waited.is_none());
    }

    /// Nothing to wait for: not a container's cgroup, or no container-keyed policy
    /// above; a stop request ends the wait early.
    #[test]
    fn no_wait_where_no_container_keyed_policy_could_apply() {
        let f = fixture(Containers::detached().unwrap());
        let all = chosen(&f);
        let other = CgroupPath::new("/docker/not-a-container");
        let s = settle(&f.shared, &other, &all, Duration::from_secs(10), &|| false);
        assert_eq!((s.policy.mode, s.waited.is_none()), (Mode::Enforce, true));
        let db = f
            .shared
            .policies()
            .policies()
            .iter()
            .find(|p| p.name == "db")
            .cloned()
            .unwrap();
        let s = settle(&f.shared, &f.cg, &db, Duration::from_secs(10), &|| false);
        assert!(Arc::ptr_eq(&s.policy, &db) && s.waited.is_none());
        let t = Instant::now();
        let s = settle(&f.shared, &f.cg, &all, Duration::from_secs(10), &|| true);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(s.policy.mode, Mode::Audit);
    }

    /// `db` by name above a catch-all of every pod's containers.
    fn kube_policies() -> Vec<Policy> {
        vec![
            load_str(
                "name='all'\npriority=0\n[match]\ncgroup=['/kubepods/**']\n[[step]]\naction='kill'\n",
                "all.toml",
            )
            .unwrap(),
            load_str(
                "name='db'\nmode='audit'\npriority=50\n[match]\ncontainer_name=['db-*']\n[[step]]\naction='kill'\n",
                "db.toml",
            )
            .unwrap(),
        ]
    }

    /// A containerd or CRI-O container (a Kubernetes node that also runs Docker, or
    /// follows the default socket): the Docker engine never describes it, so no policy
    /// keyed on container metadata can match it. Its stall waited 2 s and ran
    /// audit-only at every retry: never rescued.
    #[test]
    fn a_container_docker_never_describes_is_not_held_for_its_metadata() {
        for cg in [
            format!("/kubepods/burstable/pod0a1b2c3d-0000-4000-8000-000000000001/cri-containerd-{ID}.scope"),
            format!("/kubepods/besteffort/pod0a1b2c3d-0000-4000-8000-000000000001/crio-{ID}.scope"),
        ] {
            let f = fixture_at(Containers::detached().unwrap(), &cg, kube_policies());
            let all = chosen(&f);
            assert_eq!(all.name, "all");
            let t = Instant::now();
            let s = settle(&f.shared, &f.cg, &all, Duration::from_millis(300), &|| false);
            assert!(t.elapsed() < Duration::from_millis(250), "{cg}: {:?}", t.elapsed());
            assert_eq!(s.policy.mode, Mode::Enforce, "{cg}");
            assert!(s.unknown.is_none() && s.waited.is_none(), "{cg}");
        }
        // A bare id below kubepods may be Docker's (dockershim): waited for.
        let cg = format!("/kubepods/besteffort/pod0a1b2c3d-0000-4000-8000-000000000001/{ID}");
        let f = fixture_at(Containers::detached().unwrap(), &cg, kube_policies());
        let s = settle(
            &f.shared,
            &f.cg,
            &chosen(&f),
            Duration::from_millis(50),
            &|| false,
        );
        assert_eq!(s.policy.mode, Mode::Audit);
    }

    /// The engine answered that it has no such container (404: a cgroup named like
    /// one of its containers that it did not make, or one already removed): nothing
    /// keyed on its metadata can match, the choice stands (before: audit-only at every
    /// retry, never rescued).
    #[test]
    fn a_container_the_engine_does_not_know_keeps_the_choice() {
        let f = fixture(Containers::detached().unwrap());
        let all = chosen(&f);
        let containers = f.shared.containers.clone();
        let answer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            containers.set_absent(ID);
        });
        let t = Instant::now();
        let s = settle(&f.shared, &f.cg, &all, Duration::from_secs(10), &|| false);
        answer.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(
            (s.policy.name.as_str(), s.policy.mode),
            ("all", Mode::Enforce)
        );
        assert!(s.unknown.is_none());
        // Described later (created again by that id): the container-keyed policy.
        f.shared.containers.put(db_meta());
        assert!(!f.shared.containers.is_absent(ID));
        let s = settle(&f.shared, &f.cg, &all, Duration::from_secs(10), &|| false);
        assert_eq!(s.policy.name, "db");
    }
}
