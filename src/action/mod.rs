//! Actions: what a policy step does to a cgroup. Each returns a [`Report`] that the
//! episode turns into one `action` audit line; in audit mode each computes the full
//! decision (victim, new limit) and changes nothing.

pub mod exec;
pub mod handoff;
pub mod kill;
pub mod raise;
pub mod reclaim;

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::cgroup::{CgroupPath, Controller};
pub use crate::loan::LoanBook;
use crate::policy::{Action, Policy};

/// What actions need from the agent: the cgroup controller, `/proc`, the loans.
pub struct Env {
    pub ctl: Box<dyn Controller>,
    pub proc_root: PathBuf,
    pub self_pid: i32,
    pub loans: LoanBook,
    /// What a kill needs in a cgroup the agent shares, kept ready ([`crate::armed`]).
    pub armed: crate::armed::Armed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Would,
    Failed,
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Would => "would",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The result of one step's action.
#[derive(Debug)]
pub struct Report {
    pub outcome: Outcome,
    /// Per-action audit fields (old_limit, pid, exit_code, ...).
    pub fields: Map<String, Value>,
    pub error: Option<String>,
    /// The action changed something, so the step's settle wait for recovery makes
    /// sense (false when nothing changed).
    pub changed: bool,
}

impl Report {
    /// How many processes the step SIGKILLed (`pids` of kill_all, `pid` of kill or
    /// signal, `oom_kills` of kernel_oom_kill: the kernel's own count, also when its
    /// record of the victim could not be read).
    pub fn sigkilled(&self) -> u64 {
        if self.outcome != Outcome::Done
            || self.fields.get("signal").and_then(Value::as_str) != Some("SIGKILL")
        {
            return 0;
        }
        if let Some(n) = self.fields.get("oom_kills").and_then(Value::as_u64) {
            return n;
        }
        match (self.fields.get("pids"), self.fields.get("pid")) {
            (Some(Value::Array(pids)), _) => pids.len() as u64,
            (_, Some(_)) => 1,
            _ => 0,
        }
    }

    pub fn new(outcome: Outcome) -> Report {
        Report {
            outcome,
            fields: Map::new(),
            error: None,
            changed: outcome == Outcome::Done,
        }
    }

    pub fn failed(error: impl ToString) -> Report {
        let mut r = Report::new(Outcome::Failed);
        r.error = Some(error.to_string());
        r
    }

    pub fn skipped(why: impl ToString) -> Report {
        let mut r = Report::new(Outcome::Skipped);
        r.error = Some(why.to_string());
        r
    }

    pub fn with(mut self, key: &str, v: impl Into<Value>) -> Report {
        self.fields.insert(key.to_string(), v.into());
        self
    }
}

/// Which step of which episode an action runs for.
pub struct StepCtx<'a> {
    pub cgroup: &'a CgroupPath,
    pub policy: &'a Policy,
    pub episode: u64,
    pub step: usize,
    pub audit: bool,
    /// Resumed after a hold expired: no further raises.
    pub resuming: bool,
    /// A step of `[early]`: a loan it makes resumes, at hold expiry, at the step after
    /// the policy's first `raise_limit` (the early steps are over by then).
    pub early: bool,
    /// True while the cgroup still needs help; long waits end early when it turns false.
    pub still_stuck: &'a dyn Fn() -> bool,
    /// An action that waits after acting (a signal's grace) calls this with what it
    /// did before waiting, so that the act is recorded even if the agent stops.
    pub taken: &'a dyn Fn(&Report),
    /// True once the agent is stopping: waits end, running hooks are killed.
    pub cancelled: &'a dyn Fn() -> bool,
}

/// Runs one action.
pub fn perform(env: &Env, ctx: &StepCtx, action: &Action) -> Report {
    match action {
        Action::Reclaim { timeout } => reclaim::reclaim(env, ctx, *timeout),
        Action::DropCaches { level } => reclaim::drop_caches(env, ctx, *level),
        Action::RaiseLimit(r) => raise::perform(env, ctx, r),
        Action::Signal {
            signal,
            victim,
            grace,
        } => kill::signal_victim(env, ctx, victim, *signal, Some(*grace)),
        Action::Kill { victim } => kill::signal_victim(env, ctx, victim, libc::SIGKILL, None),
        Action::KillAll => kill::kill_all(env, ctx),
        Action::Exec {
            command,
            timeout,
            trust,
        } => exec::run(env, ctx, command, *timeout, *trust),
        Action::KernelOomKill { timeout } => handoff::kernel_oom_kill(env, ctx, *timeout),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Fixtures for action unit tests: an Env on a TempDir hierarchy, a StepCtx.

    use std::path::Path;

    use super::{Env, LoanBook, StepCtx};
    use crate::cgroup::{v1::V1, CgroupPath, Hierarchy, Kind};
    use crate::policy::Policy;

    pub fn env(cgroup_root: &Path, proc_root: &Path) -> Env {
        Env {
            ctl: Box::new(V1::new(Hierarchy::fake(cgroup_root, Kind::V1))),
            proc_root: proc_root.to_path_buf(),
            self_pid: 0,
            loans: LoanBook::new(None),
            armed: crate::armed::Armed::new(),
        }
    }

    fn always() -> bool {
        true
    }

    fn never() -> bool {
        false
    }

    fn ignore(_: &super::Report) {}

    pub fn ctx<'a>(cgroup: &'a CgroupPath, policy: &'a Policy, audit: bool) -> StepCtx<'a> {
        StepCtx {
            cgroup,
            policy,
            episode: 42,
            step: 3,
            audit,
            resuming: false,
            early: false,
            still_stuck: &always,
            taken: &ignore,
            cancelled: &never,
        }
    }
}
