//! `oomwake-bench`: how fast oomwake ends a stall, how it scales and what it costs, on
//! real cgroups (root, cgroup v1). Run it with `integration/bench.sh [--short]`.
//!
//! Every stall figure is the longest gap the hog saw between two page touches, with
//! oomwake side by side with the floor (a minimal eventfd -> write-limit loop, in this
//! file) and a 1 s polling baseline (oomwake with events off and a 1 s sweep). Scratch
//! cgroups live below the bench's own memory cgroup and are removed at the end.
//! Prints a table, writes JSON (stable keys, sorted) and an SVG plot. No assertions:
//! targets are reported, not enforced.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const MEMROOT: &str = "/sys/fs/cgroup/memory";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("floor") {
        floor(&args[1..]);
        return;
    }
    if args.first().map(String::as_str) == Some("floor-early") {
        floor_early(&args[1..]);
        return;
    }
    let short = args.iter().any(|a| a == "--short");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    if !nix::unistd::geteuid().is_root() || !Path::new(MEMROOT).join("memory.oom_control").exists()
    {
        eprintln!(
            "oomwake-bench: skipped: needs root and the cgroup v1 memory hierarchy at {MEMROOT}"
        );
        return;
    }
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let mut b = Bench::new(short);
    b.only = only.clone();
    let mut results = b.run_all();
    drop(b);
    // `--only X --out FILE`: the other scenarios of an earlier run stay in FILE.
    if let (Some(x), Some(path)) = (&only, &out) {
        let earlier = serde_json::from_str::<Value>(&read(path)).ok();
        if let Some(mut all) = earlier.filter(Value::is_object) {
            all[x.as_str()] = results[x.as_str()].take();
            results = all;
        }
    }
    print_table(&results);
    if let Some(path) = out {
        let text = serde_json::to_string_pretty(&results).unwrap_or_default();
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| eprintln!("{}: {e}", path.display()));
        let svg = path.with_extension("svg");
        std::fs::write(&svg, plot(&results))
            .unwrap_or_else(|e| eprintln!("{}: {e}", svg.display()));
        eprintln!("wrote {} and {}", path.display(), svg.display());
        if results["growth"].is_object() {
            let g = path.with_file_name("bench-growth.svg");
            std::fs::write(&g, plot_growth(&results))
                .unwrap_or_else(|e| eprintln!("{}: {e}", g.display()));
            eprintln!("wrote {}", g.display());
        }
    }
}

// ---------------------------------------------------------------------------------
// The floor: register an eventfd per cgroup, and on each wake write a higher limit.

fn floor(dirs: &[String]) {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let epoll = Epoll::new(EpollCreateFlags::empty()).expect("epoll");
    let mut cgs = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let dir = PathBuf::from(d);
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).expect("eventfd");
        let oc = std::fs::File::open(dir.join("memory.oom_control")).expect("oom_control");
        std::fs::write(
            dir.join("cgroup.event_control"),
            format!("{} {}", efd.as_raw_fd(), oc.as_raw_fd()),
        )
        .expect("event_control");
        epoll
            .add(&efd, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
            .expect("epoll add");
        let limit: u64 = std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(32 * MIB);
        cgs.push((dir, efd, limit, limit * 2));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut evs = vec![EpollEvent::empty(); 64];
    loop {
        let n = epoll.wait(&mut evs, EpollTimeout::NONE).unwrap_or(0);
        for ev in &evs[..n] {
            let (dir, efd, limit, max) = &mut cgs[ev.data() as usize];
            let _ = efd.read();
            let new = (*limit + *limit / 2).min(*max);
            if new > *limit
                && std::fs::write(dir.join("memory.limit_in_bytes"), new.to_string()).is_ok()
            {
                *limit = new;
            }
        }
    }
}

/// The early floor: the floor's OOM eventfd per cgroup, plus a usage threshold at 75% of
/// the limit; when usage crosses it upwards, the limit goes up by half (at most to
/// twice the first) and the threshold is closed and registered again for the new limit.
fn floor_early(dirs: &[String]) {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    use nix::sys::eventfd::{EfdFlags, EventFd};
    struct Cg {
        dir: PathBuf,
        oom: EventFd,
        thr: Option<EventFd>,
        usage: std::fs::File,
        limit: u64,
        max: u64,
    }
    let epoll = Epoll::new(EpollCreateFlags::empty()).expect("epoll");
    let arm = |epoll: &Epoll, i: usize, cg: &mut Cg| {
        if let Some(old) = cg.thr.take() {
            let _ = epoll.delete(&old);
        }
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).expect("eventfd");
        let line = format!(
            "{} {} {}",
            efd.as_raw_fd(),
            cg.usage.as_raw_fd(),
            cg.limit / 4 * 3
        );
        if std::fs::write(cg.dir.join("cgroup.event_control"), line).is_ok() {
            let _ = epoll.add(
                &efd,
                EpollEvent::new(EpollFlags::EPOLLIN, (2 * i + 1) as u64),
            );
            cg.thr = Some(efd);
        }
    };
    let mut cgs = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let dir = PathBuf::from(d);
        let oom = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).expect("eventfd");
        let oc = std::fs::File::open(dir.join("memory.oom_control")).expect("oom_control");
        std::fs::write(
            dir.join("cgroup.event_control"),
            format!("{} {}", oom.as_raw_fd(), oc.as_raw_fd()),
        )
        .expect("event_control");
        epoll
            .add(&oom, EpollEvent::new(EpollFlags::EPOLLIN, (2 * i) as u64))
            .expect("epoll add");
        let limit: u64 = read(&dir.join("memory.limit_in_bytes"))
            .trim()
            .parse()
            .unwrap_or(32 * MIB);
        let usage = std::fs::File::open(dir.join("memory.usage_in_bytes")).expect("usage");
        let mut cg = Cg {
            dir,
            oom,
            thr: None,
            usage,
            limit,
            max: limit * 2,
        };
        arm(&epoll, i, &mut cg);
        cgs.push(cg);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut evs = vec![EpollEvent::empty(); 64];
    loop {
        let n = epoll.wait(&mut evs, EpollTimeout::NONE).unwrap_or(0);
        for ev in &evs[..n] {
            let i = (ev.data() / 2) as usize;
            let cg = &mut cgs[i];
            if ev.data() % 2 == 1 {
                if let Some(t) = &cg.thr {
                    let _ = t.read();
                }
                let usage: u64 = read(&cg.dir.join("memory.usage_in_bytes"))
                    .trim()
                    .parse()
                    .unwrap_or(0);
                if usage < cg.limit / 4 * 3 {
                    continue;
                }
            } else {
                let _ = cg.oom.read();
            }
            let new = (cg.limit + cg.limit / 2).min(cg.max);
            if new > cg.limit
                && std::fs::write(cg.dir.join("memory.limit_in_bytes"), new.to_string()).is_ok()
            {
                cg.limit = new;
                arm(&epoll, i, cg);
            }
        }
    }
}

/// The bench's own count of OOM notifications on a cgroup (whatever the agent does).
struct OomCount(nix::sys::eventfd::EventFd);

impl OomCount {
    fn register(dir: &Path) -> Option<OomCount> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).ok()?;
        let oc = std::fs::File::open(dir.join("memory.oom_control")).ok()?;
        std::fs::write(
            dir.join("cgroup.event_control"),
            format!("{} {}", efd.as_raw_fd(), oc.as_raw_fd()),
        )
        .ok()?;
        Some(OomCount(efd))
    }
    fn count(&self) -> u64 {
        self.0.read().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Floor,
    FloorEarly,
    Oomwake,
    Polling,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Floor => "floor",
            Mode::FloorEarly => "floor_early",
            Mode::Oomwake => "oomwake",
            Mode::Polling => "polling_1s",
        }
    }
}

struct Bench {
    short: bool,
    base: PathBuf,
    base_rel: String,
    tmp: PathBuf,
    oomwake: PathBuf,
    hog: PathBuf,
    me: PathBuf,
    seq: u32,
    /// Run only this scenario (`--only raise_limit`), for profiling.
    only: Option<String>,
}

struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines: rx }
    }
    fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn term(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

struct Agent {
    proc: Proc,
    audit: PathBuf,
    mode: Mode,
}

impl Agent {
    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    fn count(&self, event: &str) -> usize {
        let needle = format!("\"event\":\"{event}\"");
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A clean stop: oomwake gives its loans back before the cgroups are removed.
        self.proc.term();
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// min / median / p99 / max (nearest rank) of values in ms.
fn summary(v: &[f64]) -> Value {
    if v.is_empty() {
        return json!({"n": 0});
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "n": s.len(),
        "min_ms": r3(s[0]),
        "median_ms": r3(rank(0.5)),
        "p99_ms": r3(rank(0.99)),
        "max_ms": r3(s[s.len() - 1]),
    })
}

impl Bench {
    fn new(short: bool) -> Bench {
        let own = oomwake::cgroup::parse::proc_memory_cgroup(&read(Path::new("/proc/self/cgroup")))
            .expect("own memory cgroup");
        let leaf = format!("oomwake-bench-{}", std::process::id());
        let base_rel = format!("{}/{leaf}", own.trim_end_matches('/'));
        let base = Path::new(MEMROOT).join(base_rel.trim_start_matches('/'));
        std::fs::create_dir(&base).expect("create the scratch cgroup");
        let me = std::env::current_exe().expect("current_exe");
        let dir = me.parent().expect("exe dir").to_path_buf();
        let (oomwake, hog) = (dir.join("oomwake"), dir.join("oomwake-hog"));
        assert!(
            oomwake.exists() && hog.exists(),
            "build the binaries first: cargo build --release (or use integration/bench.sh)"
        );
        let tmp = std::env::temp_dir().join(leaf);
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        Bench {
            short,
            base,
            base_rel,
            tmp,
            oomwake,
            hog,
            me,
            seq: 0,
            only: None,
        }
    }

    /// A new cgroup `name` below the scratch root.
    fn cgroup(&self, name: &str, limit: Option<u64>, okd: bool) -> (PathBuf, String) {
        let dir = self.base.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir cgroup");
        if let Some(l) = limit {
            std::fs::write(dir.join("memory.limit_in_bytes"), l.to_string()).expect("limit");
        }
        if okd {
            std::fs::write(dir.join("memory.oom_control"), "1").expect("oom_control");
        }
        (dir, format!("{}/{name}", self.base_rel))
    }

    fn remove(&self, name: &str) {
        oomwake::cgroup::remove_tree(&self.base.join(name), Duration::from_secs(2));
    }

    fn hog(&self, dir: &Path, args: &[&str]) -> Proc {
        let mut c = Command::new(&self.hog);
        c.arg("--join").arg(dir).args(args);
        Proc::spawn(c)
    }

    /// Starts an agent of `mode` for the cgroups matching `glob` (oomwake) or for
    /// `dirs` (floor), and waits until it watches `expect` cgroups.
    fn agent(
        &mut self,
        mode: Mode,
        glob: &str,
        steps: &str,
        dirs: &[PathBuf],
        expect: usize,
    ) -> Agent {
        self.seq += 1;
        let d = self.tmp.join(format!("agent-{}", self.seq));
        std::fs::create_dir_all(d.join("policies")).expect("agent dir");
        let audit = d.join("audit.jsonl");
        let proc = match mode {
            Mode::Floor | Mode::FloorEarly => {
                let mut c = Command::new(&self.me);
                let sub = if mode == Mode::Floor {
                    "floor"
                } else {
                    "floor-early"
                };
                c.arg(sub).args(dirs);
                let p = Proc::spawn(c);
                assert_eq!(
                    p.line(Duration::from_secs(30)).as_deref(),
                    Some("ready"),
                    "floor did not start"
                );
                p
            }
            Mode::Oomwake | Mode::Polling => {
                let policy =
                    format!("name = \"bench\"\n[match]\ncgroup = [\"{glob}\"]\n\n{steps}\n");
                std::fs::write(d.join("policies/bench.toml"), policy).expect("policy");
                let cfg = if mode == Mode::Polling {
                    "events = false\nsweep_interval = \"1s\"\n"
                } else {
                    ""
                };
                std::fs::write(d.join("oomwake.toml"), cfg).expect("config");
                let mut c = Command::new(&self.oomwake);
                c.arg("run")
                    .arg("--config")
                    .arg(d.join("oomwake.toml"))
                    .arg("--cgroup-root")
                    .arg(MEMROOT)
                    .arg("--policies")
                    .arg(d.join("policies"))
                    .arg("--state-dir")
                    .arg(d.join("state"))
                    .arg("--audit-log")
                    .arg(&audit)
                    .env("RUST_LOG", "warn");
                Proc::spawn(c)
            }
        };
        let a = Agent { proc, audit, mode };
        if !matches!(mode, Mode::Floor | Mode::FloorEarly) {
            let ok = wait_until(Duration::from_secs(60), || a.count("watch") >= expect);
            assert!(ok, "agent watched {} of {expect} cgroups", a.count("watch"));
        }
        a
    }

    fn run_all(&mut self) -> Value {
        let mut r = BTreeMap::new();
        r.insert("machine".to_string(), machine());
        r.insert(
            "mode".to_string(),
            json!(if self.short { "short" } else { "full" }),
        );
        type Scenario = fn(&mut Bench) -> Value;
        let all: [(&str, Scenario); 6] = [
            ("raise_limit", Bench::raise_stall),
            ("growth", Bench::growth),
            ("kill", Bench::kill_stall),
            ("reclaim_then_raise", Bench::reclaim_then_raise),
            ("scale", Bench::scale),
            ("footprint", Bench::footprint),
        ];
        for (name, f) in all {
            if self.only.as_deref().is_none_or(|o| o == name) {
                let v = f(self);
                r.insert(name.to_string(), v);
            }
        }
        json!(r)
    }

    const RAISE: &'static str =
        "[[step]]\naction = \"raise_limit\"\nby = \"50%\"\nmax_extra = \"100%\"\nhold = \"10m\"\n";

    /// One cgroup, limit 32 MiB, a hog that wants 40 MiB: the stall it sees at the limit.
    fn raise_stall(&mut self) -> Value {
        let runs = if self.short { 5 } else { 20 };
        let mut out = BTreeMap::new();
        for mode in [Mode::Floor, Mode::Oomwake, Mode::Polling] {
            let set = format!("raise-{}", mode.name());
            let mut dirs = Vec::new();
            for i in 0..runs {
                dirs.push(self.cgroup(&format!("{set}/r{i}"), Some(32 * MIB), true).0);
            }
            let glob = format!("{}/{set}/*", self.base_rel);
            let agent = self.agent(mode, &glob, Self::RAISE, &dirs, runs);
            let mut stalls = Vec::new();
            for d in &dirs {
                let mut h = self.hog(d, &["--touch", "40M"]);
                match h
                    .line(Duration::from_secs(15))
                    .and_then(|l| serde_json::from_str::<Value>(&l).ok())
                {
                    Some(v) => stalls.push(v["longest_stall_us"].as_f64().unwrap_or(0.0) / 1000.0),
                    None => eprintln!("{}: a hog did not finish", mode.name()),
                }
                h.kill();
            }
            let mut entry = json!({"stall": summary(&stalls), "samples_ms": stalls});
            if mode != Mode::Floor {
                let audit = agent.audit();
                let resolved: Vec<&Value> =
                    audit.iter().filter(|v| v["event"] == "resolved").collect();
                let detect_to_recovered: Vec<f64> = resolved
                    .iter()
                    .filter_map(|v| v["stalled_ms"].as_f64())
                    .collect();
                let detect_to_action: Vec<f64> = resolved
                    .iter()
                    .filter_map(|v| v["first_action_ms"].as_f64())
                    .collect();
                entry["agent_detect_to_action"] = summary(&detect_to_action);
                entry["agent_detect_to_recovered"] = summary(&detect_to_recovered);
            }
            eprintln!("raise_limit {}: {}", agent.mode.name(), entry["stall"]);
            drop(agent);
            self.remove(&set);
            out.insert(mode.name().to_string(), entry);
        }
        json!(out)
    }

    /// Growth rates: a hog grows to 40 MiB in a 32 MiB cgroup at a controlled rate. Early
    /// agents lend at 75% of the limit (oomwake `[early]`, and the early floor), reactive
    /// ones at the OOM (oomwake, and the floor), all by 50% up to twice the limit. Per
    /// rate and agent: the share of runs with no OOM notification at all (counted by
    /// the bench's own eventfd on each cgroup) and the median longest stall.
    fn growth(&mut self) -> Value {
        let runs = if self.short { 3 } else { 10 };
        // MiB/s; 0 = as fast as the hog can touch pages.
        let rates: &[u64] = if self.short {
            &[100, 0]
        } else {
            &[100, 250, 500, 1000, 0]
        };
        let early = format!(
            "[early]\nat = \"75%\"\n[[early.step]]\naction = \"raise_limit\"\nby = \"50%\"\nmax_extra = \"100%\"\nhold = \"10m\"\nrestore_below = \"70%\"\n\n{}",
            Self::RAISE
        );
        let agents: [(&str, Mode, &str); 4] = [
            ("oomwake_early", Mode::Oomwake, &early),
            ("floor_early", Mode::FloorEarly, ""),
            ("oomwake_reactive", Mode::Oomwake, Self::RAISE),
            ("floor_reactive", Mode::Floor, ""),
        ];
        let mut out = BTreeMap::new();
        for (name, mode, steps) in agents {
            let set = format!("growth-{name}");
            let mut dirs = Vec::new();
            for &rate in rates {
                for i in 0..runs {
                    let cg = format!("{set}/r{rate}-{i}");
                    dirs.push((rate, self.cgroup(&cg, Some(32 * MIB), true).0));
                }
            }
            let glob = format!("{}/{set}/*", self.base_rel);
            let plain: Vec<PathBuf> = dirs.iter().map(|(_, d)| d.clone()).collect();
            let agent = self.agent(mode, &glob, steps, &plain, plain.len());
            let mut by_rate = BTreeMap::new();
            for &rate in rates {
                let mut stalls = Vec::new();
                let mut speeds = Vec::new();
                let mut zero = 0;
                for (_, d) in dirs.iter().filter(|(r, _)| *r == rate) {
                    let ooms = OomCount::register(d);
                    let rate_arg = format!("{rate}M");
                    let mut args = vec!["--touch", "40M"];
                    if rate > 0 {
                        args.extend(["--rate", rate_arg.as_str()]);
                    }
                    let mut h = self.hog(d, &args);
                    match h
                        .line(Duration::from_secs(20))
                        .and_then(|l| serde_json::from_str::<Value>(&l).ok())
                    {
                        Some(v) => {
                            stalls.push(v["longest_stall_us"].as_f64().unwrap_or(0.0) / 1000.0);
                            let ms = v["elapsed_ms"].as_f64().unwrap_or(0.0).max(1.0);
                            speeds.push(40.0 * 1000.0 / ms);
                            if ooms.as_ref().is_some_and(|o| o.count() == 0) {
                                zero += 1;
                            }
                        }
                        None => eprintln!("growth {name} {rate} MiB/s: a hog did not finish"),
                    }
                    h.kill();
                }
                let key = if rate == 0 {
                    "full".to_string()
                } else {
                    format!("{rate:05}")
                };
                let entry = json!({
                    "rate_mib_s": if rate == 0 { Value::Null } else { json!(rate) },
                    "runs": runs,
                    "zero_oom_runs": zero,
                    "stall": summary(&stalls),
                    "samples_ms": stalls,
                    // What the hog achieved, stalls included (MiB/s).
                    "measured_mib_s": summary(&speeds)["median_ms"],
                });
                eprintln!(
                    "growth {name} {}: {zero}/{runs} with no OOM, {}",
                    if rate == 0 {
                        "full speed".to_string()
                    } else {
                        format!("{rate} MiB/s")
                    },
                    entry["stall"]
                );
                by_rate.insert(key, entry);
            }
            drop(agent);
            self.remove(&set);
            out.insert(name.to_string(), json!(by_rate));
        }
        json!(out)
    }

    /// Limit 48 MiB: a 36 MiB process and a second one that gets stuck; the policy kills
    /// the largest. The figure is the stall the survivor saw.
    fn kill_stall(&mut self) -> Value {
        let runs = if self.short { 3 } else { 10 };
        let steps = "[[step]]\naction = \"kill\"\nvictim = \"largest_rss\"\n";
        let mut out = BTreeMap::new();
        for mode in [Mode::Oomwake, Mode::Polling] {
            let set = format!("kill-{}", mode.name());
            let mut dirs = Vec::new();
            for i in 0..runs {
                dirs.push(self.cgroup(&format!("{set}/r{i}"), Some(48 * MIB), true).0);
            }
            let glob = format!("{}/{set}/*", self.base_rel);
            let agent = self.agent(mode, &glob, steps, &dirs, runs);
            let mut stalls = Vec::new();
            for d in &dirs {
                let mut big = self.hog(d, &["--touch", "36M", "--hold", "60s"]);
                if big.line(Duration::from_secs(10)).is_none() {
                    eprintln!("kill: the big hog did not start");
                    continue;
                }
                let mut small = self.hog(d, &["--touch", "16M"]);
                match small
                    .line(Duration::from_secs(15))
                    .and_then(|l| serde_json::from_str::<Value>(&l).ok())
                {
                    Some(v) => stalls.push(v["longest_stall_us"].as_f64().unwrap_or(0.0) / 1000.0),
                    None => eprintln!("kill {}: the survivor did not finish", mode.name()),
                }
                small.kill();
                big.kill();
            }
            let entry = json!({"stall": summary(&stalls), "samples_ms": stalls});
            eprintln!("kill {}: {}", mode.name(), entry["stall"]);
            drop(agent);
            self.remove(&set);
            out.insert(mode.name().to_string(), entry);
        }
        json!(out)
    }

    /// The embedded default's first two steps on an anonymous-memory stall: reclaim
    /// (which finds nothing: the kernel already reclaimed before declaring OOM) then raise.
    fn reclaim_then_raise(&mut self) -> Value {
        let runs = if self.short { 3 } else { 10 };
        let steps = format!("[[step]]\naction = \"reclaim\"\n{}", Self::RAISE);
        let set = "reclaim";
        let mut dirs = Vec::new();
        for i in 0..runs {
            dirs.push(self.cgroup(&format!("{set}/r{i}"), Some(32 * MIB), true).0);
        }
        let glob = format!("{}/{set}/*", self.base_rel);
        let agent = self.agent(Mode::Oomwake, &glob, &steps, &dirs, runs);
        let mut stalls = Vec::new();
        for d in &dirs {
            let mut h = self.hog(d, &["--touch", "40M"]);
            if let Some(v) = h
                .line(Duration::from_secs(15))
                .and_then(|l| serde_json::from_str::<Value>(&l).ok())
            {
                stalls.push(v["longest_stall_us"].as_f64().unwrap_or(0.0) / 1000.0);
            }
            h.kill();
        }
        let freed: Vec<u64> = agent
            .audit()
            .iter()
            .filter(|v| v["event"] == "action" && v["action"] == "reclaim")
            .filter_map(|v| v["freed_bytes"].as_u64())
            .collect();
        drop(agent);
        self.remove(set);
        let entry = json!({"stall": summary(&stalls), "reclaim_freed_bytes": freed});
        eprintln!("reclaim_then_raise: {}", entry["stall"]);
        entry
    }

    /// N watched cgroups, K of them hitting their limits at the same moment (a barrier
    /// file releases K hogs waiting just below their limits).
    fn scale(&mut self) -> Value {
        let ns: &[usize] = if self.short {
            &[1, 10, 100]
        } else {
            &[1, 10, 100, 500]
        };
        let ks: &[usize] = if self.short { &[1, 10] } else { &[1, 10, 50] };
        let mut out = Vec::new();
        for &n in ns {
            for mode in [Mode::Oomwake, Mode::Floor] {
                let set = format!("scale-{}-{n}", mode.name());
                let need: usize = ks.iter().filter(|&&k| k <= n).sum::<usize>().max(1);
                let total = n.max(need);
                let mut dirs = Vec::new();
                for i in 0..total {
                    dirs.push(
                        self.cgroup(&format!("{set}/c{i:04}"), Some(32 * MIB), true)
                            .0,
                    );
                }
                let glob = format!("{}/{set}/*", self.base_rel);
                let t0 = Instant::now();
                let agent = self.agent(mode, &glob, Self::RAISE, &dirs, total);
                let startup_ms = t0.elapsed().as_secs_f64() * 1000.0;
                let mut next = 0;
                for &k in ks.iter().filter(|&&k| k <= n) {
                    let barrier = self.tmp.join(format!("barrier-{set}-{k}"));
                    let spec = format!("{}:{}", barrier.display(), 31 * MIB);
                    let mut hogs: Vec<Proc> = dirs[next..next + k]
                        .iter()
                        .map(|d| {
                            self.hog(d, &["--touch", "40M", "--barrier", &spec, "--hold", "30s"])
                        })
                        .collect();
                    next += k;
                    // Let every hog reach the barrier (31 MiB touched), then release them.
                    std::thread::sleep(Duration::from_millis(300 + 20 * k as u64));
                    std::fs::write(&barrier, "go").expect("barrier");
                    let mut stalls = Vec::new();
                    for h in &hogs {
                        if let Some(v) = h
                            .line(Duration::from_secs(30))
                            .and_then(|l| serde_json::from_str::<Value>(&l).ok())
                        {
                            stalls.push(v["longest_stall_us"].as_f64().unwrap_or(0.0) / 1000.0);
                        }
                    }
                    for h in &mut hogs {
                        h.kill();
                    }
                    let row = json!({
                        "agent": mode.name(),
                        "watched": total,
                        "stuck_at_once": k,
                        "resolved": stalls.len(),
                        "startup_ms": (startup_ms * 10.0).round() / 10.0,
                        "stall": summary(&stalls),
                    });
                    eprintln!(
                        "scale {} N={total} K={k}: resolved {}/{k} {}",
                        mode.name(),
                        stalls.len(),
                        row["stall"]
                    );
                    out.push(row);
                }
                drop(agent);
                self.remove(&set);
            }
        }
        json!(out)
    }

    /// The agent's RSS, fds and idle CPU with many watched cgroups.
    fn footprint(&mut self) -> Value {
        let n = if self.short { 200 } else { 1000 };
        let idle = Duration::from_secs(if self.short { 5 } else { 60 });
        let set = "footprint";
        let mut dirs = Vec::new();
        for i in 0..n {
            dirs.push(self.cgroup(&format!("{set}/c{i:04}"), None, true).0);
        }
        let glob = format!("{}/{set}/*", self.base_rel);
        let t0 = Instant::now();
        let agent = self.agent(Mode::Oomwake, &glob, Self::RAISE, &dirs, n);
        let startup_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let pid = agent.proc.child.id();
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        // Let start-up settle before measuring the idle cost.
        std::thread::sleep(Duration::from_millis(500));
        let cpu = |p: &Path| -> u64 {
            let s = read(&p.join("stat"));
            let f: Vec<&str> = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        };
        let c0 = cpu(&proc_dir);
        let w0 = Instant::now();
        std::thread::sleep(idle);
        let ticks = cpu(&proc_dir) - c0;
        let wall = w0.elapsed().as_secs_f64();
        let hz = 100.0;
        let status = read(&proc_dir.join("status"));
        let kib = |field: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        let (rss_kib, locked_kib, threads) = (kib("VmRSS:"), kib("VmLck:"), kib("Threads:"));
        // The agent runs with its defaults: mlockall on, the Docker client on the
        // default socket (its two threads start either way; present or not is noted).
        let docker = Path::new("/var/run/docker.sock").exists();
        let fds = std::fs::read_dir(proc_dir.join("fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        let row = json!({
            "watched": n,
            "startup_ms": (startup_ms * 10.0).round() / 10.0,
            "rss_mib": (rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
            "locked_mib": (locked_kib as f64 / 1024.0 * 10.0).round() / 10.0,
            "threads": threads,
            "docker_socket_present": docker,
            "fds": fds,
            "idle_seconds": wall.round(),
            "idle_cpu_percent_of_one_core": ((ticks as f64 / hz) / wall * 100.0 * 1000.0).round() / 1000.0,
        });
        eprintln!("footprint: {row}");
        drop(agent);
        self.remove(set);
        row
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        oomwake::cgroup::remove_tree(&self.base, Duration::from_secs(2));
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn machine() -> Value {
    let cpu = read(Path::new("/proc/cpuinfo"))
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let kernel = read(Path::new("/proc/sys/kernel/osrelease"))
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({"cpu": cpu, "cores": cores, "kernel": kernel})
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.3}"),
        None => "-".into(),
    }
}

fn print_table(r: &Value) {
    println!("\nstall seen by the workload (ms): min / median / p99 / max");
    for (scenario, modes) in [("raise_limit", &r["raise_limit"]), ("kill", &r["kill"])] {
        if let Some(m) = modes.as_object() {
            for (mode, e) in m {
                let s = &e["stall"];
                println!(
                    "  {scenario:<12} {mode:<11} n={:<3} {} / {} / {} / {}",
                    s["n"],
                    fmt(&s["min_ms"]),
                    fmt(&s["median_ms"]),
                    fmt(&s["p99_ms"]),
                    fmt(&s["max_ms"])
                );
            }
        }
    }
    let s = &r["reclaim_then_raise"]["stall"];
    println!(
        "  {:<12} {:<11} n={:<3} {} / {} / {} / {}",
        "reclaim+raise",
        "oomwake",
        s["n"],
        fmt(&s["min_ms"]),
        fmt(&s["median_ms"]),
        fmt(&s["p99_ms"]),
        fmt(&s["max_ms"])
    );
    let floor = r["raise_limit"]["floor"]["stall"]["median_ms"].as_f64();
    let poll = r["raise_limit"]["polling_1s"]["stall"]["median_ms"].as_f64();
    if let (Some(f), Some(o), Some(p)) = (
        floor,
        r["raise_limit"]["oomwake"]["stall"]["median_ms"].as_f64(),
        poll,
    ) {
        println!(
            "  raise_limit median: oomwake/floor = {:.2}x, polling/oomwake = {:.0}x",
            o / f,
            p / o
        );
    }
    let a = &r["raise_limit"]["oomwake"]["agent_detect_to_action"];
    let b = &r["raise_limit"]["oomwake"]["agent_detect_to_recovered"];
    println!(
        "agent side (ms, median / p99): event -> limit written {} / {}; event -> under_oom 0 {} / {}",
        fmt(&a["median_ms"]), fmt(&a["p99_ms"]), fmt(&b["median_ms"]), fmt(&b["p99_ms"])
    );
    println!("\ngrowth to 40 MiB in 32 MiB: runs with no OOM wait, median longest stall (ms)");
    let agents = [
        "oomwake_early",
        "floor_early",
        "oomwake_reactive",
        "floor_reactive",
    ];
    println!(
        "  {:<12} {}",
        "rate",
        agents.map(|a| format!("{a:<20}")).join("")
    );
    if let Some(rates) = r["growth"]["oomwake_early"].as_object() {
        for (key, e) in rates {
            let label = match e["rate_mib_s"].as_u64() {
                Some(n) => format!("{n} MiB/s"),
                None => format!("full ({:.0})", e["measured_mib_s"].as_f64().unwrap_or(0.0)),
            };
            let cells: Vec<String> = agents
                .iter()
                .map(|a| {
                    let c = &r["growth"][*a][key];
                    format!(
                        "{:<20}",
                        format!(
                            "{}/{} {}",
                            c["zero_oom_runs"],
                            c["runs"],
                            fmt(&c["stall"]["median_ms"])
                        )
                    )
                })
                .collect();
            println!("  {label:<12} {}", cells.join(""));
        }
    }
    println!("\nscale: agent, watched, stuck at once -> resolved, p99 stall ms, start-up ms");
    if let Some(rows) = r["scale"].as_array() {
        for row in rows {
            println!(
                "  {:<8} N={:<4} K={:<3} -> {}/{} resolved, p99 {} ms, max {} ms, start-up {} ms",
                row["agent"].as_str().unwrap_or(""),
                row["watched"],
                row["stuck_at_once"],
                row["resolved"],
                row["stuck_at_once"],
                fmt(&row["stall"]["p99_ms"]),
                fmt(&row["stall"]["max_ms"]),
                fmt(&row["startup_ms"])
            );
        }
    }
    let f = &r["footprint"];
    println!(
        "\nfootprint with {} watched: RSS {} MiB ({} MiB locked, {} threads, Docker socket {}), {} fds, start-up {} ms, idle CPU {}% of a core over {} s",
        f["watched"], f["rss_mib"], f["locked_mib"], f["threads"],
        if f["docker_socket_present"].as_bool() == Some(true) { "present" } else { "absent" },
        f["fds"], f["startup_ms"], f["idle_cpu_percent_of_one_core"], f["idle_seconds"]
    );
}

/// Stall distributions of raise_limit, one row per agent, log-scaled x axis (ms).
fn plot(r: &Value) -> String {
    let (w, h, left, right) = (760.0, 300.0, 120.0, 730.0);
    let xmin: f64 = 0.1f64.log10();
    let xmax: f64 = 2000f64.log10();
    let x = |ms: f64| left + (ms.max(0.1).log10() - xmin) / (xmax - xmin) * (right - left);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">Longest stall seen by the workload, raise_limit (ms, log scale)</text>\n",
        w / 2.0
    );
    for tick in [0.1, 1.0, 10.0, 100.0, 1000.0] {
        let tx = x(tick);
        s += &format!("<line x1=\"{tx}\" y1=\"40\" x2=\"{tx}\" y2=\"250\" stroke=\"#ddd\"/>\n<text x=\"{tx}\" y=\"268\" text-anchor=\"middle\">{tick}</text>\n");
    }
    let rows = [
        ("floor", "#2a7"),
        ("oomwake", "#27c"),
        ("polling_1s", "#c52"),
    ];
    for (i, (name, color)) in rows.iter().enumerate() {
        let y = 80.0 + i as f64 * 70.0;
        s += &format!("<text x=\"10\" y=\"{}\">{name}</text>\n", y + 4.0);
        if let Some(samples) = r["raise_limit"][name]["samples_ms"].as_array() {
            for (j, v) in samples.iter().filter_map(|v| v.as_f64()).enumerate() {
                let jitter = ((j * 7) % 11) as f64 - 5.0;
                s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\" fill-opacity=\"0.6\"/>\n", x(v), y + jitter * 2.0);
            }
            if let Some(m) = r["raise_limit"][name]["stall"]["median_ms"].as_f64() {
                let mx = x(m);
                s += &format!("<line x1=\"{mx}\" y1=\"{}\" x2=\"{mx}\" y2=\"{}\" stroke=\"black\" stroke-width=\"2\"/>\n", y - 18.0, y + 18.0);
            }
        }
    }
    s += &format!(
        "<text x=\"{}\" y=\"292\" text-anchor=\"middle\">dots: runs; bar: median</text>\n</svg>\n",
        w / 2.0
    );
    s
}

/// Growth rates: the median longest stall per agent (log scale), and under each rate
/// the runs with no OOM wait at all for the two early agents.
fn plot_growth(r: &Value) -> String {
    let g = &r["growth"];
    let agents = [
        ("oomwake_early", "#27c"),
        ("floor_early", "#2a7"),
        ("oomwake_reactive", "#c52"),
        ("floor_reactive", "#a7a"),
    ];
    let keys: Vec<String> = g["oomwake_early"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let (w, h, left, right, top, bottom) = (760.0, 360.0, 70.0, 600.0, 40.0, 260.0);
    let (ymin, ymax) = (0.01f64.log10(), 10f64.log10());
    let y = |ms: f64| bottom - (ms.max(0.01).log10() - ymin) / (ymax - ymin) * (bottom - top);
    let step = (right - left) / keys.len().max(1) as f64;
    let x = |i: usize| left + step * (i as f64 + 0.5);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">Growing to 40 MiB in 32 MiB: median longest stall (ms, log scale)</text>\n",
        w / 2.0
    );
    for tick in [0.01, 0.1, 1.0, 10.0] {
        let ty = y(tick);
        s += &format!("<line x1=\"{left}\" y1=\"{ty}\" x2=\"{right}\" y2=\"{ty}\" stroke=\"#ddd\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{tick}</text>\n", left - 6.0, ty + 4.0);
    }
    for (i, k) in keys.iter().enumerate() {
        let e = &g["oomwake_early"][k];
        let label = match e["rate_mib_s"].as_u64() {
            Some(n) => format!("{n} MiB/s"),
            None => "full speed".to_string(),
        };
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n",
            x(i),
            bottom + 18.0
        );
        for (j, (a, color)) in agents.iter().take(2).enumerate() {
            let c = &g[*a][k];
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{color}\">{}/{}</text>\n",
                x(i),
                bottom + 36.0 + 16.0 * j as f64,
                c["zero_oom_runs"],
                c["runs"]
            );
        }
    }
    s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">runs with no OOM wait (early agents)</text>\n", (left + right) / 2.0, bottom + 84.0);
    for (j, (a, color)) in agents.iter().enumerate() {
        let pts: Vec<String> = keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| {
                g[*a][k]["stall"]["median_ms"]
                    .as_f64()
                    .map(|m| format!("{:.1},{:.1}", x(i), y(m)))
            })
            .collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
            pts.join(" ")
        );
        for p in &pts {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            s += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"4\" fill=\"{color}\"/>\n");
        }
        let ly = top + 10.0 + 20.0 * j as f64;
        s += &format!("<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\n<text x=\"{}\" y=\"{}\">{a}</text>\n", right + 14.0, ly - 10.0, right + 32.0, ly);
    }
    s += "</svg>\n";
    s
}
