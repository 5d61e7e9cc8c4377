//! `oomwake doctor`: reads the hierarchy, the policies and the journal of loans and
//! reports what puts the host at risk. It never writes anything (no cgroup file, no
//! journal repair) and can be run while the agent runs.
//!
//! Findings (`kind`):
//! - `unlimited_kill_disabled` (v1): `oom_kill_disable 1` with no memory limit on the
//!   cgroup or any ancestor (`hierarchical_memory_limit`): nothing stops it before the
//!   host runs out, and the kernel will not kill inside it.
//! - `uncovered` (v1): `oom_kill_disable 1` under a limit, so it can stall, and no policy
//!   covers it. Policies that match by container metadata are evaluated with what the
//!   Docker engine lists (when its socket answers); a container whose metadata is not
//!   known, where such a policy could outrank the one chosen without it, is a note
//!   ("not checked"), never attributed to the lower policy (issue 16.4).
//! - `loan_outstanding`: a limit the agent lent and has not given back (the journal in
//!   the state dir); `hold_expired` when its hold is over.
//! - `early_cannot_work`: a covered cgroup whose policy's `[early]` threshold cannot
//!   fire: at or above the limit, or at or below current usage (it fired already, or
//!   never will until usage drops).
//! - `policy_matches_nothing`: a policy that covers no cgroup below the root (one that
//!   matches by container metadata is reported as not checked).

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cgroup::{self, parse::is_unlimited, CgroupPath, Controller, Hierarchy, Kind};
use crate::journal::{Journal, LoanRecord};
use crate::policy::{ContainerInfo, PolicySet};

/// One thing that puts the host at risk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    /// The cgroup concerned (below the root), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupPath>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub message: String,
}

/// What `doctor` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cgroup_root: std::path::PathBuf,
    pub kind: Kind,
    /// Cgroups read.
    pub scanned: usize,
    pub findings: Vec<Finding>,
    /// What could not be checked (not a finding): e.g. container-matched policies.
    pub notes: Vec<String>,
}

/// The doctor could not do its job (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("{0}")]
    Hierarchy(#[from] cgroup::CgroupError),
}

/// Scans the hierarchy at `cgroup_root` (or a subtree of it) against `policies` and the
/// loans journaled in `state_dir`, with the containers the Docker engine at
/// `docker_socket` lists (when given and it answers).
pub fn run(
    policies: &PolicySet,
    cgroup_root: &Path,
    proc_root: &Path,
    state_dir: &Path,
    docker_socket: Option<&Path>,
) -> Result<Report, DoctorError> {
    let ctl = cgroup::open(Hierarchy::detect(cgroup_root, proc_root)?)?;
    let loans = Journal::read_only(state_dir)
        .load()
        .map_err(|e| e.to_string());
    let mut containers = HashMap::new();
    let mut engine_note = None;
    if let Some(sock) = docker_socket {
        let engine =
            crate::container::docker::Engine::new(sock, crate::container::cache::REQUEST_TIMEOUT);
        match engine.list() {
            Ok(metas) => containers.extend(metas.into_iter().map(|m| (m.id, m.info))),
            Err(e) => {
                engine_note = Some(format!(
                    "the Docker engine at {} did not list its containers: {e}",
                    sock.display()
                ))
            }
        }
    }
    let mut r = diagnose(ctl.as_ref(), policies, loans, now_ms(), &containers);
    r.notes.extend(engine_note);
    Ok(r)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// The checks, on any controller (a TempDir fake in unit tests); `containers`: the
/// metadata of the containers known, by full id.
pub fn diagnose(
    ctl: &dyn Controller,
    policies: &PolicySet,
    loans: Result<Vec<LoanRecord>, String>,
    now_unix_ms: u64,
    containers: &HashMap<String, ContainerInfo>,
) -> Report {
    let h = ctl.hierarchy();
    let v1 = h.kind() == Kind::V1;
    let mut findings = Vec::new();
    let mut notes = Vec::new();
    let all = h.walk(&CgroupPath::root());
    let mut used = vec![false; policies.policies().len()];
    let mut scanned = 0;
    for cg in &all {
        let Ok(Some(st)) = ctl.oom_state(cg) else {
            continue;
        };
        scanned += 1;
        let kill_disabled = v1 && st.oom_kill_disable;
        let id = crate::container::identify(cg.as_bytes())
            .filter(|i| i.is_container())
            .and_then(|i| i.container_id);
        let info = id.as_ref().and_then(|id| containers.get(id));
        let mut selected = policies.select(cg, kill_disabled, info);
        // Without the container's metadata the choice may be the wrong one: a policy
        // keyed on it could outrank what was chosen. Say so; check nothing against it.
        let mut unknown = false;
        if id.is_some() && info.is_none() {
            if let Some(over) =
                policies.outranking_container_policy(cg, kill_disabled, selected.map(|p| &**p))
            {
                notes.push(format!(
                    "{cg}: container metadata unknown, and policy {} ({}) matches by container metadata and could apply instead of {}: not checked",
                    over.name,
                    over.source,
                    selected.map_or("no policy".to_string(), |p| format!("policy {}", p.name))
                ));
                selected = None;
                unknown = true;
            }
        }
        if let Some(p) = selected {
            if let Some(i) = policies.policies().iter().position(|q| q.name == p.name) {
                used[i] = true;
            }
        }
        // The hierarchy root is the host (or the root the agent was given): not a
        // workload of its own.
        if cg.is_root() {
            continue;
        }
        let limit = ctl.limits(cg).ok().flatten().map(|l| l.memory);
        if kill_disabled {
            let effective = ctl
                .stat(cg)
                .ok()
                .flatten()
                .and_then(|s| s.get("hierarchical_memory_limit").copied())
                .or(limit);
            match effective {
                Some(l) if !is_unlimited(l) => {
                    if selected.is_none() && !unknown {
                        findings.push(Finding {
                            kind: "uncovered",
                            cgroup: Some(cg.clone()),
                            policy: None,
                            message: format!(
                                "oom_kill_disable 1 under a limit of {}: it can stall at its wall, and no policy covers it",
                                mib(l)
                            ),
                        });
                    }
                }
                _ => findings.push(Finding {
                    kind: "unlimited_kill_disabled",
                    cgroup: Some(cg.clone()),
                    policy: selected.map(|p| p.name.clone()),
                    message: "oom_kill_disable 1 with no memory limit here or above: it can take the whole host, and the kernel will not kill inside it".to_string(),
                }),
            }
        }
        if let (Some(p), Some(l)) = (selected, limit) {
            if let Some(early) = &p.early {
                let usage = ctl.usage(cg).ok().flatten();
                let why = match (early.threshold(l), usage) {
                    (None, _) if is_unlimited(l) => Some("the cgroup has no limit".to_string()),
                    (None, _) => Some(format!("the threshold is not below the limit {}", mib(l))),
                    (Some(t), Some(u)) if t <= u => Some(format!(
                        "the threshold {} is at or below current usage {}",
                        mib(t),
                        mib(u)
                    )),
                    _ => None,
                };
                if let Some(why) = why {
                    findings.push(Finding {
                        kind: "early_cannot_work",
                        cgroup: Some(cg.clone()),
                        policy: Some(p.name.clone()),
                        message: format!("[early] cannot fire: {why}"),
                    });
                }
            }
        }
    }
    for (p, used) in policies.policies().iter().zip(used) {
        if used {
            continue;
        }
        if p.matcher.needs_container() {
            notes.push(format!(
                "policy {} ({}) matches by container metadata: not checked",
                p.name, p.source
            ));
            continue;
        }
        let wants_kill_disable = v1 && p.matcher.require_oom_kill_disable;
        findings.push(Finding {
            kind: "policy_matches_nothing",
            cgroup: None,
            policy: Some(p.name.clone()),
            message: format!(
                "{}: covers no cgroup below the root{}",
                p.source,
                if wants_kill_disable {
                    " (among those with oom_kill_disable 1)"
                } else {
                    ""
                }
            ),
        });
    }
    match loans {
        Ok(loans) => {
            for l in loans {
                // A loan of a cgroup outside this root (a subtree given as the root) is
                // not this scan's.
                if !all.contains(&l.cgroup) {
                    notes.push(format!(
                        "a loan on {} is journaled, and no such cgroup is below the root (gone, or outside this scan)",
                        l.cgroup
                    ));
                    continue;
                }
                let expired = l.hold_until_unix_ms <= now_unix_ms;
                findings.push(Finding {
                    kind: "loan_outstanding",
                    cgroup: Some(l.cgroup.clone()),
                    policy: Some(l.policy.clone()),
                    message: format!(
                        "limit lent: {} -> {} (episode {}){}",
                        mib(l.original.memory),
                        mib(l.lent.memory),
                        l.episode,
                        if expired {
                            ", hold_expired: usage is still above the original limit or the agent is not running"
                        } else {
                            ""
                        }
                    ),
                });
            }
        }
        Err(e) => notes.push(format!("the journal of loans could not be read: {e}")),
    }
    Report {
        cgroup_root: h.root().to_path_buf(),
        kind: h.kind(),
        scanned,
        findings,
        notes,
    }
}

impl Report {
    /// The text form: one line per finding, then the notes.
    /// The human report; names from others are escaped ([`crate::term`]).
    pub fn text(&self) -> String {
        use crate::term::Esc;
        use std::fmt::Write;
        let mut o = String::new();
        for f in &self.findings {
            let _ = write!(o, "{}", f.kind);
            if let Some(c) = &f.cgroup {
                let _ = write!(o, " {}", Esc(c));
            }
            if let Some(p) = &f.policy {
                let _ = write!(o, " [policy {}]", Esc(p));
            }
            let _ = writeln!(o, ": {}", Esc(&f.message));
        }
        for n in &self.notes {
            let _ = writeln!(o, "note: {}", Esc(n));
        }
        let _ = writeln!(
            o,
            "{} cgroup(s) read below {}: {}",
            self.scanned,
            self.cgroup_root.display(),
            match self.findings.len() {
                0 => "nothing found".to_string(),
                1 => "1 finding".to_string(),
                n => format!("{n} findings"),
            }
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16.17: a cgroup named with an ESC sequence must not reach the terminal raw.
    #[test]
    fn the_text_escapes_control_characters_in_names() {
        let r = Report {
            cgroup_root: "/sys/fs/cgroup/memory".into(),
            kind: Kind::V1,
            scanned: 1,
            findings: vec![Finding {
                kind: "unwatched",
                cgroup: Some(CgroupPath::new("/a\u{1b}[2J\u{1b}c\nforged: line")),
                policy: Some("p\u{9b}".into()),
                message: "limit \u{7} reached".into(),
            }],
            notes: vec!["n\u{1b}]0;title\u{7}".into()],
        };
        let t = r.text();
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert!(t.contains("/a\\x1b[2J\\x1bc\\x0aforged: line"), "{t}");
        assert!(t.contains("[policy p\\u{9b}]"), "{t}");
        assert_eq!(t.lines().count(), 3, "{t}");
    }
    use crate::cgroup::v1::V1;
    use crate::cgroup::Limits;
    use crate::policy::load_str;

    const MIB: u64 = 1 << 20;
    const UNLIMITED: u64 = 9223372036854771712;

    fn cgroup(root: &Path, rel: &str, kill_disable: bool, limit: u64, usage: u64) {
        let d = root.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("memory.oom_control"),
            format!("oom_kill_disable {}\nunder_oom 0\n", u8::from(kill_disable)),
        )
        .unwrap();
        std::fs::write(d.join("memory.limit_in_bytes"), format!("{limit}\n")).unwrap();
        std::fs::write(d.join("memory.usage_in_bytes"), format!("{usage}\n")).unwrap();
    }

    fn hier_limit(root: &Path, rel: &str, limit: u64) {
        let d = root.join(rel.trim_start_matches('/'));
        std::fs::write(
            d.join("memory.stat"),
            format!("cache 0\nhierarchical_memory_limit {limit}\n"),
        )
        .unwrap();
    }

    fn set(policies: &[&str]) -> PolicySet {
        PolicySet::new(
            policies
                .iter()
                .enumerate()
                .map(|(i, t)| load_str(t, &format!("p{i}.toml")).unwrap())
                .collect(),
            false,
        )
    }

    fn kinds(r: &Report) -> Vec<(&'static str, String)> {
        r.findings
            .iter()
            .map(|f| {
                (
                    f.kind,
                    f.cgroup
                        .as_ref()
                        .map(|c| c.to_string())
                        .or(f.policy.clone())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    const STEP: &str = "[[step]]\naction = \"reclaim\"\n";

    #[test]
    fn a_clean_tree_has_no_findings() {
        let t = tempfile::tempdir().unwrap();
        cgroup(t.path(), "", false, UNLIMITED, 0);
        cgroup(t.path(), "/app", true, 64 * MIB, 10 * MIB);
        let p = set(&[&format!(
            "name = \"app\"\n[match]\ncgroup = [\"/app\"]\n{STEP}"
        )]);
        let ctl = V1::new(Hierarchy::fake(t.path(), Kind::V1));
        let r = diagnose(&ctl, &p, Ok(vec![]), 0, &HashMap::new());
        assert_eq!(kinds(&r), vec![]);
        assert_eq!(r.scanned, 2);
        assert!(r.text().contains("nothing found"));
    }

    #[test]
    fn finds_each_risk() {
        let t = tempfile::tempdir().unwrap();
        let r0 = t.path();
        cgroup(r0, "", false, UNLIMITED, 0);
        // No limit anywhere: the host can run out.
        cgroup(r0, "/free", true, UNLIMITED, 0);
        hier_limit(r0, "/free", UNLIMITED);
        // No limit of its own, but its parent has one: it stalls there, not a host risk.
        cgroup(r0, "/pod", false, 128 * MIB, 0);
        cgroup(r0, "/pod/c", true, UNLIMITED, 0);
        hier_limit(r0, "/pod/c", 128 * MIB);
        // Can stall, nobody covers it.
        cgroup(r0, "/orphan", true, 64 * MIB, 0);
        // Covered, but the early threshold is below usage already.
        cgroup(r0, "/app", true, 100 * MIB, 90 * MIB);
        // oom_kill_disable 0: cannot stall (v1), so not uncovered.
        cgroup(r0, "/killable", false, 64 * MIB, 0);
        let p = set(&[
            &format!(
                "name = \"app\"\n[match]\ncgroup = [\"/app\", \"/pod/c\"]\n{STEP}[early]\nat = \"75%\"\n[[early.step]]\naction = \"reclaim\"\n"
            ),
            &format!("name = \"ghost\"\n[match]\ncgroup = [\"/nowhere/*\"]\n{STEP}"),
            &format!("name = \"docker\"\n[match]\nimage = [\"x:*\"]\n{STEP}"),
        ]);
        let ctl = V1::new(Hierarchy::fake(r0, Kind::V1));
        let loan = LoanRecord {
            cgroup: CgroupPath::new("/app"),
            policy: "app".into(),
            episode: 7,
            original: Limits {
                memory: 64 * MIB,
                memsw: None,
                high: None,
            },
            lent: Limits {
                memory: 100 * MIB,
                memsw: None,
                high: None,
            },
            change: None,
            started_unix_ms: 1000,
            hold_until_unix_ms: 2000,
            restore_below_bytes: 0,
            restore_after_ms: 0,
            resume_step: 1,
            identity: None,
        };
        let r = diagnose(&ctl, &p, Ok(vec![loan]), 5000, &HashMap::new());
        let mut got = kinds(&r);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("early_cannot_work", "/app".to_string()),
                // No limit of its own: no threshold to register.
                ("early_cannot_work", "/pod/c".to_string()),
                ("loan_outstanding", "/app".to_string()),
                ("policy_matches_nothing", "ghost".to_string()),
                ("uncovered", "/orphan".to_string()),
                ("unlimited_kill_disabled", "/free".to_string()),
            ]
        );
        let loan = r
            .findings
            .iter()
            .find(|f| f.kind == "loan_outstanding")
            .unwrap();
        assert!(loan.message.contains("hold_expired"), "{}", loan.message);
        assert!(
            r.notes.iter().any(|n| n.contains("docker")),
            "{:?}",
            r.notes
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["findings"].as_array().unwrap().len(), 6);
    }

    /// Issue 16.4: a container's cgroup is judged with its metadata. Covered by the
    /// policy naming it when the engine listed it; when its metadata is unknown and a
    /// policy keyed on it could outrank the catch-all, a note, and the catch-all's
    /// `[early]` is not held against it.
    #[test]
    fn container_cgroups_are_judged_with_their_metadata() {
        let id = "d".repeat(64);
        let cg = format!("/docker/{id}");
        let t = tempfile::tempdir().unwrap();
        cgroup(t.path(), "", false, UNLIMITED, 0);
        cgroup(t.path(), "/docker", false, UNLIMITED, 0);
        cgroup(t.path(), &cg, true, 64 * MIB, 60 * MIB);
        // No container: the catch-all's own, its [early] fine.
        cgroup(t.path(), "/docker/other", true, 64 * MIB, 0);
        let db =
            format!("name = \"db\"\npriority = 50\n[match]\ncontainer_name = [\"db-*\"]\n{STEP}");
        let all = format!(
            "name = \"all\"\n[match]\ncgroup = [\"/docker/*\"]\n{STEP}[early]\nat = \"50%\"\n[[early.step]]\naction = \"reclaim\"\n"
        );
        let ctl = V1::new(Hierarchy::fake(t.path(), Kind::V1));
        let mut known = HashMap::new();
        known.insert(
            id.clone(),
            ContainerInfo {
                name: "db-1".into(),
                ..Default::default()
            },
        );
        // Named by `db` alone: covered when the engine told the name (the other one
        // is not).
        let other = vec![("uncovered", "/docker/other".to_string())];
        let r = diagnose(&ctl, &set(&[&db]), Ok(vec![]), 0, &known);
        assert_eq!(kinds(&r), other);
        // With the catch-all too: `db` wins, and its (absent) [early] is what counts.
        let r = diagnose(&ctl, &set(&[&all, &db]), Ok(vec![]), 0, &known);
        assert_eq!(kinds(&r), vec![]);
        // Unknown: neither uncovered nor judged under the catch-all; a note says why.
        for (policies, want) in [(set(&[&db]), other), (set(&[&all, &db]), vec![])] {
            let r = diagnose(&ctl, &policies, Ok(vec![]), 0, &HashMap::new());
            assert_eq!(kinds(&r), want);
            assert!(
                r.notes
                    .iter()
                    .any(|n| n.contains(&cg) && n.contains("container metadata unknown")),
                "{:?}",
                r.notes
            );
        }
    }

    #[test]
    fn an_unreadable_journal_is_a_note() {
        let t = tempfile::tempdir().unwrap();
        cgroup(t.path(), "", false, UNLIMITED, 0);
        let ctl = V1::new(Hierarchy::fake(t.path(), Kind::V1));
        let r = diagnose(&ctl, &set(&[]), Err("bad line".into()), 0, &HashMap::new());
        assert!(r.findings.is_empty());
        assert!(r.notes[0].contains("bad line"));
    }

    #[test]
    fn reads_without_writing() {
        let t = tempfile::tempdir().unwrap();
        cgroup(t.path(), "", false, UNLIMITED, 0);
        cgroup(t.path(), "/orphan", true, 64 * MIB, 0);
        let before = snapshot(t.path());
        let ctl = V1::new(Hierarchy::fake(t.path(), Kind::V1));
        let state = t.path().join("no-state");
        let loans = Journal::read_only(&state).load().map_err(|e| e.to_string());
        let r = diagnose(&ctl, &set(&[]), loans, 0, &HashMap::new());
        assert_eq!(kinds(&r), vec![("uncovered", "/orphan".to_string())]);
        assert_eq!(snapshot(t.path()), before);
        assert!(!state.exists());
    }

    fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }
}
