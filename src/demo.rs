//! `oomwake demo`: a self-contained show of the problem and its rescue, on the real
//! hierarchy (root needed). A scratch cgroup below our own memory cgroup gets a 32 MiB
//! limit with the OOM killer disabled; a hog that wants 48 MiB hangs there; then an
//! agent with a raise_limit policy starts and the hog finishes. Everything it creates is
//! removed at the end, also on failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cgroup::parse;

const LIMIT: u64 = 32 << 20;

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

pub fn run(cgroup_root: &Path) -> anyhow::Result<()> {
    let own = parse::proc_memory_cgroup(&read(Path::new("/proc/self/cgroup")))
        .context("cannot find our memory cgroup in /proc/self/cgroup")?;
    if !cgroup_root.join("memory.oom_control").exists() {
        bail!(
            "{} is not a cgroup v1 memory hierarchy; the demo needs one (and root)",
            cgroup_root.display()
        );
    }
    let pid = std::process::id();
    let parent = cgroup_root.join(own.trim_start_matches('/'));
    let dir = parent.join(format!("oomwake-demo-{pid}"));
    let tmp = std::env::temp_dir().join(format!("oomwake-demo-{pid}"));
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
    let rel = format!("{}/oomwake-demo-{pid}", own.trim_end_matches('/'));
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
    println!("2. Started a hog (pid {hog_pid}) that touches 48 MiB page by page.");

    let t0 = Instant::now();
    while !read(&dir.join("memory.oom_control")).contains("under_oom 1") {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the hog did not reach the limit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2));
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
        "name = \"demo\"\n[match]\ncgroup = [\"{rel}\"]\n\n[[step]]\naction = \"raise_limit\"\nby = \"50%\"\nmax_extra = \"100%\"\nhold = \"30s\"\n\n[[step]]\naction = \"kill\"\n"
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
    println!("4. Started oomwake (pid {agent_pid}) with a policy: raise_limit by 50% (at most +100%), then kill.");

    let mut line = String::new();
    BufReader::new(hog_out).read_line(&mut line)?;
    let report: serde_json::Value =
        serde_json::from_str(line.trim()).context("the hog did not finish: no report")?;
    println!(
        "5. The hog finished: {} bytes touched; its longest stall was {} ms (the time it spent stuck, mostly before the agent started).",
        report["touched_bytes"], report["longest_stall_us"].as_u64().unwrap_or(0) as f64 / 1000.0
    );
    // The hog may finish before the agent has written an episode's last line.
    let settled = |t: &str| {
        let count = |e: &str| t.matches(&format!("\"event\":\"{e}\"")).count();
        count("oom") == count("resolved") + count("unresolved")
    };
    let t1 = Instant::now();
    while !settled(&read(&audit)) && t1.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("   The agent's audit log:");
    for l in read(&audit).lines() {
        println!("   {l}");
    }
    // Let the hog exit, then stop the agent: it gives the loan back on the way out.
    if let Some(h) = s.children.first_mut() {
        let _ = h.wait();
    }
    // SAFETY-free signalling of our own unreaped child by PID.
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
