//! Stalls the kernel never reports (root, cgroup v1, `gcc` for the pinned workload,
//! `javac`/`java` for the JVM; CI installs both): a workload pinned at its limit with
//! `memory.failcnt` rising and `under_oom 0` is resolved by the policy's steps as an
//! OOM is, and a JVM whose -Xmx is above its cgroup's limit never pauses for seconds
//! at the wall.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::common::*;

fn required(name: &str, what: &str) {
    if std::env::var("OOMWAKE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{name}: {what}");
    }
    eprintln!("{name}: skipped: {what}");
}

/// Compiles integration/pinned/NAME.c, once per test binary run (tests run in
/// parallel: a second compile over a binary another test runs would fail with ETXTBSY).
fn c_program(name: &'static str) -> Option<PathBuf> {
    type Built = std::sync::Mutex<std::collections::HashMap<&'static str, Option<PathBuf>>>;
    static BUILT: std::sync::OnceLock<Built> = std::sync::OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().ok()?;
    built
        .entry(name)
        .or_insert_with(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pinned");
            std::fs::create_dir_all(&dir).ok()?;
            let out = dir.join(format!("{name}-{}", std::process::id()));
            let src = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("integration/pinned")
                .join(format!("{name}.c"));
            let st = Command::new("gcc")
                .args(["-O2", "-Wall", "-o"])
                .arg(&out)
                .arg(&src)
                .status()
                .ok()?;
            st.success().then_some(out)
        })
        .clone()
}

fn pinned_program() -> Option<PathBuf> {
    c_program("pinned")
}

fn failcnt(cg: &Cg) -> u64 {
    read(&cg.dir.join("memory.failcnt"))
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Waits for a line starting with `prefix` (other lines are skipped).
fn line(rx: &Receiver<String>, prefix: &str, timeout: Duration) -> Option<String> {
    let end = Instant::now() + timeout;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return Some(l),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Starts the pinned workload in `cg` and checks that it is stuck the silent way:
/// failcnt rising, usage at the limit, no OOM, no progress, for two seconds.
fn pinned_and_silent(s: &mut Scratch, cg: &Cg, prog: &Path, retry_ms: u32) -> Receiver<String> {
    let mut cmd = Command::new(prog);
    cmd.arg(&cg.dir).arg(retry_ms.to_string());
    let (_, lines) = s.spawn(cmd);
    assert!(
        line(&lines, "filled", Duration::from_secs(20)).is_some(),
        "the pinned workload never filled its cgroup"
    );
    let before = failcnt(cg);
    let end = Instant::now() + Duration::from_millis(2000 + 2 * u64::from(retry_ms));
    while Instant::now() < end {
        assert!(!cg.under_oom(), "a real OOM: not the stall under test");
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(100)) {
            panic!("the pinned workload progressed without help: {l}");
        }
    }
    assert!(failcnt(cg) > before, "failcnt did not rise");
    assert!(
        cg.usage() + MIB >= cg.limit(),
        "usage {} not at the limit {}",
        cg.usage(),
        cg.limit()
    );
    lines
}

#[test]
fn pinned_stall_without_an_oom_is_resolved_by_the_policy() {
    let name = "pinned_stall_without_an_oom_is_resolved_by_the_policy";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = pinned_program() else {
        return required(name, "cannot build integration/pinned/pinned.c (gcc)");
    };
    let mut s = Scratch::new("pinned");
    let cg = s.cgroup("", Some(16 * MIB), true);
    let lines = pinned_and_silent(&mut s, &cg, &prog, 20);

    let agent = Agent::start(&[("p.toml", &policy("pinned", &cg.rel, "", RAISE))], &[]);
    let progress = line(&lines, "progress", Duration::from_secs(20));
    assert!(progress.is_some(), "never unpinned\nlog:\n{}", agent.log());
    let oom = agent.expect("oom", &cg.rel, Duration::from_secs(5));
    assert_eq!(oom["trigger"], "pinned", "{oom}");
    assert_eq!(oom["under_oom"], 0);
    assert!(oom["failcnt_delta"].as_u64().unwrap_or(0) > 0, "{oom}");
    // The evidence: no page charged or uncharged over at least one sweep interval.
    assert!(
        oom["progress_events"].as_u64().is_some_and(|n| n <= 8),
        "{oom}"
    );
    assert!(
        oom["window_ms"].as_u64().is_some_and(|ms| ms >= 500),
        "{oom}"
    );
    let r = agent.expect("resolved", &cg.rel, Duration::from_secs(5));
    assert_eq!(r["by_action"], "raise_limit");
    assert_eq!(r["episode"], oom["episode"]);
    assert!(cg.limit() > 16 * MIB);
}

#[test]
fn pinned_stall_in_audit_mode_is_logged_once_and_left_alone() {
    let name = "pinned_stall_in_audit_mode_is_logged_once_and_left_alone";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = pinned_program() else {
        return required(name, "cannot build integration/pinned/pinned.c (gcc)");
    };
    let mut s = Scratch::new("pinned-audit");
    let cg = s.cgroup("", Some(16 * MIB), true);
    // Retries every 1.5 s: some sweeps (every second) see failcnt still. The stall
    // goes on all the same, so it stays one audited episode.
    let lines = pinned_and_silent(&mut s, &cg, &prog, 1500);
    let agent = Agent::start(
        &[(
            "p.toml",
            &policy("pinned", &cg.rel, "mode = \"audit\"", RAISE),
        )],
        &[],
    );
    let oom = agent.expect("oom", &cg.rel, Duration::from_secs(10));
    assert_eq!(oom["trigger"], "pinned");
    let would = agent.expect("action", &cg.rel, Duration::from_secs(5));
    assert_eq!(would["outcome"], "would");
    // Several sweeps later: still pinned, still one episode, nothing changed.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(agent.events("oom", &cg.rel).len(), 1, "{:?}", agent.audit());
    assert!(agent.events("resolved", &cg.rel).is_empty());
    assert_eq!(cg.limit(), 16 * MIB);
    assert!(lines.try_recv().is_err(), "audit mode must not unpin it");
}

#[test]
fn a_policy_with_pinned_false_leaves_a_pinned_stall_alone() {
    let name = "a_policy_with_pinned_false_leaves_a_pinned_stall_alone";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = pinned_program() else {
        return required(name, "cannot build integration/pinned/pinned.c (gcc)");
    };
    let mut s = Scratch::new("pinned-off");
    let cg = s.cgroup("", Some(16 * MIB), true);
    let lines = pinned_and_silent(&mut s, &cg, &prog, 20);
    let agent = Agent::start(
        &[("p.toml", &policy("off", &cg.rel, "pinned = false", RAISE))],
        &[],
    );
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    // Four sweeps: the same workload is detected in two when the key is not set.
    let before = failcnt(&cg);
    std::thread::sleep(Duration::from_secs(4));
    assert!(failcnt(&cg) > before, "the workload stopped retrying");
    assert!(
        agent.events("oom", &cg.rel).is_empty(),
        "{:?}\nlog:\n{}",
        agent.audit(),
        agent.log()
    );
    assert_eq!(cg.limit(), 16 * MIB);
    assert!(lines.try_recv().is_err(), "unpinned by someone");
}

/// Compiles integration/jvm/Pause.java into a temporary directory.
fn java_classes(tmp: &Path) -> Option<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/jvm/Pause.java");
    let st = Command::new("javac")
        .arg("-d")
        .arg(tmp)
        .arg(&src)
        .status()
        .ok()?;
    st.success().then_some(())
}

#[test]
fn jvm_above_its_limit_never_pauses_for_seconds_without_an_oom() {
    let name = "jvm_above_its_limit_never_pauses_for_seconds_without_an_oom";
    let Some(()) = require_v1(name) else { return };
    let classes = tempfile::tempdir().unwrap();
    if java_classes(classes.path()).is_none() {
        return required(
            name,
            "cannot compile Pause.java (apt-get install default-jdk-headless)",
        );
    }
    let mut s = Scratch::new("jvm");
    let cg = s.cgroup("", Some(128 * MIB), true);
    // A plain loan: +50% at each OOM, up to +100% (256 MiB).
    let steps = LOAN;
    // A pinned stall is judged at the first sweep at least 500 ms after the one that
    // found it cornered: two to three sweeps. With the default 1 s sweep that is up to
    // 3 s, which a JVM's pause then exceeds (2725 ms seen in CI); a 250 ms sweep judges
    // it within about 750 ms, and the bound below stays a test of the detector, not of
    // the sweep's period.
    let tmp = Agent::dir(&[("jvm.toml", &policy("jvm", &cg.rel, "", steps))]);
    std::fs::write(
        tmp.path().join("oomwake.toml"),
        "sweep_interval = \"250ms\"\n",
    )
    .unwrap();
    let agent = Agent::start_in(tmp, &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > '{}/cgroup.procs' && exec java -Xmx256m -XX:+UseSerialGC -cp '{}' Pause 64 20",
        cg.dir.display(),
        classes.path().display()
    ));
    let (_, lines) = s.spawn(cmd);
    let done = line(&lines, "done", Duration::from_secs(90))
        .unwrap_or_else(|| panic!("the JVM did not finish\nlog:\n{}", agent.log()));
    let max_gap_ms: u64 = done
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    let episodes: Vec<String> = agent
        .events("oom", &cg.rel)
        .iter()
        .map(|v| format!("{} {} window {}", v["ts"], v["trigger"], v["window_ms"]))
        .collect();
    eprintln!("{name}: the JVM's longest pause: {max_gap_ms} ms; episodes: {episodes:?}");
    // Rescued, not left for good: the longest pause is the JVM's own full collections at
    // its wall plus two or three 250 ms sweeps (1.1-2.2 s in 7 runs on an idle machine);
    // the bound leaves room for a loaded 2-core CI machine. How fast is the bench's
    // business, not this test's.
    assert!(
        max_gap_ms < 4000,
        "the JVM paused {max_gap_ms} ms\naudit:\n{:?}\nlog:\n{}",
        agent.audit(),
        agent.log()
    );
}

/// Issue 16 item 1: a cgroup at its wall that makes progress is not pinned. An idle
/// holder takes 62 MiB of 64 MiB; a writer puts 250 MB files on disk (not tmpfs) through
/// the 2 MiB left, again and again for about 5 s. failcnt rises by thousands a second,
/// usage sits at the limit and the file cache never exceeds the headroom (under 1/32 of
/// the limit), but every write completes: reclaim turns the page cache over. The policy
/// has a kill step; nothing may be killed and no episode may start.
#[test]
fn writer_through_the_headroom_of_a_full_cgroup_is_not_pinned() {
    let name = "writer_through_the_headroom_of_a_full_cgroup_is_not_pinned";
    let Some(()) = require_v1(name) else { return };
    // A directory on a disk: page cache that must be written back and reclaimed, not
    // tmpfs (whose pages cannot be dropped without swap).
    let on_disk = |d: &str| {
        let fs = nix::sys::statfs::statfs(d).ok()?;
        // ramfs has no constant in nix or libc (linux/magic.h).
        let ramfs = nix::sys::statfs::FsType(0x8584_58f6);
        let t = fs.filesystem_type();
        (t != nix::sys::statfs::TMPFS_MAGIC && t != ramfs)
            .then(|| tempfile::tempdir_in(d).ok())
            .flatten()
    };
    let Some(disk) = on_disk(env!("CARGO_TARGET_TMPDIR")).or_else(|| on_disk("/var/tmp")) else {
        return required(
            name,
            "neither CARGO_TARGET_TMPDIR nor /var/tmp is on a disk",
        );
    };
    let mut s = Scratch::new("pinned-writer");
    let cg = s.cgroup("", Some(64 * MIB), true);
    let agent = Agent::start(&[("p.toml", &policy("writer", &cg.rel, "", KILL))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let holder = s.hog(
        &cg,
        &["--touch", "62M", "--hold", "600s", "--tag", "holder"],
    );
    assert!(
        wait_until(Duration::from_secs(20), || cg.usage() >= 62 * MIB),
        "the holder never filled its 62 MiB (usage {})",
        cg.usage()
    );
    let failcnt_before = failcnt(&cg);
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(
            "echo $$ > \"$1/cgroup.procs\" || exit 1
             end=$((SECONDS + 5)); n=0
             while [ $SECONDS -lt $end ]; do
                 dd if=/dev/zero of=\"$2/f\" bs=1M count=250 2>/dev/null || exit 1
                 n=$((n + 1)); echo \"wrote $n\"
             done
             echo \"done $n\"",
        )
        .arg("writer")
        .arg(&cg.dir)
        .arg(disk.path());
    let (_, lines) = s.spawn(cmd);
    let mut at_wall = false;
    let mut most_file = 0u64;
    let done = loop {
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(l) if l.starts_with("done") => break Some(l),
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break None,
        }
        at_wall |= cg.usage() + MIB >= cg.limit();
        let stat = read(&cg.dir.join("memory.stat"));
        let file: u64 = stat
            .lines()
            .filter(|l| {
                l.starts_with("total_inactive_file ") || l.starts_with("total_active_file ")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        most_file = most_file.max(file);
        assert!(!cg.under_oom(), "a real OOM: not the workload under test");
    };
    let done = done.unwrap_or_else(|| panic!("the writer failed\nlog:\n{}", agent.log()));
    let writes: u32 = done
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let failed = failcnt(&cg) - failcnt_before;
    eprintln!(
        "{name}: {writes} files of 250 MB, failcnt +{failed}, file cache at most {most_file} bytes"
    );
    // Two more sweeps after the last write.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        s.alive(holder.pid),
        "the idle holder was killed\naudit:\n{:?}\nlog:\n{}",
        agent.audit(),
        agent.log()
    );
    assert!(
        agent.events("oom", &cg.rel).is_empty() && agent.events("action", &cg.rel).is_empty(),
        "an episode started for a cgroup making progress\naudit:\n{:?}",
        agent.audit()
    );
    // And it was the workload the old rule took for a stall.
    assert!(writes >= 2, "the writer made no progress: {done}");
    assert!(
        failed > 1000,
        "failcnt rose by only {failed}: not at the wall"
    );
    assert!(at_wall, "usage never reached the limit");
    assert!(most_file < 64 * MIB / 32, "{most_file} bytes of file cache");
}

/// What [`lookups_beside_an_idle_holder`] saw.
struct LookupsRun {
    holder: Hog,
    /// The lookups program's last line ("done N ..."), if it finished.
    done: Option<String>,
    /// How far `limited`'s failcnt rose while it ran.
    failed: u64,
    /// Whether `limited` was seen at its wall meanwhile.
    at_wall: bool,
}

/// An idle holder of 62 MiB in `workload` (below or at `limited`, the cgroup with the
/// 64 MiB limit the agent watches), then the lookups program (negative dentries: progress
/// at the wall that moves no page) in `workload` for 5 s.
fn lookups_beside_an_idle_holder(
    s: &mut Scratch,
    limited: &Cg,
    workload: &Cg,
    prog: &Path,
    names: &Path,
) -> LookupsRun {
    let holder = s.hog(
        workload,
        &["--touch", "62M", "--hold", "600s", "--tag", "holder"],
    );
    assert!(
        wait_until(Duration::from_secs(20), || limited.usage() >= 62 * MIB),
        "the holder never filled its 62 MiB (usage {})",
        limited.usage()
    );
    let failcnt_before = failcnt(limited);
    let mut cmd = Command::new(prog);
    cmd.arg(&workload.dir).arg(names).arg("5");
    let (_, lines) = s.spawn(cmd);
    assert!(line(&lines, "start", Duration::from_secs(10)).is_some());
    let mut at_wall = false;
    let done = loop {
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(l) if l.starts_with("done") => break Some(l),
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break None,
        }
        at_wall |= limited.usage() + MIB >= limited.limit();
        assert!(
            !limited.under_oom(),
            "a real OOM: not the workload under test"
        );
    };
    LookupsRun {
        holder,
        done,
        failed: failcnt(limited) - failcnt_before,
        at_wall,
    }
}

/// The agent left `rel` alone: the holder lives, no episode started, and the run was a
/// real one (the lookups finished, charges failed at the wall).
fn assert_left_alone(s: &mut Scratch, agent: &Agent, rel: &str, run: &LookupsRun) {
    assert!(
        s.alive(run.holder.pid),
        "the idle holder was killed\naudit:\n{:?}\nlog:\n{}",
        agent.audit(),
        agent.log()
    );
    assert!(
        agent.events("oom", rel).is_empty() && agent.events("action", rel).is_empty(),
        "an episode started for a cgroup making progress\naudit:\n{:?}",
        agent.audit()
    );
    assert!(
        run.done.is_some(),
        "the lookups failed\nlog:\n{}",
        agent.log()
    );
    assert!(
        run.failed > 1000,
        "failcnt rose by only {}: not at the wall",
        run.failed
    );
}

/// Progress that moves no page: a process looking up names that do not exist next to
/// an idle holder of 62 MiB of 64 MiB. Each lookup leaves a negative dentry (kernel
/// memory); at the wall reclaim frees old ones for the new. failcnt rises by thousands
/// a second, usage sits at the limit, there is no file cache and `total_pgpgin` /
/// `total_pgpgout` stand still, but the process runs flat out and its lookups go on.
/// Nothing may be killed.
#[test]
fn lookups_at_the_wall_that_move_no_page_are_not_pinned() {
    let name = "lookups_at_the_wall_that_move_no_page_are_not_pinned";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = c_program("lookups") else {
        return required(name, "cannot build integration/pinned/lookups.c (gcc)");
    };
    let names = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut s = Scratch::new("pinned-lookups");
    let cg = s.cgroup("", Some(64 * MIB), true);
    let agent = Agent::start(&[("p.toml", &policy("lookups", &cg.rel, "", KILL))], &[]);
    agent.expect("watch", &cg.rel, Duration::from_secs(10));
    let pgpg = || {
        read(&cg.dir.join("memory.stat"))
            .lines()
            .filter(|l| l.starts_with("total_pgpgin ") || l.starts_with("total_pgpgout "))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let pgpg_before = pgpg();
    let run = lookups_beside_an_idle_holder(&mut s, &cg, &cg, &prog, names.path());
    let pgpg_moved = pgpg() - pgpg_before;
    let lookups: u64 = run
        .done
        .as_deref()
        .and_then(|d| d.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "{name}: {lookups} lookups, failcnt +{}, page charge events +{pgpg_moved}",
        run.failed
    );
    // Two more sweeps after the last lookup.
    std::thread::sleep(Duration::from_millis(2500));
    assert_left_alone(&mut s, &agent, &cg.rel, &run);
    // And it was at the wall, failing charges, all along, making progress.
    assert!(
        lookups > 100_000,
        "the lookups made no progress: {:?}",
        run.done
    );
    assert!(run.at_wall, "usage never reached the limit");
}

/// The same lookups at the wall, with the limit on a parent (a pod) and the processes
/// in a child without a limit of its own (a container): the parent's `cgroup.procs` is
/// empty, so its processes' CPU must be read from the whole subtree, or the idle test
/// proves nothing and the busy cgroup is taken for pinned. Nothing may be killed.
#[test]
fn lookups_in_a_child_of_the_limited_cgroup_are_not_pinned() {
    let name = "lookups_in_a_child_of_the_limited_cgroup_are_not_pinned";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = c_program("lookups") else {
        return required(name, "cannot build integration/pinned/lookups.c (gcc)");
    };
    let names = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut s = Scratch::new("pinned-lookups-child");
    let pod = s.cgroup("", Some(64 * MIB), true);
    let ctr = s.cgroup("c", None, false);
    let agent = Agent::start(&[("p.toml", &policy("lookups", &pod.rel, "", KILL))], &[]);
    agent.expect("watch", &pod.rel, Duration::from_secs(10));
    let run = lookups_beside_an_idle_holder(&mut s, &pod, &ctr, &prog, names.path());
    std::thread::sleep(Duration::from_millis(2500));
    eprintln!("{name}: {:?}, failcnt +{}", run.done, run.failed);
    assert_left_alone(&mut s, &agent, &pod.rel, &run);
}

/// A pinned workload in a child of the limited cgroup (a container in a pod) is still
/// found pinned: its CPU is read from the subtree, and it sleeps between retries.
#[test]
fn pinned_stall_in_a_child_of_the_limited_cgroup_is_resolved() {
    let name = "pinned_stall_in_a_child_of_the_limited_cgroup_is_resolved";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = pinned_program() else {
        return required(name, "cannot build integration/pinned/pinned.c (gcc)");
    };
    let mut s = Scratch::new("pinned-child");
    let pod = s.cgroup("", Some(16 * MIB), true);
    let ctr = s.cgroup("c", None, false);
    let mut cmd = Command::new(&prog);
    cmd.arg(&ctr.dir).arg("20");
    let (_, lines) = s.spawn(cmd);
    assert!(
        line(&lines, "filled", Duration::from_secs(20)).is_some(),
        "the pinned workload never filled its cgroup"
    );
    let agent = Agent::start(&[("p.toml", &policy("pinned", &pod.rel, "", RAISE))], &[]);
    let progress = line(&lines, "progress", Duration::from_secs(20));
    assert!(progress.is_some(), "never unpinned\nlog:\n{}", agent.log());
    let oom = agent.expect("oom", &pod.rel, Duration::from_secs(5));
    assert_eq!(oom["trigger"], "pinned", "{oom}");
    let r = agent.expect("resolved", &pod.rel, Duration::from_secs(5));
    assert_eq!(r["by_action"], "raise_limit");
    assert!(pod.limit() > 16 * MIB);
}

/// The lookups at the wall under a short `sweep_interval` (allowed down to 1ms): the
/// CPU time of `/proc/PID/stat` moves in clock ticks (10 ms at USER_HZ 100), so over a
/// window shorter than a few ticks a process running flat out can show no CPU used at
/// all, and the page counters of a workload that moves no page stand still. Nothing
/// may be killed.
#[test]
fn lookups_at_the_wall_under_a_short_sweep_interval_are_not_pinned() {
    let name = "lookups_at_the_wall_under_a_short_sweep_interval_are_not_pinned";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = c_program("lookups") else {
        return required(name, "cannot build integration/pinned/lookups.c (gcc)");
    };
    let names = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut s = Scratch::new("pinned-lookups-fast");
    // The agent's root is the scratch tree: its paths start there.
    let cg = s.cgroup("w", Some(64 * MIB), true);
    let tmp = Agent::dir(&[("p.toml", &policy("lookups", "/w", "", KILL))]);
    std::fs::write(
        tmp.path().join("oomwake.toml"),
        "sweep_interval = \"10ms\"\n",
    )
    .unwrap();
    let agent = Agent::start_in_root(tmp, &s.dir, &[]);
    agent.expect("watch", "/w", Duration::from_secs(10));
    let run = lookups_beside_an_idle_holder(&mut s, &cg, &cg, &prog, names.path());
    std::thread::sleep(Duration::from_millis(500));
    eprintln!("{name}: {:?}, failcnt +{}", run.done, run.failed);
    assert_left_alone(&mut s, &agent, "/w", &run);
}

/// A pinned stall left unresolved (the policy's only step cannot help) ends: the pinned
/// workload is gone, and a healthy process fills the room up to the wall again, where it
/// sits without a failed charge. The stall is closed (`resolved`, unaided) and no
/// longer listed as stuck: at the wall is not stuck when no charge fails.
#[test]
fn a_held_pinned_stall_ends_when_charges_stop_failing_though_at_the_wall() {
    let name = "a_held_pinned_stall_ends_when_charges_stop_failing_though_at_the_wall";
    let Some(()) = require_v1(name) else { return };
    let Some(prog) = pinned_program() else {
        return required(name, "cannot build integration/pinned/pinned.c (gcc)");
    };
    let mut s = Scratch::new("pinned-held");
    let cg = s.cgroup("w", Some(16 * MIB), true);
    let steps = "[[step]]\naction = \"exec\"\ncommand = [\"/bin/true\"]\n";
    let tmp = Agent::dir(&[("p.toml", &policy("p", "/w", "", steps))]);
    let mut cmd = Command::new(&prog);
    cmd.arg(&cg.dir).arg("20");
    let (pinned, lines) = s.spawn(cmd);
    assert!(line(&lines, "filled", Duration::from_secs(20)).is_some());
    let agent = Agent::start_in_root(tmp, &s.dir, &[]);
    let u = agent.expect("unresolved", "/w", Duration::from_secs(10));
    assert_eq!(u["reason"], "all steps done", "{u}");
    // The stall ends; a healthy holder sits 1/2 MiB below the limit.
    s.kill_hog(pinned);
    let holder = s.hog(
        &cg,
        &["--touch", "15M", "--hold", "120s", "--tag", "holder"],
    );
    assert!(wait_until(Duration::from_secs(10), || cg.usage() >= 15 * MIB));
    let failed = failcnt(&cg);
    let status = || read(&agent.tmp.path().join("state/status.json"));
    let r = agent.expect("resolved", "/w", Duration::from_secs(15));
    assert_eq!(r["unaided"], true, "{r}");
    assert_eq!(r["episode"], u["episode"], "{r}");
    assert!(
        wait_until(Duration::from_secs(3), || !status().contains("\"/w\"")
            || !status().contains("all steps done")),
        "still listed as stuck: {}",
        status()
    );
    assert_eq!(failcnt(&cg), failed, "charges failed meanwhile");
    assert!(cg.usage() + MIB >= cg.limit(), "not at the wall");
    assert!(s.alive(holder.pid));
}
