//! `oomwake demo`: a self-contained show of the problem and its rescue, on the real
//! hierarchy (root needed). A scratch cgroup below our own memory cgroup (or at the top
//! of `--cgroup-root` when we live outside it) gets a 32 MiB limit with the OOM killer
//! disabled; a hog that wants 48 MiB hangs there; then an agent with a raise_limit
//! policy starts and the hog finishes. Everything it creates is removed at the end, also
//! on failure and on Ctrl-C (SIGINT, SIGTERM or SIGHUP end the show at its next wait).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cgroup::{parse, CgroupPath, Hierarchy};

const LIMIT: u64 = 32 << 20;

/// The loan: twice the limit, well above the 48 MiB the hog touches plus what its own
/// binary, stack and heap take (a loan of exactly 48 MiB left the hog a few pages
/// short in 2 runs of 17, and the policy's kill step ended the show).
const POLICY_STEPS: &str = "[[step]]\naction = \"raise_limit\"\nby = \"100%\"\nmax_extra = \"100%\"\nhold = \"30s\"\n\n[[step]]\naction = \"kill\"\n";

struct Scratch {
    dir: PathBuf,
    tmp: PathBuf,
    children: Vec<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for c in &mut self.children {
            // Our own children, not yet reaped: their PIDs are still ours.
            let _ = c.kill();
            let _ = c.wait();
        }
        crate::cgroup::remove_tree(&self.dir, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Set by SIGINT, SIGTERM or SIGHUP: every wait of the show checks it and ends the
/// show, so that [`Scratch`]'s drop removes what it made (the default action of these
/// signals would end the process with the cgroup and the files left behind).
struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    fn install() -> anyhow::Result<Interrupt> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            signal_hook::flag::register(sig, flag.clone())
                .with_context(|| format!("installing a handler for signal {sig}"))?;
        }
        Ok(Interrupt(flag))
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            bail!("interrupted; the scratch cgroup and files are removed");
        }
        Ok(())
    }

    /// Sleeps `d` in short slices, ending early when interrupted.
    fn sleep(&self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check()?;
            std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
        }
        self.check()
    }
}

/// Where the scratch cgroup goes: below our own memory cgroup when `--cgroup-root`
/// contains it, else at the top of that root. Returns (its directory, its path as the
/// agent started with that root names it).
fn scratch_place(h: &Hierarchy, name: &str) -> anyhow::Result<(PathBuf, CgroupPath)> {
    let own = parse::proc_memory_cgroup(&read(Path::new("/proc/self/cgroup")))
        .context("cannot find our memory cgroup in /proc/self/cgroup")?;
    let parent = h
        .from_proc_path(own.as_bytes())
        .unwrap_or_else(CgroupPath::root);
    let cg = parent.join(name);
    Ok((h.dir(&cg), cg))
}

pub fn run(cgroup_root: &Path) -> anyhow::Result<()> {
    if !cgroup_root.join("memory.oom_control").exists() {
        bail!(
            "{} is not a cgroup v1 memory hierarchy; the demo needs one (and root)",
            cgroup_root.display()
        );
    }
    let h = Hierarchy::detect(cgroup_root, Path::new("/proc"))
        .with_context(|| format!("opening {}", cgroup_root.display()))?;
    let stop = Interrupt::install()?;
    let pid = std::process::id();
    let name = format!("oomwake-demo-{pid}");
    let (dir, rel) = scratch_place(&h, &name)?;
    let tmp = std::env::temp_dir().join(&name);
    std::fs::create_dir(&dir)
        .with_context(|| format!("creating {} (are you root?)", dir.display()))?;
    let mut s = Scratch {
        dir: dir.clone(),
        tmp: tmp.clone(),
        children: Vec::new(),
    };
    std::fs::create_dir_all(tmp.join("policies"))?;
    std::fs::write(dir.join("memory.limit_in_bytes"), LIMIT.to_string())?;
    std::fs::write(dir.join("memory.oom_control"), "1")?;
    println!(
        "1. Created {} with a 32 MiB limit and oom_kill_disable 1.",
        dir.display()
    );

    let exe = std::env::current_exe()?;
    let mut hog = Command::new(&exe)
        .args(["__hog", "--join"])
        .arg(&dir)
        .args(["--touch", "48M", "--tag", "demo-hog", "--hold", "1s"])
        .stdout(Stdio::piped())
        .spawn()?;
    let hog_pid = hog.id();
    let hog_out = hog.stdout.take().context("hog stdout")?;
    s.children.push(hog);
    // The hog's report is read on a thread: the show waits for it in slices and stays
    // interruptible.
    let (report_tx, report_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let res = BufReader::new(hog_out).read_line(&mut line).map(|_| line);
        let _ = report_tx.send(res);
    });
    println!("2. Started a hog (pid {hog_pid}) that touches 48 MiB page by page.");

    let t0 = Instant::now();
    while !read(&dir.join("memory.oom_control")).contains("under_oom 1") {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the hog did not reach the limit within 10 s");
        }
        stop.sleep(Duration::from_millis(20))?;
    }
    stop.sleep(Duration::from_secs(2))?;
    let proc_dir = PathBuf::from(format!("/proc/{hog_pid}"));
    let state = read(&proc_dir.join("stat"))
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    println!(
        "3. Stuck: under_oom 1, hog state {state}, wchan {}, usage {} bytes. No kernel OOM killer \
         will help; without an agent it stays like this forever.",
        read(&proc_dir.join("wchan")).trim(),
        read(&dir.join("memory.usage_in_bytes")).trim()
    );

    let policy = format!(
        "name = \"demo\"\n[match]\ncgroup = [{}]\n\n{POLICY_STEPS}",
        toml_string(rel.as_str())
    );
    std::fs::write(tmp.join("policies/demo.toml"), &policy)?;
    let audit = tmp.join("audit.jsonl");
    let agent = Command::new(&exe)
        .arg("run")
        .arg("--cgroup-root")
        .arg(cgroup_root)
        .arg("--policies")
        .arg(tmp.join("policies"))
        .arg("--state-dir")
        .arg(tmp.join("state"))
        .arg("--audit-log")
        .arg(&audit)
        .env("RUST_LOG", "warn")
        .spawn()?;
    let agent_pid = agent.id();
    s.children.push(agent);
    println!("4. Started oomwake (pid {agent_pid}) with a policy: raise_limit by 100% (at most +100%), then kill.");

    let t1 = Instant::now();
    let line = loop {
        match report_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(res) => break res?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break String::new(),
        }
        stop.check()?;
        if t1.elapsed() > Duration::from_secs(60) {
            bail!("the hog did not finish within 60 s of the agent's start");
        }
    };
    let report: serde_json::Value = serde_json::from_str(line.trim()).with_context(|| {
        format!(
            "the hog did not finish: no report; the agent's audit log:\n{}",
            read(&audit)
        )
    })?;
    println!(
        "5. The hog finished: {} bytes touched; its longest stall was {} ms (the time it spent stuck, mostly before the agent started).",
        report["touched_bytes"], report["longest_stall_us"].as_u64().unwrap_or(0) as f64 / 1000.0
    );
    // The hog may finish before the agent has written an episode's last line.
    let settled = |t: &str| {
        let count = |e: &str| t.matches(&format!("\"event\":\"{e}\"")).count();
        count("oom") == count("resolved") + count("unresolved")
    };
    let t2 = Instant::now();
    while !settled(&read(&audit)) && t2.elapsed() < Duration::from_secs(3) {
        stop.sleep(Duration::from_millis(20))?;
    }
    println!("   The agent's audit log:");
    for l in read(&audit).lines() {
        println!("   {l}");
    }
    // Let the hog exit, then stop the agent: it gives the loan back on the way out.
    if let Some(h) = s.children.first_mut() {
        let _ = h.wait();
    }
    // Our own unreaped child, signalled by its PID.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    if let Some(a) = s.children.get_mut(1) {
        let _ = a.wait();
    }
    println!(
        "6. Agent stopped; limit back to {} bytes (was 32 MiB before the loan).",
        read(&dir.join("memory.limit_in_bytes")).trim()
    );
    for l in read(&audit).lines().filter(|l| l.contains("\"restore\"")) {
        println!("   {l}");
    }
    drop(s);
    println!("7. Cleaned up: scratch cgroup and temporary files removed.");
    Ok(())
}

/// `s` as a TOML basic string (a cgroup path may hold quotes or backslashes).
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
