//! The state shared by the event loop, the episode workers and the loan keeper, and the
//! status record the agent publishes. It sits below [`crate::watch`], [`crate::episode`]
//! and [`crate::agent`], which all depend on it and never on each other through it.
//! What it holds comes from modules that do not depend on it in turn: the limits moved
//! ([`crate::moves`]), the v2 holds ([`crate::hold`]), the dispatcher
//! ([`crate::dispatcher`]).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::action::Env;
use crate::audit::Audit;
use crate::cgroup::CgroupPath;
use crate::dispatcher::{Dispatcher, StuckStatus};
use crate::journal::{Damage, LoanRecord};
use crate::metrics::Metrics;
use crate::policy::PolicySet;

/// Everything the threads of a running agent share.
pub struct Shared {
    pub env: Env,
    pub audit: Audit,
    pub metrics: Metrics,
    pub dispatcher: Dispatcher,
    pub policies: RwLock<Arc<PolicySet>>,
    pub settle_poll: Duration,
    pub stop: AtomicBool,
    /// v2: the cgroups whose memory.high the agent holds (`[v2] hold_at`).
    pub holds: crate::hold::Holds,
    /// Limits the agent moved: the event loop re-registers their early thresholds.
    pub moves: Arc<crate::moves::Moves>,
    /// Container metadata from the Docker Engine API (disabled: never finds anything).
    pub containers: Arc<crate::container::Containers>,
    /// How long an episode waits for a container's metadata when a policy keyed on it
    /// could apply (see [`crate::identity`]).
    pub metadata_wait: Duration,
}

impl Shared {
    /// What policies match a container on: its metadata when known. Never waits.
    pub fn container_info(&self, cg: &CgroupPath) -> Option<Arc<crate::container::Meta>> {
        self.containers.for_cgroup(cg)
    }

    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `cg`'s OOM killer is off, for choosing its policy (v1 `oom_kill_disable`;
    /// unknown, unreadable or gone counts as off: the policy of a stuck cgroup).
    pub fn kill_disabled(&self, cg: &CgroupPath) -> bool {
        self.env
            .ctl
            .oom_state(cg)
            .ok()
            .flatten()
            .is_none_or(|s| s.oom_kill_disable)
    }

    /// A shared state on a fake v1 tree at `root` (tests): audit log `dir/audit.jsonl`,
    /// no journal, episodes handed to `jobs`.
    #[cfg(test)]
    pub fn for_test(
        dir: &std::path::Path,
        root: &std::path::Path,
        policies: Vec<crate::policy::Policy>,
        containers: Arc<crate::container::Containers>,
        jobs: crossbeam_channel::Sender<crate::dispatcher::Job>,
        metadata_wait: Duration,
    ) -> Shared {
        use crate::cgroup::{v1::V1, Hierarchy, Kind};
        Shared {
            env: Env {
                ctl: Box::new(V1::new(Hierarchy::fake(root, Kind::V1))),
                proc_root: "/proc".into(),
                self_pid: 0,
                loans: crate::loan::LoanBook::new(None),
                armed: crate::armed::Armed::new(),
            },
            audit: Audit::file(&dir.join("audit.jsonl"))
                .expect("a test audit log")
                .with_containers(containers.clone()),
            metrics: Metrics::default(),
            dispatcher: Dispatcher::new(jobs, Duration::from_secs(60), 1, 1),
            policies: RwLock::new(Arc::new(PolicySet::new(policies, false))),
            settle_poll: Duration::from_millis(1),
            stop: AtomicBool::new(false),
            holds: crate::hold::Holds::in_memory(),
            moves: Arc::new(crate::moves::Moves::new().expect("an eventfd")),
            containers,
            metadata_wait,
        }
    }
}

/// A fake v1 cgroup `<root><cg>` (tests) with `oom_kill_disable 1` and the given
/// `under_oom`; returns its directory.
#[cfg(test)]
pub fn fake_cgroup(root: &std::path::Path, cg: &str, under_oom: bool) -> PathBuf {
    let dir = root.join(cg.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).expect("a fake cgroup directory");
    std::fs::write(
        dir.join("memory.oom_control"),
        format!("oom_kill_disable 1\nunder_oom {}\n", u8::from(under_oom)),
    )
    .expect("a fake memory.oom_control");
    dir
}

/// [`fake_cgroup`] at Docker's `/docker/<id>`.
#[cfg(test)]
pub fn fake_container_cgroup(root: &std::path::Path, id: &str, under_oom: bool) -> PathBuf {
    fake_cgroup(root, &format!("/docker/{id}"), under_oom)
}

/// What `oomwake status` shows, written by the agent to `<state_dir>/status.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: i32,
    pub running: bool,
    pub updated: String,
    pub cgroup_root: PathBuf,
    pub policies: Vec<String>,
    pub dry_run: bool,
    pub watched: Vec<WatchedStatus>,
    pub episodes_running: Vec<CgroupPath>,
    /// Stalls the policy could not resolve, still going on.
    #[serde(default)]
    pub stuck: Vec<StuckStatus>,
    pub loans: Vec<LoanRecord>,
    /// Journal files found damaged at start (moved aside; `oomwake status` exits 4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub journal_damage: Vec<Damage>,
    /// v2: cgroups whose memory.high the agent holds (`[v2] hold_at`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<crate::hold::HoldRecord>,
    /// The kill kit, when the agent shares a watched cgroup whose policy signals
    /// ([`crate::armed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_kit: Option<crate::armed::KitStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WatchedStatus {
    pub cgroup: CgroupPath,
    pub policy: String,
    /// The container whose own cgroup this is (from the path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Its name and image, when the engine told them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}
