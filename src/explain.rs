//! `oomwake explain`: which policy matches a cgroup and what each step would do now,
//! computed by running the steps in audit mode against the live cgroup.

use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

use crate::action::{self, Env, LoanBook, StepCtx};
use crate::cgroup::{self, CgroupPath, Hierarchy};
use crate::container::Meta;
use crate::policy::{Mode, Policy, PolicySet};
use crate::term::Esc;

/// What `explain` found.
pub struct Explanation {
    pub text: String,
    /// The hierarchy was read and has no such cgroup: the command fails (exit 1).
    pub missing: bool,
    /// The cgroup could not be read (a name too long, no permission, ...): not taken for
    /// found nor for missing; the command fails (exit 1) with this message.
    pub error: Option<String>,
}

pub fn explain(
    policies: &PolicySet,
    cgroup_root: &Path,
    proc_root: &Path,
    cg: &CgroupPath,
    container: Option<&Meta>,
) -> Explanation {
    let text = explain_text(policies, cgroup_root, proc_root, cg, container);
    let state = Hierarchy::detect(cgroup_root, proc_root)
        .and_then(cgroup::open)
        .map(|c| c.oom_state(cg));
    Explanation {
        text,
        missing: matches!(state, Ok(Ok(None))),
        error: match state {
            Ok(Err(e)) => Some(e.to_string()),
            _ => None,
        },
    }
}

fn explain_text(
    policies: &PolicySet,
    cgroup_root: &Path,
    proc_root: &Path,
    cg: &CgroupPath,
    container: Option<&Meta>,
) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "cgroup: {}", Esc(cg));
    if let Some(ident) = crate::container::identify(cg.as_bytes()) {
        let _ = match (ident.is_container(), container) {
            (true, Some(m)) => writeln!(
                o,
                "container: {} (id {}, image {})",
                Esc(&m.info.name),
                Esc(crate::container::id::short(&m.id)),
                Esc(&m.info.image)
            ),
            (true, None) => writeln!(
                o,
                "container: {} (name, labels and image unknown: policies by container_name, label or image do not match it)",
                Esc(&ident)
            ),
            (false, _) => writeln!(o, "container: {}", Esc(&ident)),
        };
    }
    let info = container.map(|m| &m.info);
    let ctl = Hierarchy::detect(cgroup_root, proc_root).and_then(cgroup::open);
    let ctl = match ctl {
        Ok(c) => Some(c),
        Err(e) => {
            let _ = writeln!(o, "hierarchy: {e} (showing the policy match only)");
            None
        }
    };
    let read = ctl.as_ref().map(|c| c.oom_state(cg));
    let state = read
        .as_ref()
        .and_then(|r| r.as_ref().ok().copied().flatten());
    match (&ctl, state) {
        (Some(c), Some(st)) => {
            let limits = c.limits(cg).ok().flatten();
            let usage = c.usage(cg).ok().flatten();
            if c.hierarchy().kind() == cgroup::Kind::V2 {
                // v2 has no oom_kill_disable/under_oom: the controller maps them.
                let _ = writeln!(
                    o,
                    "state (v2): memory.max {} at_limit {} oom_kill {}",
                    if st.oom_kill_disable { "set" } else { "max" },
                    u8::from(st.under_oom),
                    st.oom_kill
                );
            } else {
                let _ = writeln!(
                    o,
                    "state: oom_kill_disable {} under_oom {} oom_kill {}",
                    u8::from(st.oom_kill_disable),
                    u8::from(st.under_oom),
                    st.oom_kill
                );
            }
            if let (Some(l), Some(u)) = (limits, usage) {
                let lim = if cgroup::parse::is_unlimited(l.memory) {
                    "unlimited".to_string()
                } else {
                    l.memory.to_string()
                };
                let _ = writeln!(o, "memory: usage {u} bytes, limit {lim}");
            }
        }
        (Some(_), None) => match read {
            Some(Err(e)) => {
                let _ = writeln!(o, "state: cannot read the cgroup: {}", Esc(&e));
            }
            _ => {
                let _ = writeln!(o, "state: cgroup not found under {}", cgroup_root.display());
            }
        },
        _ => {}
    }
    let kill_disabled = state.map(|s| s.oom_kill_disable);
    let chosen = policies.select(cg, kill_disabled.unwrap_or(true), info);
    let Some(p) = chosen else {
        let v2 = ctl
            .as_ref()
            .is_some_and(|c| c.hierarchy().kind() == cgroup::Kind::V2);
        let why = if policies.could_match(cg, info) && kill_disabled == Some(false) && v2 {
            "a policy matches, but memory.max is not set: nothing to watch on v2"
        } else if policies.could_match(cg, info) && kill_disabled == Some(false) {
            "a policy matches, but oom_kill_disable is 0: the kernel OOM killer handles this cgroup"
        } else {
            "no policy matches"
        };
        let _ = writeln!(o, "policy: none ({why})");
        return o;
    };
    let _ = writeln!(
        o,
        "policy: {} (from {}, priority {}, mode {})",
        Esc(&p.name),
        Esc(&p.source),
        p.priority,
        p.mode.as_str()
    );
    if kill_disabled.is_none() {
        let _ = writeln!(o, "note: assuming oom_kill_disable 1");
    }
    let others: Vec<&Arc<Policy>> = policies
        .policies()
        .iter()
        .filter(|q| q.name != p.name && q.matcher.matches(cg, info))
        .collect();
    for q in others {
        let _ = writeln!(
            o,
            "  also matches: {} (priority {})",
            Esc(&q.name),
            q.priority
        );
    }
    let Some(ctl) = ctl.filter(|_| state.is_some()) else {
        if let Some(e) = &p.early {
            let _ = writeln!(o, "early at {} of the limit:", e.at);
            for (i, s) in e.steps.iter().enumerate() {
                let _ = writeln!(o, "early step {i}: {}", s.action.name());
            }
        }
        for (i, s) in p.steps.iter().enumerate() {
            let _ = writeln!(o, "step {i}: {}", s.action.name());
        }
        return o;
    };
    let env = Env {
        ctl,
        proc_root: proc_root.to_path_buf(),
        self_pid: crate::sys::getpid(),
        loans: LoanBook::new(None),
        armed: crate::armed::Armed::new(),
    };
    if let Some(e) = &p.early {
        let limit = env.ctl.limits(cg).ok().flatten().map(|l| l.memory);
        let usage = env.ctl.usage(cg).ok().flatten();
        let at = match (limit.and_then(|l| e.threshold(l)), usage) {
            (Some(t), Some(u)) if u >= t => {
                format!(
                    "usage {t} bytes (already reached: the early steps run at the next crossing)"
                )
            }
            (Some(t), _) => format!("usage {t} bytes"),
            (None, _) => "never: no room below the limit".to_string(),
        };
        let _ = writeln!(o, "early ({} of the limit): at {at}, it would:", e.at);
        for (i, step) in e.steps.iter().enumerate() {
            let line = explain_step(&env, cg, p, i, step, true);
            let _ = writeln!(o, "early {line}");
        }
    }
    let _ = writeln!(
        o,
        "if it stalled now ({}):",
        if p.mode == Mode::Audit {
            "audit: log only"
        } else {
            "enforce"
        }
    );
    for (i, step) in p.steps.iter().enumerate() {
        let line = explain_step(&env, cg, p, i, step, false);
        let _ = writeln!(o, "{line}");
    }
    o
}

/// One step run in audit mode now: `step N: action -> would k=v ...  [settle ...]`.
fn explain_step(
    env: &Env,
    cg: &CgroupPath,
    p: &Policy,
    i: usize,
    step: &crate::policy::Step,
    early: bool,
) -> String {
    let ctx = StepCtx {
        cgroup: cg,
        policy: p,
        episode: 0,
        step: i,
        audit: true,
        resuming: false,
        early,
        still_stuck: &|| true,
        taken: &|_| {},
        cancelled: &|| false,
    };
    let r = action::perform(env, &ctx, &step.action);
    let mut line = format!("step {i}: {} -> {}", step.action.name(), r.outcome.as_str());
    for (k, v) in &r.fields {
        let _ = write!(line, " {}={}", Esc(k), Esc(v));
    }
    if let Some(e) = &r.error {
        let _ = write!(line, " ({})", Esc(e));
    }
    let _ = write!(line, "  [settle {:?}]", step.settle);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_policy_without_a_hierarchy() {
        let t = tempfile::tempdir().unwrap();
        let set = PolicySet::embedded_default();
        let e = explain(
            &set,
            t.path(),
            Path::new("/proc"),
            &CgroupPath::new("/docker/x"),
            None,
        );
        assert!(!e.missing, "no hierarchy: nothing is known to be missing");
        let out = e.text;
        assert!(out.contains("policy: embedded-default"), "{out}");
        assert!(out.contains("step 1: raise_limit"), "{out}");
        assert!(out.contains("showing the policy match only"), "{out}");
    }

    #[test]
    fn explains_the_early_steps() {
        let t = tempfile::tempdir().unwrap();
        let text = include_str!("../policies/go-service.toml");
        let set = PolicySet::new(
            vec![crate::policy::load_str(text, "go.toml").unwrap()],
            false,
        );
        let out = explain(
            &set,
            t.path(),
            Path::new("/proc"),
            &CgroupPath::new("/docker/x"),
            None,
        )
        .text;
        assert!(
            out.contains(
                "early at 80% of the limit:\nearly step 0: raise_limit\nstep 0: raise_limit\n"
            ),
            "{out}"
        );
    }
}
