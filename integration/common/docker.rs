//! Helpers for tests against a real Docker engine (the `docker` CLI, no mocked API).
//!
//! - [`require_docker`]: root + cgroup v1 + an engine that answers with the cgroupfs
//!   driver; otherwise the test prints "skipped: <why>", or fails when
//!   OOMWAKE_REQUIRE_DOCKER=1 (set by CI, so Docker tests cannot silently skip there).
//! - Test images are built `FROM scratch` from static binaries (no registry needed): the
//!   Go service in miniature (integration/goservice, `CGO_ENABLED=0`) and a page toucher
//!   (integration/images/toucher.c, `gcc -static`). Each is built once per test run and
//!   engine, tagged with a hash of its content (plus our pid, so that another test run
//!   removing its tag never removes ours), and removed when its last user is dropped.
//! - [`Container`] and [`CgroupParent`] remove what they created when dropped, even when
//!   the test fails: containers are named `oomwake-it-<pid>-<n>-<what>` and labelled with
//!   our pid, and run below a scratch cgroup parent inside our own memory cgroup.
//! - [`PrivateDaemon`]: a dockerd of our own (own data root, exec root, pidfile and
//!   socket) for tests that restart the engine; the shared engine is never restarted.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use super::{own_cgroup, read, require_v1, wait_until, Cg, MEMROOT};

/// Set to 1 (CI does) to turn a missing Docker engine into a failure.
pub const REQUIRE_ENV: &str = "OOMWAKE_REQUIRE_DOCKER";

/// Label on every container and image the tests create; its value is our pid.
pub const LABEL: &str = "oomwake-it.pid";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A Docker engine: the shared one (`host` None: the CLI's default socket) or a private
/// daemon's socket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Engine {
    pub host: Option<String>,
}

/// Output of a bounded command: stdout (trimmed) on success, else a message with stderr.
pub type CmdResult = Result<String, String>;

/// Runs `cmd` with its output captured, killed after `timeout` (a hung CLI must not hang
/// the test run).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> CmdResult {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    match status {
        Some(st) if st.success() => Ok(stdout.trim().to_string()),
        Some(st) => Err(format!("{what}: {st}: {}", stderr.trim())),
        None => Err(format!("{what}: no answer within {timeout:?}")),
    }
}

impl Engine {
    pub fn shared() -> Engine {
        Engine { host: None }
    }

    /// `docker` aimed at this engine.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("docker");
        match &self.host {
            Some(h) => c.env("DOCKER_HOST", h),
            None => c.env_remove("DOCKER_HOST"),
        };
        c.env_remove("DOCKER_CONTEXT");
        c
    }

    /// `docker ARGS`, bounded by `timeout`.
    pub fn try_run(&self, args: &[&str], timeout: Duration) -> CmdResult {
        let mut c = self.cmd();
        c.args(args);
        run_bounded(c, timeout)
    }

    /// `docker ARGS` (60 s at most), failing the test on an error.
    pub fn run(&self, args: &[&str]) -> String {
        self.try_run(args, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Why this engine cannot run the tests, if it cannot.
    pub fn unusable(&self) -> Option<String> {
        let v = match self.try_run(
            &["info", "--format", "{{.CgroupDriver}} {{.CgroupVersion}}"],
            Duration::from_secs(20),
        ) {
            Ok(v) => v,
            Err(e) => return Some(format!("no Docker engine answers ({e})")),
        };
        match v.split_whitespace().collect::<Vec<_>>()[..] {
            ["cgroupfs", "1"] => None,
            _ => Some(format!(
                "the engine's cgroup driver and version are {v:?}; these tests need cgroupfs on cgroup v1"
            )),
        }
    }
}

/// Root, cgroup v1 and the shared engine. `None` means: skip (already reported).
pub fn require_docker(test: &str) -> Option<Engine> {
    require_v1(test)?;
    let engine = Engine::shared();
    if let Some(why) = engine.unusable() {
        if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
            panic!("{test}: {REQUIRE_ENV}=1 but {why}");
        }
        eprintln!("{test}: skipped: {why}");
        return None;
    }
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| sweep_leftovers(&engine));
    Some(engine)
}

/// Removes containers that an earlier test run left behind when it was killed (its pid,
/// in our label, is gone). Containers of live test runs are not touched.
fn sweep_leftovers(engine: &Engine) {
    let Ok(list) = engine.try_run(
        &[
            "ps",
            "-a",
            "--filter",
            &format!("label={LABEL}"),
            "--format",
            &format!("{{{{.ID}}}} {{{{.Label \"{LABEL}\"}}}}"),
        ],
        Duration::from_secs(30),
    ) else {
        return;
    };
    for line in list.lines() {
        let mut f = line.split_whitespace();
        let (Some(id), Some(pid)) = (f.next(), f.next()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing container {id} left by test run {pid}");
            let _ = engine.try_run(&["rm", "-f", "-v", id], Duration::from_secs(30));
        }
    }
}

/// The test workloads, each a static binary in a FROM scratch image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// integration/goservice: `/goservice - MIB` grows a live heap of MIB MiB while the
    /// GC runs, prints `tick N` every 50 ms and `done MIB` at the end.
    GoService,
    /// integration/images/toucher.c: `/toucher MIB` touches MIB MiB, prints `touched N`
    /// per MiB and `done MIB`, then sleeps.
    Toucher,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::GoService => "goservice",
            Workload::Toucher => "toucher",
        }
    }
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Builds the workload's static binary (once per test run); its path.
fn static_binary(w: Workload) -> PathBuf {
    static BUILT: Mutex<Vec<(Workload, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(x, _)| *x == w) {
        return p.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-static");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(w.name());
    let mut cmd;
    match w {
        Workload::GoService => {
            cmd = Command::new("go");
            cmd.arg("build")
                .arg("-o")
                .arg(&out)
                .arg(repo("integration/goservice/main.go"))
                .env("CGO_ENABLED", "0")
                .env("GOCACHE", dir.join("gocache"))
                .env("GOPATH", dir.join("gopath"))
                .env("HOME", &dir)
                .env("GO111MODULE", "off")
                .env("GOFLAGS", "");
        }
        Workload::Toucher => {
            cmd = Command::new("gcc");
            cmd.arg("-static")
                .arg("-O2")
                .arg("-o")
                .arg(&out)
                .arg(repo("integration/images/toucher.c"));
        }
    }
    if let Err(e) = run_bounded(cmd, Duration::from_secs(300)) {
        panic!(
            "building the {} test binary failed (CI installs golang-go and gcc): {e}",
            w.name()
        );
    }
    built.push((w, out.clone()));
    out
}

/// Records a measurement: printed, and appended to target/tmp/docker-measure.log (CI
/// prints that file; a passing test's stdout is not shown).
pub fn measure(test: &str, what: &str) {
    use std::io::Write;
    let line = format!("docker-measure: {test}: {what}");
    println!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-measure.log");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// FNV-1a, 64 bits: a content hash for image tags (no crypto needed, only "did it change").
pub fn content_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One reference to a test image; the image is removed when its last reference goes.
pub struct Image {
    engine: Engine,
    workload: Workload,
    pub tag: String,
}

type ImageKey = (Option<String>, Workload);
static IMAGES: Mutex<Option<HashMap<ImageKey, (String, usize)>>> = Mutex::new(None);

/// The workload's image on `engine`, built if this test run has none yet.
pub fn image(engine: &Engine, w: Workload) -> Image {
    let bin = static_binary(w);
    let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    let map = images.get_or_insert_with(HashMap::new);
    let key = (engine.host.clone(), w);
    if let Some((tag, n)) = map.get_mut(&key) {
        *n += 1;
        return Image {
            engine: engine.clone(),
            workload: w,
            tag: tag.clone(),
        };
    }
    let body = std::fs::read(&bin).unwrap();
    let dockerfile = format!(
        "FROM scratch\nLABEL {LABEL}=\"{pid}\"\nCOPY {n} /{n}\nENTRYPOINT [\"/{n}\"]\n",
        pid = std::process::id(),
        n = w.name()
    );
    let hash = content_hash(&[&body, dockerfile.as_bytes()]);
    let tag = format!("oomwake-it-{}:{hash:016x}-{}", w.name(), std::process::id());
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(&bin, ctx.path().join(w.name())).unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), &dockerfile).unwrap();
    let mut cmd = engine.cmd();
    cmd.arg("build")
        .arg("-q")
        .arg("-t")
        .arg(&tag)
        .arg(ctx.path());
    if let Err(e) = run_bounded(cmd, Duration::from_secs(180)) {
        panic!("docker build of {tag}: {e}");
    }
    map.insert(key, (tag.clone(), 1));
    Image {
        engine: engine.clone(),
        workload: w,
        tag,
    }
}

impl Image {
    /// The image's id (`sha256:...`).
    pub fn id(&self) -> String {
        self.engine
            .run(&["image", "inspect", "--format", "{{.Id}}", &self.tag])
    }
}

impl Clone for Image {
    fn clone(&self) -> Image {
        let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, n)) = images
            .get_or_insert_with(HashMap::new)
            .get_mut(&(self.engine.host.clone(), self.workload))
        {
            *n += 1;
        }
        Image {
            engine: self.engine.clone(),
            workload: self.workload,
            tag: self.tag.clone(),
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
        let map = images.get_or_insert_with(HashMap::new);
        let key = (self.engine.host.clone(), self.workload);
        let last = match map.get_mut(&key) {
            Some((_, n)) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if last {
            map.remove(&key);
            // Only our tag: another run's tag of the same content stays.
            if let Err(e) = self
                .engine
                .try_run(&["rmi", &self.tag], Duration::from_secs(60))
            {
                eprintln!("could not remove test image {}: {e}", self.tag);
            }
        }
    }
}

/// A scratch cgroup parent for containers, inside our own memory cgroup. Docker creates
/// it (in every hierarchy, not only memory); dropping it removes it from all of them.
pub struct CgroupParent {
    /// Path relative to the hierarchy roots, with a leading '/'.
    pub rel: String,
}

impl CgroupParent {
    pub fn new(what: &str) -> CgroupParent {
        let own = own_cgroup().expect("own memory cgroup");
        let rel = format!(
            "{}/oomwake-dk-{}-{}-{what}",
            own.trim_end_matches('/'),
            std::process::id(),
            seq()
        );
        CgroupParent { rel }
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in rd.flatten() {
            let dir = h.path().join(self.rel.trim_start_matches('/'));
            if dir.is_dir() {
                oomwake::cgroup::remove_tree(&dir, Duration::from_secs(5));
            }
        }
    }
}

/// A container we started; `docker rm -f` when dropped (before its image reference goes).
pub struct Container {
    pub engine: Engine,
    pub id: String,
    pub name: String,
    _image: Option<Image>,
}

/// `docker run -d --network none` of `image` with `args` before the image and `cmd`
/// after it, named `oomwake-it-<pid>-<n>-<what>`, below `parent` when given.
pub fn run_container(
    image: &Image,
    parent: Option<&CgroupParent>,
    what: &str,
    args: &[&str],
    cmd: &[&str],
) -> Container {
    run_container_ref(image, &image.tag, parent, what, args, cmd)
}

/// [`run_container`] of `image` given to `docker run` as `reference` (its id, say: the
/// container's `Config.Image` is the reference as given).
pub fn run_container_ref(
    image: &Image,
    reference: &str,
    parent: Option<&CgroupParent>,
    what: &str,
    args: &[&str],
    cmd: &[&str],
) -> Container {
    let engine = image.engine.clone();
    let name = format!("oomwake-it-{}-{}-{what}", std::process::id(), seq());
    let label = format!("{LABEL}={}", std::process::id());
    let mut full: Vec<&str> = vec![
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &name,
        "--label",
        &label,
    ];
    if let Some(p) = parent {
        full.push("--cgroup-parent");
        full.push(&p.rel);
    }
    full.extend_from_slice(args);
    full.push(reference);
    full.extend_from_slice(cmd);
    let res = engine.try_run(&full, Duration::from_secs(60));
    let id = match res {
        Ok(id) => id,
        Err(e) => {
            // A container may exist even when `run` failed (e.g. created, not started).
            let _ = engine.try_run(&["rm", "-f", "-v", &name], Duration::from_secs(30));
            panic!("{e}");
        }
    };
    Container {
        engine,
        id,
        name,
        _image: Some(image.clone()),
    }
}

impl Container {
    /// Takes charge of a container started some other way (removed when dropped).
    pub fn adopt(engine: &Engine, id: String, name: String) -> Container {
        Container {
            engine: engine.clone(),
            id,
            name,
            _image: None,
        }
    }

    /// `docker inspect -f FORMAT`.
    pub fn inspect(&self, format: &str) -> String {
        self.engine.run(&["inspect", "-f", format, &self.id])
    }

    /// The container's main process, as the host sees it.
    pub fn pid(&self) -> i32 {
        self.inspect("{{.State.Pid}}").parse().unwrap_or(0)
    }

    /// The memory cgroup of the container's main process (relative to the mount).
    pub fn cgroup(&self) -> String {
        let pid = self.pid();
        let text = read(Path::new(&format!("/proc/{pid}/cgroup")));
        oomwake::cgroup::parse::proc_memory_cgroup(&text)
            .unwrap_or_else(|| panic!("no memory cgroup for {} (pid {pid})", self.name))
    }

    pub fn cg(&self) -> Cg {
        let rel = self.cgroup();
        let dir = Path::new(MEMROOT).join(rel.trim_start_matches('/'));
        Cg { rel, dir }
    }

    /// `docker logs` (stdout and stderr together).
    pub fn logs(&self) -> String {
        let mut c = self.engine.cmd();
        c.args(["logs", &self.id]);
        // docker logs writes the container's stderr to its own stderr: merge both.
        let out = c.stdin(Stdio::null()).output();
        match out {
            Ok(o) => {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            }
            Err(e) => format!("(docker logs: {e})"),
        }
    }

    /// Waits until a line of the logs satisfies `pred`; that line.
    pub fn wait_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let mut found = None;
        let end = Instant::now() + timeout;
        while found.is_none() && Instant::now() < end {
            found = self.logs().lines().find(|l| pred(l)).map(str::to_string);
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        found
    }

    pub fn running(&self) -> bool {
        self.engine
            .try_run(
                &["inspect", "-f", "{{.State.Running}}", &self.id],
                Duration::from_secs(30),
            )
            .is_ok_and(|s| s == "true")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self
            .engine
            .try_run(&["rm", "-f", "-v", &self.id], Duration::from_secs(60))
        {
            eprintln!("could not remove test container {}: {e}", self.name);
        }
    }
}

/// The sidecar image, built by packaging/docker/build-image.sh under a tag of this test
/// run (the static build is cached in target/static, the layers by Docker); removed when
/// dropped.
pub struct SidecarImage {
    engine: Engine,
    pub tag: String,
}

pub fn sidecar_image(engine: &Engine) -> SidecarImage {
    let tag = format!("oomwake-it-sidecar:{}-{}", std::process::id(), seq());
    let mut cmd = Command::new(repo("packaging/docker/build-image.sh"));
    cmd.arg(&tag);
    match &engine.host {
        Some(h) => cmd.env("DOCKER_HOST", h),
        None => cmd.env_remove("DOCKER_HOST"),
    };
    // The static build goes to target/static (the script's default), never to the
    // target dir `cargo test` holds locked.
    cmd.env_remove("CARGO_TARGET_DIR");
    let img = SidecarImage {
        engine: engine.clone(),
        tag,
    };
    // A fresh static release build takes minutes on a loaded 2-core machine; one build
    // at a time (tests run in parallel), the next one finds it done.
    static BUILD: Mutex<()> = Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = run_bounded(cmd, Duration::from_secs(1800)) {
        panic!("packaging/docker/build-image.sh {}: {e}", img.tag);
    }
    img
}

impl Drop for SidecarImage {
    fn drop(&mut self) {
        if let Err(e) = self
            .engine
            .try_run(&["rmi", &self.tag], Duration::from_secs(60))
        {
            eprintln!("could not remove the sidecar image {}: {e}", self.tag);
        }
    }
}

/// Waits until the container's cgroup is stuck at its limit: under_oom 1 and a thread of
/// one of its processes asleep in the memcg OOM wait.
pub fn wait_stuck(c: &Container, timeout: Duration) -> Cg {
    let cg = c.cg();
    let ok = wait_until(timeout, || {
        cg.under_oom() && cg.procs().into_iter().any(super::any_thread_in_oom_wait)
    });
    assert!(
        ok,
        "{} ({}) never got stuck: under_oom {}, procs {:?}\nlogs:\n{}",
        c.name,
        cg.rel,
        cg.under_oom(),
        cg.procs(),
        c.logs()
    );
    cg
}

/// A toucher container (`-m 32m --oom-kill-disable`, `args` added) whose main process
/// touches 1 MiB and sleeps, stuck by a second toucher of 48 MiB started with `docker
/// exec`. A kill of the largest process ends the stall and the container goes on, so
/// its cgroup stays (when the only process is killed, Docker may remove the cgroup
/// before the agent sees the stall end, and the episode ends `cgroup gone`).
pub fn stuck_by_exec(
    img: &Image,
    parent: Option<&CgroupParent>,
    what: &str,
    args: &[&str],
) -> (Container, Cg) {
    let mut all = vec!["-m", "32m", "--oom-kill-disable"];
    all.extend_from_slice(args);
    let c = run_container(img, parent, what, &all, &["1"]);
    assert!(
        c.wait_log(Duration::from_secs(30), |l| l == "done 1")
            .is_some(),
        "{}",
        c.logs()
    );
    c.engine.run(&["exec", "-d", &c.id, "/toucher", "48"]);
    let cg = wait_stuck(&c, Duration::from_secs(30));
    (c, cg)
}

/// A dockerd of our own, for tests that restart the engine. Everything it owns lives in
/// one temporary directory; it runs with --live-restore so containers survive a restart.
pub struct PrivateDaemon {
    pub dir: tempfile::TempDir,
    pub engine: Engine,
    child: Option<Child>,
}

impl PrivateDaemon {
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("d.sock")
    }

    /// Starts it and waits (bounded) until it answers.
    pub fn start() -> PrivateDaemon {
        // Short paths: containerd's sockets live below the exec root (108-byte limit).
        let dir = tempfile::Builder::new()
            .prefix("oomwake-dk")
            .tempdir_in("/tmp")
            .unwrap();
        let engine = Engine {
            host: Some(format!("unix://{}", dir.path().join("d.sock").display())),
        };
        let mut d = PrivateDaemon {
            dir,
            engine,
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let p = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.join("dockerd.log"))
            .unwrap();
        let child = Command::new("dockerd")
            .arg("--iptables=false")
            .arg("--ip6tables=false")
            .arg("--bridge=none")
            .arg("--live-restore")
            .arg("--exec-opt")
            .arg("native.cgroupdriver=cgroupfs")
            .arg("--data-root")
            .arg(p.join("data"))
            .arg("--exec-root")
            .arg(p.join("x"))
            .arg("--pidfile")
            .arg(p.join("d.pid"))
            .arg("-H")
            .arg(format!("unix://{}", p.join("d.sock").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn dockerd");
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(60), || {
            self.engine
                .try_run(&["version"], Duration::from_secs(5))
                .is_ok()
        });
        assert!(
            ok,
            "private dockerd did not answer within 60 s:\n{}",
            read(&p.join("dockerd.log"))
        );
    }

    /// SIGTERM and wait (bounded, then SIGKILL); with --live-restore containers go on.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it again after [`PrivateDaemon::stop`] (its containers ran on meanwhile).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the private dockerd still runs");
        self.spawn();
    }

    /// Stops and starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log(&self) -> String {
        read(&self.dir.path().join("dockerd.log"))
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        // Stopped (a test failed while the engine was down): its containers still run
        // under --live-restore, so start it again to remove them.
        if self.child.is_none() && self.dir.path().join("data").exists() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.spawn()));
        }
        if self.child.is_some() {
            // Its containers first (they outlive the daemon under --live-restore).
            if let Ok(ids) = self
                .engine
                .try_run(&["ps", "-a", "-q"], Duration::from_secs(30))
            {
                for id in ids.split_whitespace() {
                    let _ = self
                        .engine
                        .try_run(&["rm", "-f", "-v", id], Duration::from_secs(60));
                }
            }
            // Without --live-restore on the way out, stopping it stops its containerd.
            self.stop();
        }
        // The data root holds overlay mounts until the daemon is gone; unmount leftovers.
        let data = self.dir.path().join("data");
        let mounts = read(Path::new("/proc/self/mounts"));
        // Deepest (mounted last) first.
        for m in mounts
            .lines()
            .rev()
            .filter_map(|l| l.split_whitespace().nth(1))
        {
            if Path::new(m).starts_with(self.dir.path()) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = std::fs::remove_dir_all(&data);
    }
}
