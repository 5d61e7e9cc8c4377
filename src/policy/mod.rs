//! Policies: what to do when a cgroup stalls. The model here is what the rest of the
//! agent consumes; [`load`] turns TOML files into it with FILE:LINE:COL errors, and
//! [`PolicySet::select`] picks the policy for a cgroup (highest priority wins).

pub mod glob;
pub mod load;
pub mod units;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupPath;
pub use glob::Glob;
pub use load::{
    load_dir, load_dir_with, load_files, load_files_with, load_one, load_str, LoadError, Trust,
};
pub use units::Amount;

/// Enforce acts; audit only logs what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

/// One workload's policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub priority: i64,
    pub matcher: Match,
    pub steps: Vec<Step>,
    /// The file it came from, or `<embedded default>`.
    pub source: String,
    /// `[v2]`: keys that apply on a cgroup v2 hierarchy only.
    pub v2: V2Keys,
    /// `[early]`: act before the wall (None: only when the cgroup stalls).
    pub early: Option<Early>,
    /// `pinned`: run the steps for a stall the kernel never reports, a v1 cgroup pinned
    /// at its limit without an OOM ([`crate::pinned`]; default true). False: only OOMs
    /// (and `[early]`) start episodes.
    pub pinned: bool,
}

/// The `[early]` table: when usage crosses `at`, run `steps` so that the workload never
/// reaches its limit (v1: a usage threshold eventfd).
impl Policy {
    /// True if a step (an early one included) signals a process: the kill kit is kept
    /// for such a policy's cgroup when the agent shares it ([`crate::armed`]).
    pub fn signals(&self) -> bool {
        let early = self.early.iter().flat_map(|e| e.steps.iter());
        self.steps.iter().chain(early).any(|s| {
            matches!(
                s.action,
                Action::Kill { .. } | Action::Signal { .. } | Action::KillAll
            )
        })
    }
}

#[derive(Debug, Clone)]
pub struct Early {
    /// A share of the current limit (it moves with a loan), or a usage in bytes.
    pub at: Amount,
    pub steps: Vec<Step>,
}

impl Early {
    /// The usage at which the early steps run, given the cgroup's current limit. None
    /// when it could not fire before the wall (a size at or above the limit, an
    /// unlimited cgroup): the OOM episode alone covers the cgroup then.
    pub fn threshold(&self, limit: u64) -> Option<u64> {
        if crate::cgroup::parse::is_unlimited(limit) {
            return None;
        }
        // The kernel keeps thresholds in pages, rounded down.
        let page = crate::loan::kernel_page_size();
        let t = self.at.of(limit);
        let t = t - t % page;
        (t > 0 && t < limit).then_some(t)
    }
}

/// The `[v2]` table of a policy.
#[derive(Debug, Clone, Default)]
pub struct V2Keys {
    /// `hold_at`: memory.high oomwake sets while it watches (of memory.max, or a size).
    pub hold_at: Option<Amount>,
    /// `trigger`: a PSI trigger on memory.pressure that starts an episode.
    pub trigger: Option<crate::cgroup::v2::PsiTrigger>,
}

/// Container metadata a policy may match on (filled in by a metadata provider; absent
/// when none is configured).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
}

/// All given keys must match.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub cgroup: Vec<Glob>,
    pub container_name: Vec<Glob>,
    /// Label key = glob on its value (the key must be present).
    pub label: BTreeMap<String, String>,
    pub image: Vec<Glob>,
    /// v1: handle only cgroups with `oom_kill_disable 1` (default true).
    pub require_oom_kill_disable: bool,
}

impl Match {
    /// True if the policy's keys need container metadata to be evaluated.
    pub fn needs_container(&self) -> bool {
        !self.container_name.is_empty() || !self.label.is_empty() || !self.image.is_empty()
    }

    pub fn matches(&self, cg: &CgroupPath, container: Option<&ContainerInfo>) -> bool {
        if !self.cgroup.is_empty() && !self.cgroup.iter().any(|g| g.matches(cg.as_str())) {
            return false;
        }
        if !self.needs_container() {
            return true;
        }
        let Some(c) = container else {
            return false;
        };
        (self.container_name.is_empty()
            || self.container_name.iter().any(|g| g.matches_name(&c.name)))
            && (self.image.is_empty() || self.image.iter().any(|g| g.matches_name(&c.image)))
            && self
                .label
                .iter()
                .all(|(k, v)| c.labels.get(k).is_some_and(|l| glob::name_matches(v, l)))
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    pub action: Action,
    /// After the action, wait at most this long for recovery before the next step.
    pub settle: Duration,
}

#[derive(Debug, Clone)]
pub enum Action {
    /// v1 `memory.force_empty`, interrupted after `timeout`.
    Reclaim {
        timeout: Duration,
    },
    RaiseLimit(Raise),
    Signal {
        signal: i32,
        victim: VictimSpec,
        grace: Duration,
    },
    Kill {
        victim: VictimSpec,
    },
    KillAll,
    Exec {
        command: Vec<String>,
        timeout: Duration,
        /// How the program is judged before each run (`--insecure-policies`: not).
        trust: Trust,
    },
    DropCaches {
        level: u8,
    },
    /// Hands the stall to the kernel's own OOM killer for at most `timeout` (v1:
    /// `oom_kill_disable` 0, then 1 again; v2: the hold at `memory.high` lifted, then
    /// put back), and reports whom it killed ([`crate::action::handoff`]).
    KernelOomKill {
        timeout: Duration,
    },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Reclaim { .. } => "reclaim",
            Action::RaiseLimit(_) => "raise_limit",
            Action::Signal { .. } => "signal",
            Action::Kill { .. } => "kill",
            Action::KillAll => "kill_all",
            Action::Exec { .. } => "exec",
            Action::DropCaches { .. } => "drop_caches",
            Action::KernelOomKill { .. } => "kernel_oom_kill",
        }
    }
}

/// Temporary headroom: raise, then give back.
#[derive(Debug, Clone)]
pub struct Raise {
    pub by: Amount,
    pub ceiling: Ceiling,
    pub hold: Duration,
    /// Fraction of the original limit usage must stay below to give the loan back early.
    pub restore_below: f64,
    pub restore_after: Duration,
}

#[derive(Debug, Clone)]
pub enum Ceiling {
    MaxLimit(u64),
    MaxExtra(Amount),
}

impl Raise {
    /// The highest limit this step may set, given the limit before the first raise.
    pub fn ceiling_for(&self, original: u64) -> u64 {
        match &self.ceiling {
            Ceiling::MaxLimit(m) => *m,
            Ceiling::MaxExtra(a) => original.saturating_add(a.of(original)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VictimOrder {
    LargestRss,
    HighestOomScore,
    Newest,
    Oldest,
}

#[derive(Debug, Clone)]
pub struct VictimSpec {
    pub order: VictimOrder,
    pub prefer: Vec<Regex>,
    pub avoid: Vec<Regex>,
}

/// The loaded policies, in file-name order.
#[derive(Debug, Clone)]
pub struct PolicySet {
    policies: Vec<Arc<Policy>>,
    embedded: bool,
    /// `FILE:LINE:COL: warning: ...` for values accepted but likely mistakes.
    warnings: Vec<String>,
}

impl PolicySet {
    pub fn new(policies: Vec<Policy>, embedded: bool) -> PolicySet {
        PolicySet {
            policies: policies.into_iter().map(Arc::new).collect(),
            embedded,
            warnings: Vec::new(),
        }
    }

    pub fn with_warnings(mut self, warnings: Vec<String>) -> PolicySet {
        self.warnings = warnings;
        self
    }

    /// What `check` prints and the agent logs at load: accepted, but likely mistakes.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The embedded default policy alone.
    pub fn embedded_default() -> PolicySet {
        let p = load_str(load::EMBEDDED_DEFAULT, "<embedded default>")
            .expect("the embedded default policy is valid (checked by a unit test)");
        PolicySet::new(vec![p], true)
    }

    pub fn is_embedded_default(&self) -> bool {
        self.embedded
    }

    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policies
    }

    /// Forces every policy into audit mode (`--dry-run`).
    pub fn all_audit(self) -> PolicySet {
        let policies = self
            .policies
            .iter()
            .map(|p| {
                let mut q = Policy::clone(p);
                q.mode = Mode::Audit;
                Arc::new(q)
            })
            .collect();
        PolicySet {
            policies,
            embedded: self.embedded,
            warnings: self.warnings,
        }
    }

    /// The policy for `cg`: among those whose match keys hold (and, where required,
    /// with `oom_kill_disable` set), the one with the highest priority; on a tie the
    /// first in file-name order.
    pub fn select(
        &self,
        cg: &CgroupPath,
        kill_disabled: bool,
        container: Option<&ContainerInfo>,
    ) -> Option<&Arc<Policy>> {
        let mut best: Option<&Arc<Policy>> = None;
        for p in &self.policies {
            if p.matcher.require_oom_kill_disable && !kill_disabled {
                continue;
            }
            if !p.matcher.matches(cg, container) {
                continue;
            }
            if best.is_none_or(|b| p.priority > b.priority) {
                best = Some(p);
            }
        }
        best
    }

    /// The first policy keyed on container metadata (`container_name`, `label`,
    /// `image`) whose cgroup globs hold for `cg` and that would be chosen over `chosen`
    /// (`None`: over nothing) if the container's metadata matched it: while that
    /// metadata is unknown, acting with `chosen` could be acting with the wrong policy
    /// (a catch-all's kill for a workload another policy only audits). Fail closed on
    /// such a cgroup (see [`crate::identity`]).
    pub fn outranking_container_policy(
        &self,
        cg: &CgroupPath,
        kill_disabled: bool,
        chosen: Option<&Policy>,
    ) -> Option<&Arc<Policy>> {
        // Where `chosen` stands in file order (ties go to the first).
        let at = chosen.and_then(|c| self.policies.iter().position(|p| std::ptr::eq(&**p, c)));
        self.policies.iter().enumerate().find_map(|(i, p)| {
            if !p.matcher.needs_container()
                || (p.matcher.require_oom_kill_disable && !kill_disabled)
                || (!p.matcher.cgroup.is_empty()
                    && !p.matcher.cgroup.iter().any(|g| g.matches(cg.as_str())))
            {
                return None;
            }
            let wins = match chosen {
                None => true,
                Some(c) if std::ptr::eq(&**p, c) => false,
                Some(c) => {
                    p.priority > c.priority
                        || (p.priority == c.priority && at.is_none_or(|a| i < a))
                }
            };
            wins.then_some(p)
        })
    }

    /// True if some policy could apply to `cg` once `oom_kill_disable` is set: such a
    /// cgroup is a candidate the sweep keeps an eye on.
    pub fn could_match(&self, cg: &CgroupPath, container: Option<&ContainerInfo>) -> bool {
        self.policies
            .iter()
            .any(|p| p.matcher.matches(cg, container))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        load_str(text, "t.toml").unwrap()
    }

    #[test]
    fn embedded_default_is_valid_and_matches_everything() {
        let set = PolicySet::embedded_default();
        assert!(set.is_embedded_default());
        let p = set
            .select(&CgroupPath::new("/docker/abc"), true, None)
            .unwrap();
        let names: Vec<_> = p.steps.iter().map(|s| s.action.name()).collect();
        assert_eq!(names, ["reclaim", "raise_limit", "signal", "kill"]);
        assert_eq!(p.mode, Mode::Enforce);
        // v1: a cgroup the kernel may still OOM-kill is not ours.
        assert!(set
            .select(&CgroupPath::new("/docker/abc"), false, None)
            .is_none());
    }

    #[test]
    fn highest_priority_wins_and_ties_go_to_file_order() {
        let a = policy(
            "name='a'\npriority=1\n[match]\ncgroup=['/docker/*']\n[[step]]\naction='reclaim'\n",
        );
        let b = policy(
            "name='b'\npriority=5\n[match]\ncgroup=['/docker/api-*']\n[[step]]\naction='reclaim'\n",
        );
        let c =
            policy("name='c'\npriority=5\n[match]\ncgroup=['**']\n[[step]]\naction='reclaim'\n");
        let set = PolicySet::new(vec![a, b, c], false);
        let sel = |p: &str| {
            set.select(&CgroupPath::new(p), true, None)
                .map(|p| p.name.clone())
        };
        assert_eq!(sel("/docker/api-1").as_deref(), Some("b"));
        assert_eq!(sel("/docker/web").as_deref(), Some("c"));
        assert_eq!(sel("/other").as_deref(), Some("c"));
    }

    #[test]
    fn require_oom_kill_disable_can_be_turned_off() {
        let p = policy(
            "[match]\ncgroup=['/x']\nrequire_oom_kill_disable=false\n[[step]]\naction='kill_all'\n",
        );
        let set = PolicySet::new(vec![p], false);
        assert!(set.select(&CgroupPath::new("/x"), false, None).is_some());
    }

    #[test]
    fn container_keys_need_metadata() {
        let p = policy(
            "[match]\ncontainer_name=['api-*']\nlabel={tier='api'}\n[[step]]\naction='reclaim'\n",
        );
        let cg = CgroupPath::new("/docker/abc");
        assert!(!p.matcher.matches(&cg, None));
        let mut c = ContainerInfo {
            name: "api-1".into(),
            ..Default::default()
        };
        assert!(!p.matcher.matches(&cg, Some(&c)));
        c.labels.insert("tier".into(), "api".into());
        assert!(p.matcher.matches(&cg, Some(&c)));
        c.name = "web-1".into();
        assert!(!p.matcher.matches(&cg, Some(&c)));
    }

    /// Issue 16.2: a catch-all that kills and a policy by container name that only
    /// audits. Without the container's name, `select` gives the catch-all; the set
    /// says that a container-keyed policy could outrank it there, and with the name
    /// the container-keyed one is chosen.
    #[test]
    fn a_container_keyed_policy_outranks_a_catch_all_while_metadata_is_unknown() {
        let db = policy(
            "name='db'\nmode='audit'\npriority=50\n[match]\ncontainer_name=['db-*']\n[[step]]\naction='kill'\n",
        );
        let all = policy(
            "name='all'\npriority=0\n[match]\ncgroup=['/docker/*']\n[[step]]\naction='kill'\n",
        );
        let web = policy(
            "name='web'\npriority=50\n[match]\ncgroup=['/web/*']\nlabel={tier='web'}\n[[step]]\naction='kill'\n",
        );
        let set = PolicySet::new(vec![all, db, web], false);
        let cg = CgroupPath::new(&format!("/docker/{}", "a".repeat(64)));
        let chosen = set.select(&cg, true, None).unwrap();
        assert_eq!(chosen.name, "all");
        let over = set.outranking_container_policy(&cg, true, Some(chosen));
        assert_eq!(over.map(|p| p.name.as_str()), Some("db"));
        // Where nothing is chosen without metadata, any container-keyed policy whose
        // cgroup globs hold outranks that (the first in file order is named).
        let elsewhere = CgroupPath::new("/web/x");
        assert!(set.select(&elsewhere, true, None).is_none());
        let only_web = PolicySet::new(vec![Policy::clone(&set.policies()[2])], false);
        let over = only_web.outranking_container_policy(&elsewhere, true, None);
        assert_eq!(over.map(|p| p.name.as_str()), Some("web"));
        // ... and not where they do not.
        assert!(only_web
            .outranking_container_policy(&CgroupPath::new("/other"), true, None)
            .is_none());
        // v1: a cgroup the kernel OOM-kills itself is no policy's.
        assert!(set.outranking_container_policy(&cg, false, None).is_none());
        // A container-keyed policy never outranks itself, nor one above it.
        let db = set.policies().iter().find(|p| p.name == "db").unwrap();
        assert!(set
            .outranking_container_policy(&cg, true, Some(db))
            .is_none());
        let known = ContainerInfo {
            name: "db-1".into(),
            ..Default::default()
        };
        assert_eq!(set.select(&cg, true, Some(&known)).unwrap().name, "db");
    }

    #[test]
    fn label_values_and_images_are_globs_names_need_no_leading_slash() {
        let p = policy(
            "[match]\ncgroup=['/docker/*']\ncontainer_name=['shop-api-?']\nlabel={'com.example.tier'='api*', empty=''}\nimage=['registry.local/api:*']\n[[step]]\naction='reclaim'\n",
        );
        let cg = CgroupPath::new("/docker/abc");
        let mut labels = BTreeMap::new();
        labels.insert("com.example.tier".to_string(), "api-v2".to_string());
        labels.insert("empty".to_string(), String::new());
        let c = ContainerInfo {
            name: "shop-api-1".into(),
            image: "registry.local/api:3.1".into(),
            labels,
        };
        assert!(p.matcher.matches(&cg, Some(&c)));
        // Every key must hold: the cgroup glob too.
        assert!(!p
            .matcher
            .matches(&CgroupPath::new("/system.slice/x"), Some(&c)));
        let mut d = c.clone();
        d.name = "/shop-api-1".into();
        assert!(
            !p.matcher.matches(&cg, Some(&d)),
            "names are without Docker's slash"
        );
        let mut d = c.clone();
        d.image = "registry.local/web:3".into();
        assert!(!p.matcher.matches(&cg, Some(&d)));
        let mut d = c.clone();
        d.labels.insert("com.example.tier".into(), "web".into());
        assert!(!p.matcher.matches(&cg, Some(&d)));
        let mut d = c.clone();
        d.labels.remove("empty");
        assert!(
            !p.matcher.matches(&cg, Some(&d)),
            "a missing label is no match"
        );
        d.labels.insert("empty".into(), "x".into());
        assert!(!p.matcher.matches(&cg, Some(&d)), "'' matches only ''");
    }

    #[test]
    fn dry_run_turns_every_policy_to_audit() {
        let set = PolicySet::embedded_default().all_audit();
        let p = &set.policies()[0];
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.steps.len(), 4);
        assert!(p.matcher.matches(&CgroupPath::new("/a"), None));
    }

    #[test]
    fn ceiling_by_max_extra_and_max_limit() {
        let r = Raise {
            by: Amount::Percent(0.1),
            ceiling: Ceiling::MaxExtra(Amount::Percent(0.25)),
            hold: Duration::from_secs(1),
            restore_below: 0.9,
            restore_after: Duration::from_secs(1),
        };
        assert_eq!(r.ceiling_for(64 << 20), 80 << 20);
        let r2 = Raise {
            ceiling: Ceiling::MaxLimit(1 << 30),
            ..r
        };
        assert_eq!(r2.ceiling_for(64 << 20), 1 << 30);
    }

    #[test]
    fn early_threshold_follows_the_limit_in_whole_pages() {
        let e = |at| Early {
            at,
            steps: Vec::new(),
        };
        let pct = e(Amount::Percent(0.75));
        assert_eq!(pct.threshold(32 << 20), Some(24 << 20));
        // A loan moves the wall, and the threshold with it; a restore moves it back.
        assert_eq!(pct.threshold(48 << 20), Some(36 << 20));
        // Rounded down to a page, as the kernel keeps it.
        let page = crate::loan::kernel_page_size();
        let t = pct.threshold(10_000_000).unwrap();
        assert_eq!(t % page, 0);
        assert!(t <= 7_500_000 && t > 7_500_000 - page, "{t}");
        // A size is a usage level: it stays put, and cannot fire at or above the wall.
        let size = e(Amount::Bytes(40 << 20));
        assert_eq!(size.threshold(64 << 20), Some(40 << 20));
        assert_eq!(size.threshold(96 << 20), Some(40 << 20));
        assert_eq!(size.threshold(40 << 20), None);
        assert_eq!(size.threshold(32 << 20), None);
        // No limit, no wall to act before.
        assert_eq!(pct.threshold(9223372036854771712), None);
        // Less than a page is no threshold.
        assert_eq!(pct.threshold(4096), None);
    }
}
