//! The kill kit ([`oomwake::armed`]) on real v1 cgroups: what the kept task lists say.
//!
//! The v1 kernel caches a cgroup's task list per open file (`cgroup_pidlist`) and keeps
//! it for a second after each read: a kept `cgroup.procs` re-read from offset 0 within
//! that second (by a refresh, or at the wall right after one) returns the list as it
//! was, not as it is.

use std::path::Path;

use oomwake::armed::Armed;
use oomwake::cgroup::{v1::V1, CgroupPath, Hierarchy};

use crate::common::*;

fn ctl() -> V1 {
    V1::new(Hierarchy::detect(Path::new(MEMROOT), Path::new("/proc")).unwrap())
}

/// A sleeper moved into `cg` by a write to its `cgroup.procs` (not read back there: a
/// fresh read would reload the kernel's cached list and hide what the test is about).
fn sleeper_in(s: &mut Scratch, cg: &Cg) -> i32 {
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("60");
    let (pid, _) = s.spawn(cmd);
    write(&cg.dir.join("cgroup.procs"), &pid.to_string());
    assert!(in_cgroup(pid, cg));
    pid
}

/// True if `/proc/PID/cgroup` names `cg` as the task's memory cgroup.
fn in_cgroup(pid: i32, cg: &Cg) -> bool {
    let text = read(Path::new(&format!("/proc/{pid}/cgroup")));
    oomwake::cgroup::parse::proc_memory_cgroup(&text).as_deref() == Some(cg.rel.as_str())
}

fn armed_pids(kit: &Armed) -> Vec<i32> {
    kit.status().map(|s| s.pids).unwrap_or_default()
}

/// A task that joined the pod is armed at the next refresh, however soon it comes
/// (the kit must not go on reading the list the kernel cached at the last refresh).
#[test]
fn kit_refresh_arms_a_task_that_joined_since_the_last_refresh() {
    let Some(()) = require_v1("kit_refresh_arms_a_task_that_joined_since_the_last_refresh") else {
        return;
    };
    let mut s = Scratch::new("kit-join");
    let pod = s.cgroup("pod", None, false);
    let first = sleeper_in(&mut s, &pod);
    let ctl = ctl();
    let kit = Armed::new();
    let top = CgroupPath::new(&pod.rel);
    kit.refresh(
        &ctl,
        Path::new("/proc"),
        std::process::id() as i32,
        Some(&top),
    );
    assert_eq!(armed_pids(&kit), vec![first]);
    let second = sleeper_in(&mut s, &pod);
    kit.refresh(
        &ctl,
        Path::new("/proc"),
        std::process::id() as i32,
        Some(&top),
    );
    let pids = armed_pids(&kit);
    assert!(
        pids.contains(&second),
        "a task in the pod ({}) is not armed after a refresh: {pids:?} (the cached list)",
        second
    );
}

/// A task that left the pod since the last refresh is not offered to the kill at the
/// wall: signalling it would kill a process outside the cgroup the step is for.
#[test]
fn kit_listing_does_not_offer_a_task_that_left_the_pod() {
    let Some(()) = require_v1("kit_listing_does_not_offer_a_task_that_left_the_pod") else {
        return;
    };
    let mut s = Scratch::new("kit-leave");
    let outside = s.cgroup("", None, false);
    let pod = s.cgroup("pod", None, false);
    let leaver = sleeper_in(&mut s, &pod);
    let stayer = sleeper_in(&mut s, &pod);
    let ctl = ctl();
    let kit = Armed::new();
    let top = CgroupPath::new(&pod.rel);
    let me = std::process::id() as i32;
    kit.refresh(&ctl, Path::new("/proc"), me, Some(&top));
    let mut armed = armed_pids(&kit);
    armed.sort_unstable();
    let mut want = vec![leaver, stayer];
    want.sort_unstable();
    assert_eq!(armed, want);
    write(&outside.dir.join("cgroup.procs"), &leaver.to_string());
    assert!(in_cgroup(leaver, &outside));
    let l = kit.listing(&ctl, Path::new("/proc"), &top, me).unwrap();
    let listed: Vec<i32> = l.tasks.iter().map(|t| t.pid).collect();
    assert!(
        !listed.contains(&leaver) && l.pidfd(leaver).is_none(),
        "the kit offers {} (now in {}) for a kill in {}: {listed:?}",
        leaver,
        outside.rel,
        pod.rel
    );
    assert!(listed.contains(&stayer), "{listed:?}");
}

/// A task moved into the pod since the last refresh is in the listing at the wall (read
/// live here, or a gap there), never silently missing: it may be the one that grows.
#[test]
fn kit_listing_shows_a_task_that_joined_since_the_last_refresh() {
    let Some(()) = require_v1("kit_listing_shows_a_task_that_joined_since_the_last_refresh") else {
        return;
    };
    let mut s = Scratch::new("kit-joined");
    let pod = s.cgroup("pod", None, false);
    let first = sleeper_in(&mut s, &pod);
    let ctl = ctl();
    let kit = Armed::new();
    let top = CgroupPath::new(&pod.rel);
    let me = std::process::id() as i32;
    kit.refresh(&ctl, Path::new("/proc"), me, Some(&top));
    assert_eq!(armed_pids(&kit), vec![first]);
    let joined = sleeper_in(&mut s, &pod);
    let l = kit.listing(&ctl, Path::new("/proc"), &top, me).unwrap();
    let listed: Vec<i32> = l.tasks.iter().map(|t| t.pid).collect();
    assert!(
        listed.contains(&joined) || l.gaps.any(),
        "{joined} joined the pod and is neither listed nor a gap: {listed:?}"
    );
    assert!(listed.contains(&first), "{listed:?}");
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Refreshes over churn (tasks that come and go, child cgroups made and removed)
/// leave no descriptor behind: after the churn, the kit holds what it held before.
#[test]
fn kit_refreshes_over_churn_leak_no_descriptor() {
    let Some(()) = require_v1("kit_refreshes_over_churn_leak_no_descriptor") else {
        return;
    };
    let mut s = Scratch::new("kit-churn");
    let pod = s.cgroup("pod", None, false);
    let _stay = sleeper_in(&mut s, &pod);
    let ctl = ctl();
    let kit = Armed::new();
    let top = CgroupPath::new(&pod.rel);
    let me = std::process::id() as i32;
    kit.refresh(&ctl, Path::new("/proc"), me, Some(&top));
    kit.refresh(&ctl, Path::new("/proc"), me, Some(&top));
    let before = fd_count();
    for round in 0..20 {
        let child = s.cgroup(&format!("pod/c{round}"), None, false);
        let pid = sleeper_in(&mut s, &child);
        kit.refresh(&ctl, Path::new("/proc"), me, Some(&top));
        assert!(armed_pids(&kit).contains(&pid), "round {round}");
        s.kill_hog(pid);
        kit.refresh(&ctl, Path::new("/proc"), me, Some(&top));
        std::fs::remove_dir(&child.dir).unwrap();
        kit.refresh(&ctl, Path::new("/proc"), me, Some(&top));
    }
    // Other tests of this binary open files meanwhile: a leak is 4 per task and 2
    // per cgroup, 120 over the churn.
    let after = fd_count();
    assert!(
        after <= before + 8,
        "{before} descriptors before the churn, {after} after"
    );
    assert_eq!(kit.summary().0, 1);
    assert_eq!(kit.summary().1, 1);
}

/// A child cgroup whose name is not UTF-8 is armed like any other: its task is listed
/// at the wall, and its name is no gap.
#[test]
fn kit_arms_a_child_cgroup_with_a_non_utf8_name() {
    use std::os::unix::ffi::OsStrExt;
    let Some(()) = require_v1("kit_arms_a_child_cgroup_with_a_non_utf8_name") else {
        return;
    };
    let mut s = Scratch::new("kit-bytes");
    let pod = s.cgroup("pod", None, false);
    let dir = pod.dir.join(std::ffi::OsStr::from_bytes(b"c\xff\xfe"));
    std::fs::create_dir(&dir).unwrap();
    let child = Cg {
        rel: String::new(),
        dir: dir.clone(),
    };
    let (pid, _) = {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("60");
        s.spawn(cmd)
    };
    write(&child.dir.join("cgroup.procs"), &pid.to_string());
    let ctl = ctl();
    let kit = Armed::new();
    let top = CgroupPath::new(&pod.rel);
    let me = std::process::id() as i32;
    kit.refresh(&ctl, Path::new("/proc"), me, Some(&top));
    assert_eq!(armed_pids(&kit), vec![pid], "{:?}", kit.summary());
    std::thread::sleep(oomwake::armed::LIST_CACHE);
    let l = kit.listing(&ctl, Path::new("/proc"), &top, me).unwrap();
    let listed: Vec<i32> = l.tasks.iter().map(|t| t.pid).collect();
    assert_eq!(listed, vec![pid]);
    assert!(!l.gaps.any(), "{:?}", l.gaps.first);
    s.kill_hog(pid);
    std::fs::remove_dir(&dir).unwrap();
}
