//! The container metadata cache and the thread that keeps it current from the Docker
//! Engine API. Nothing here is on the OOM path: the event loop and the episodes only
//! read the cache ([`Containers::get`]: a map lookup under a lock that writers hold for
//! an insert or a removal, never across I/O), and an episode runs with what is known.
//!
//! Two threads talk to the engine: `docker-events` holds the events stream open and
//! reconnects with back-off when the engine is down or restarting (one log line per
//! outage); `docker` lists the running containers after every (re)connection, inspects
//! created/started containers and the ids the event loop asks about, and writes the
//! cache. Every change of a container's metadata is queued for the event loop and
//! wakes it through an eventfd, so that a cgroup seen before its metadata is matched
//! again as soon as the name is known.
//!
//! Every connection first checks the socket (its owner, its directories and the peer
//! serving it: see [`super::http`]); a refused socket gives no metadata, with one error
//! logged, and is checked again at each reconnection.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::docker::{Engine, Event, Meta};
use crate::cgroup::CgroupPath;

/// Deadline of every request but the events stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Back-off between reconnections: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Lookups the loop may queue; more are dropped (retried on the next discovery).
const LOOKUP_QUEUE: usize = 1024;

enum Msg {
    /// The events stream is open: list the running containers.
    Connected,
    Event(Event),
    /// The event loop met a container cgroup whose id is not in the cache.
    Lookup(String),
    /// The engine does not answer (why): what is unknown stays unknown meanwhile.
    Down(String),
}

/// Why nothing is known yet, before the engine first answered.
const NOT_YET: &str = "no answer from the engine yet (the agent is starting)";

/// The metadata of the containers the engine reported, by full id.
pub struct Containers {
    map: RwLock<HashMap<String, Arc<Meta>>>,
    /// Ids whose metadata changed since the event loop last took them.
    changed: Mutex<HashSet<String>>,
    wake: Option<EventFd>,
    tx: Option<Sender<Msg>>,
    socket: Option<PathBuf>,
    /// None while the engine answers (listed after its last connection); otherwise
    /// why it does not: what [`Containers::unknown_reason`] says.
    down: Mutex<Option<String>>,
    /// Ids the engine said it has no container of (404) since it was last listed:
    /// cgroups named like a container that this engine did not make (another engine's,
    /// or a container already removed). At most [`ABSENT_MAX`].
    absent: Mutex<HashSet<String>>,
}

/// Most ids remembered as absent (more: the set starts over, and they are asked again).
const ABSENT_MAX: usize = 4096;

impl Containers {
    /// No engine: lookups find nothing, the loop is never woken.
    pub fn disabled() -> Containers {
        Containers {
            map: RwLock::new(HashMap::new()),
            changed: Mutex::new(HashSet::new()),
            wake: None,
            tx: None,
            socket: None,
            down: Mutex::new(Some(NOT_YET.to_string())),
            absent: Mutex::new(HashSet::new()),
        }
    }

    /// A cache with a wake-up and no engine: filled by [`Containers::put`] (tests).
    pub fn detached() -> std::io::Result<Containers> {
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(std::io::Error::from)?;
        Ok(Containers {
            wake: Some(wake),
            ..Containers::disabled()
        })
    }

    /// A cache filled by hand (tests).
    pub fn fixed(metas: Vec<Meta>) -> Containers {
        let c = Containers::disabled();
        for m in metas {
            c.put(m);
        }
        c
    }

    /// Starts the threads that follow the engine at `socket`. `quiet_when_absent`: a
    /// socket that does not exist is not worth a warning (the default path on a host
    /// without Docker); it is retried all the same, quietly. The socket is used only
    /// while it, its directories and its server are root's (checked at every
    /// connection), unless `insecure` (`--insecure-policies`).
    pub fn start(
        socket: &Path,
        quiet_when_absent: bool,
        insecure: bool,
    ) -> std::io::Result<Arc<Containers>> {
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(std::io::Error::from)?;
        let (tx, rx) = crossbeam_channel::bounded(LOOKUP_QUEUE);
        let c = Arc::new(Containers {
            map: RwLock::new(HashMap::new()),
            changed: Mutex::new(HashSet::new()),
            wake: Some(wake),
            tx: Some(tx.clone()),
            socket: Some(socket.to_path_buf()),
            down: Mutex::new(Some(NOT_YET.to_string())),
            absent: Mutex::new(HashSet::new()),
        });
        let engine = Engine::new(socket, REQUEST_TIMEOUT).insecure(insecure);
        {
            let engine = engine.clone();
            std::thread::Builder::new()
                .name("docker-events".into())
                .stack_size(crate::sys::THREAD_STACK)
                .spawn(move || follow_events(engine, tx, quiet_when_absent))?;
        }
        {
            let weak = Arc::downgrade(&c);
            std::thread::Builder::new()
                .name("docker".into())
                .stack_size(crate::sys::THREAD_STACK)
                .spawn(move || keep_current(engine, rx, weak))?;
        }
        Ok(c)
    }

    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// True when an engine is followed (or looked for), or the cache is filled by hand
    /// ([`Containers::detached`]): container metadata may become known. False for
    /// [`Containers::disabled`], where it never does.
    pub fn enabled(&self) -> bool {
        self.wake.is_some()
    }

    /// Why the metadata of container `id` is not in the cache, for the audit line of a
    /// stall that had to go without it.
    pub fn unknown_reason(&self, id: &str) -> String {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sock = self
            .socket
            .as_deref()
            .map_or_else(|| "-".to_string(), |p| p.display().to_string());
        match down {
            Some(why) => format!("the Docker engine at {sock} does not answer: {why}"),
            None => format!(
                "the Docker engine at {sock} answers but has not described container {} (inspect pending, dropped or failed)",
                super::id::short(id)
            ),
        }
    }

    /// True when the engine answered that it has no container `id` (since it was last
    /// listed): its metadata will not come, so no policy keyed on it can match.
    pub fn is_absent(&self, id: &str) -> bool {
        self.absent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Records the engine's answer that it has no container `id`, and wakes the loop
    /// (a stall held while waiting for the metadata is retried).
    pub(crate) fn set_absent(&self, id: &str) {
        {
            let mut a = self.absent.lock().unwrap_or_else(|p| p.into_inner());
            if a.len() >= ABSENT_MAX {
                a.clear();
            }
            if !a.insert(id.to_string()) {
                return;
            }
        }
        self.mark(id.to_string());
    }

    fn set_down(&self, why: Option<String>) {
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// The eventfd that becomes readable when metadata changed (None when disabled).
    pub fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.wake.as_ref().map(|w| w.as_fd())
    }

    /// Resets the wake-up and returns the ids whose metadata changed since last time.
    pub fn take_changed(&self) -> Vec<String> {
        if let Some(w) = &self.wake {
            // Nonblocking: EAGAIN when nothing was written, which is fine.
            let _ = w.read();
        }
        let mut set = self.changed.lock().unwrap_or_else(|p| p.into_inner());
        set.drain().collect()
    }

    /// The metadata of container `id`, if known. Never waits for the engine.
    pub fn get(&self, id: &str) -> Option<Arc<Meta>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The metadata of the container whose own cgroup is `cg` (not of a pod, nor of
    /// CRI-O's monitor).
    pub fn for_cgroup(&self, cg: &CgroupPath) -> Option<Arc<Meta>> {
        let ident = super::identify(cg.as_bytes())?;
        if !ident.is_container() {
            return None;
        }
        self.get(ident.container_id.as_deref()?)
    }

    /// Asks the engine about `id` in the background (never blocks; a full queue drops
    /// the request, and the next discovery of the cgroup asks again).
    pub fn request(&self, id: &str) {
        if let Some(tx) = &self.tx {
            if self.get(id).is_none() && !self.is_absent(id) {
                let _ = tx.try_send(Msg::Lookup(id.to_string()));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inserts or replaces; marks a change (and wakes the loop) only when it differs.
    pub fn put(&self, m: Meta) {
        let id = m.id.clone();
        self.absent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let m = Arc::new(m);
        let old = self
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), m.clone());
        if old.as_deref() != Some(&*m) {
            self.mark(id);
        }
    }

    fn remove(&self, id: &str) {
        let old = self
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if old.is_some() {
            self.mark(id.to_string());
        }
    }

    /// Makes the cache hold exactly `metas` (after a (re)connection).
    fn replace_all(&self, metas: Vec<Meta>) {
        // A (re)connected engine is asked again about what it did not know.
        self.absent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let now: HashSet<String> = metas.iter().map(|m| m.id.clone()).collect();
        let gone: Vec<String> = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|k| !now.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
        for m in metas {
            self.put(m);
        }
    }

    fn mark(&self, id: String) {
        self.changed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        if let Some(w) = &self.wake {
            let _ = w.write(1);
        }
    }

    /// Applies one event; `inspect` fetches a container's full metadata.
    fn apply(&self, ev: &Event, inspect: impl Fn(&str) -> Option<Meta>) {
        let id = ev.actor.id.as_str();
        if ev.kind != "container" || !super::id::is_full_id(id.as_bytes()) {
            return;
        }
        match ev.action.as_str() {
            "create" | "start" => {
                if let Some(m) = inspect(id) {
                    self.put(m);
                }
            }
            "rename" => match (self.get(id), ev.name()) {
                (Some(old), Some(name)) => {
                    let mut m = Meta::clone(&old);
                    m.info.name = name.trim_start_matches('/').to_string();
                    self.put(m);
                }
                _ => {
                    if let Some(m) = inspect(id) {
                        self.put(m);
                    }
                }
            },
            "destroy" => self.remove(id),
            // A container that died keeps its name (it may be restarted); its cgroup
            // is gone meanwhile, so the entry costs nothing but memory until destroy.
            _ => {}
        }
    }
}

/// The `docker-events` thread: opens the stream, forwards events, reconnects.
fn follow_events(engine: Engine, tx: Sender<Msg>, quiet_when_absent: bool) {
    let mut backoff = BACKOFF_FIRST;
    let mut down_said = false;
    let mut refusal_said = false;
    loop {
        match engine.events() {
            Ok(stream) => {
                refusal_said = false;
                if down_said {
                    log::info!("docker: {} answers again", engine.socket.display());
                } else {
                    log::info!(
                        "docker: following container events on {}",
                        engine.socket.display()
                    );
                }
                backoff = BACKOFF_FIRST;
                if tx.send(Msg::Connected).is_err() {
                    return;
                }
                let mut closed = false;
                let res = stream.for_each(|ev| {
                    if !closed && tx.send(Msg::Event(ev)).is_err() {
                        closed = true;
                    }
                });
                if closed {
                    return;
                }
                let why = res
                    .err()
                    .map_or("engine stopped".to_string(), |e| e.to_string());
                log::warn!(
                    "docker: the events stream of {} ended ({why}); matching by cgroup goes on, reconnecting",
                    engine.socket.display(),
                );
                let _ = tx.try_send(Msg::Down(format!("the events stream ended ({why})")));
                down_said = true;
            }
            Err(e) if e.is_untrusted() => {
                // Whoever serves the socket would choose the policies of containers.
                let _ = tx.try_send(Msg::Down(e.to_string()));
                if !refusal_said {
                    log::error!(
                        "docker: {e}; container names, labels and images are unknown while it is refused (checked again at every reconnection; matching by cgroup goes on)"
                    );
                    refusal_said = true;
                    down_said = true;
                } else {
                    log::debug!("docker: {e}");
                }
            }
            Err(e) => {
                let _ = tx.try_send(Msg::Down(e.to_string()));
                refusal_said = false;
                // No socket at the default path: a host without Docker, not an outage.
                let quiet = quiet_when_absent && !engine.socket.exists();
                if !down_said && !quiet {
                    log::warn!(
                        "docker: {e}; container names, labels and images are unknown until it answers (matching by cgroup goes on; retrying with back-off)"
                    );
                    down_said = true;
                } else {
                    log::debug!("docker: {e}");
                }
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The `docker` thread: the only writer of the cache.
fn keep_current(engine: Engine, rx: Receiver<Msg>, cache: std::sync::Weak<Containers>) {
    let inspect = |id: &str| match lookup(&engine, id) {
        Lookup::Found(m) => Some(m),
        Lookup::Absent | Lookup::Failed => None,
    };
    for msg in rx {
        let Some(c) = cache.upgrade() else {
            return;
        };
        match msg {
            Msg::Connected => match engine.list() {
                Ok(metas) => {
                    log::info!("docker: {} running container(s) known", metas.len());
                    c.replace_all(metas);
                    c.set_down(None);
                }
                Err(e) => {
                    log::warn!("docker: listing containers: {e}");
                    c.set_down(Some(format!("listing containers: {e}")));
                }
            },
            Msg::Down(why) => c.set_down(Some(why)),
            Msg::Event(ev) => c.apply(&ev, inspect),
            Msg::Lookup(id) => {
                if c.get(&id).is_none() {
                    match lookup(&engine, &id) {
                        Lookup::Found(m) => c.put(m),
                        Lookup::Absent => c.set_absent(&id),
                        Lookup::Failed => {}
                    }
                }
            }
        }
    }
}

/// What the engine said about one container.
enum Lookup {
    Found(Meta),
    /// It has no such container (404).
    Absent,
    /// No usable answer (logged).
    Failed,
}

/// Inspects container `id`; an answer about another container is no answer (it would
/// be cached under that other id and choose its policy).
fn lookup(engine: &Engine, id: &str) -> Lookup {
    match engine.inspect(id) {
        Ok(Some(m)) if m.id == id => Lookup::Found(m),
        Ok(Some(m)) => {
            log::warn!(
                "docker: asked about container {id}, the engine described {:?}: ignored",
                m.id
            );
            Lookup::Failed
        }
        Ok(None) => Lookup::Absent,
        Err(e) => {
            log::debug!("docker: inspect {id}: {e}");
            Lookup::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::docker::Actor;
    use crate::policy::ContainerInfo;
    use std::time::Instant;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn meta(id: &str, name: &str) -> Meta {
        Meta {
            id: id.into(),
            info: ContainerInfo {
                name: name.into(),
                image: "img:1".into(),
                labels: Default::default(),
            },
        }
    }

    fn ev(action: &str, id: &str, name: &str) -> Event {
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("name".to_string(), name.to_string());
        Event {
            kind: "container".into(),
            action: action.into(),
            actor: Actor {
                id: id.into(),
                attributes,
            },
            time_nano: 0,
        }
    }

    #[test]
    fn events_keep_the_cache_current_and_mark_changes() {
        let c = Containers::disabled();
        c.apply(&ev("create", A, "api"), |id| Some(meta(id, "api")));
        assert_eq!(c.get(A).unwrap().info.name, "api");
        assert_eq!(c.take_changed(), vec![A.to_string()]);
        // The same metadata again is no change.
        c.apply(&ev("start", A, "api"), |id| Some(meta(id, "api")));
        assert!(c.take_changed().is_empty());
        c.apply(&ev("rename", A, "api-2"), |_| None);
        assert_eq!(c.get(A).unwrap().info.name, "api-2");
        assert_eq!(c.take_changed().len(), 1);
        c.apply(&ev("die", A, "api-2"), |_| None);
        assert!(
            c.get(A).is_some(),
            "a dead container keeps its name until destroy"
        );
        c.apply(&ev("destroy", A, "api-2"), |_| None);
        assert!(c.get(A).is_none());
        assert_eq!(c.take_changed().len(), 1);
    }

    #[test]
    fn odd_events_change_nothing() {
        let c = Containers::disabled();
        c.apply(&ev("start", "short", "x"), |id| Some(meta(id, "x")));
        let mut e = ev("start", A, "x");
        e.kind = "image".into();
        c.apply(&e, |id| Some(meta(id, "x")));
        assert!(c.is_empty());
        // An inspect that fails (engine gone meanwhile) leaves no entry.
        c.apply(&ev("start", A, "x"), |_| None);
        assert!(c.is_empty());
    }

    #[test]
    fn a_relisting_drops_what_is_gone() {
        let b = "b".repeat(64);
        let c = Containers::fixed(vec![meta(A, "a"), meta(&b, "b")]);
        c.take_changed();
        c.replace_all(vec![meta(&b, "b")]);
        assert!(c.get(A).is_none());
        assert_eq!(c.take_changed(), vec![A.to_string()]);
        let cg = CgroupPath::new(&format!("/docker/{b}"));
        assert_eq!(c.for_cgroup(&cg).unwrap().info.name, "b");
        assert!(c
            .for_cgroup(&CgroupPath::new(&format!("/docker/{b}/sub")))
            .is_none());
    }

    /// A fake engine on a unix socket: `/containers/json` lists `list`, inspect answers
    /// for the ids in `known`, `/events` stays open and sends what `events` receives.
    struct FakeEngine {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        events: crossbeam_channel::Sender<String>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl FakeEngine {
        fn start(path: &Path, list: Vec<Meta>) -> FakeEngine {
            FakeEngine::lying(path, list, None)
        }

        /// [`FakeEngine::start`], and an inspect of an id it does not list answers
        /// with `lie` (another container's metadata) instead of 404.
        fn lying(path: &Path, list: Vec<Meta>, lie: Option<Meta>) -> FakeEngine {
            use std::io::{Read, Write};
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path).unwrap();
            l.set_nonblocking(true).unwrap();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (tx, rx) = crossbeam_channel::unbounded::<String>();
            let st = stop.clone();
            let path = path.to_path_buf();
            let json = |m: &Meta| {
                serde_json::json!({"Id": m.id, "Name": format!("/{}", m.info.name),
                    "Names": [format!("/{}", m.info.name)], "Image": m.info.image,
                    "Labels": m.info.labels, "Config": {"Image": m.info.image, "Labels": m.info.labels}})
            };
            let thread = std::thread::spawn(move || {
                let mut streams = Vec::new();
                while !st.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok((mut s, _)) = l.accept() {
                        s.set_nonblocking(false).unwrap();
                        let mut req = [0u8; 2048];
                        let n = s.read(&mut req).unwrap_or(0);
                        let line = String::from_utf8_lossy(&req[..n]).to_string();
                        let target = line.split(' ').nth(1).unwrap_or("").to_string();
                        if target.starts_with("/events") {
                            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                                .unwrap();
                            streams.push(s);
                        } else {
                            let body = if target == "/containers/json" {
                                Some(serde_json::Value::Array(list.iter().map(json).collect()))
                            } else {
                                list.iter()
                                    .find(|m| target == format!("/containers/{}/json", m.id))
                                    .or(lie.as_ref())
                                    .map(json)
                            };
                            let reply = match body {
                                Some(b) => {
                                    let b = b.to_string();
                                    format!(
                                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{b}",
                                        b.len()
                                    )
                                }
                                None => {
                                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into()
                                }
                            };
                            let _ = s.write_all(reply.as_bytes());
                        }
                    }
                    while let Ok(ev) = rx.try_recv() {
                        for s in &mut streams {
                            let _ = write!(s, "{:x}\r\n{ev}\r\n", ev.len());
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                // The engine stops: its streams end, its socket goes.
                drop(streams);
                let _ = std::fs::remove_file(&path);
            });
            FakeEngine {
                stop,
                events: tx,
                thread: Some(thread),
            }
        }

        fn send(&self, action: &str, id: &str) {
            let ev = serde_json::json!({"Type": "container", "Action": action,
                "Actor": {"ID": id, "Attributes": {}}});
            self.events.send(ev.to_string()).unwrap();
        }
    }

    impl Drop for FakeEngine {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn wait(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The engine answers, stops (the cache stays readable at once, nothing blocks),
    /// and comes back with another set of containers: the client reconnects by itself
    /// and the cache follows the new listing.
    #[test]
    fn an_engine_that_stops_and_comes_back_is_followed_again() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let b = "b".repeat(64);
        let engine = FakeEngine::start(&sock, vec![meta(A, "api"), meta(&b, "web")]);
        let c = Containers::start(&sock, false, false).unwrap();
        wait("the listing is loaded", || c.get(A).is_some());
        // A container created later arrives by its event (and an inspect).
        let d = "d".repeat(64);
        drop(engine);
        let engine = FakeEngine::start(&sock, vec![meta(&b, "web"), meta(&d, "worker")]);
        wait("reconnected and listed again", || {
            c.get(A).is_none() && c.get(&d).is_some()
        });
        assert_eq!(c.get(&b).unwrap().info.name, "web");
        let e = "e".repeat(64);
        // Not in this engine's inspect answers: the create event leaves no entry ...
        engine.send("create", &e);
        engine.send("destroy", &b);
        wait("destroy followed", || c.get(&b).is_none());
        assert!(c.get(&e).is_none());
        // ... and the engine going away leaves what is known readable without waiting.
        drop(engine);
        let t = Instant::now();
        for _ in 0..1000 {
            assert_eq!(c.get(&d).unwrap().info.name, "worker");
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(!c.take_changed().is_empty());
    }

    /// A socket another user owns gives no metadata (its listing would choose policies),
    /// and is checked again at each reconnection: once root's, it is followed.
    #[test]
    fn an_untrusted_socket_gives_no_metadata_until_it_is_fixed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let _engine = FakeEngine::start(&sock, vec![meta(A, "api")]);
        std::os::unix::fs::chown(&sock, Some(65534), None).unwrap();
        let c = Containers::start(&sock, false, false).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        c.request(A);
        std::thread::sleep(Duration::from_millis(500));
        assert!(c.get(A).is_none(), "metadata from a socket uid 65534 owns");
        // The operator's opt-in (--insecure-policies) takes it as it is.
        let insecure = Containers::start(&sock, false, true).unwrap();
        wait("the insecure client lists", || insecure.get(A).is_some());
        std::os::unix::fs::chown(&sock, Some(0), None).unwrap();
        wait("the fixed socket is followed", || c.get(A).is_some());
    }

    /// An inspect of container A answered with container B's metadata was cached
    /// under B's id: B's name (and the policy it selects) came from an answer about A.
    /// It is ignored, and A stays unknown (not absent).
    #[test]
    fn an_answer_about_another_container_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let b = "b".repeat(64);
        let _engine = FakeEngine::lying(&sock, vec![meta(&b, "web")], Some(meta(&b, "db-1")));
        let c = Containers::start(&sock, false, true).unwrap();
        wait("the listing is loaded", || c.get(&b).is_some());
        c.request(A);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            c.get(&b).unwrap().info.name,
            "web",
            "B renamed by an answer about A"
        );
        assert!(c.get(A).is_none() && !c.is_absent(A));
    }

    /// A lookup the engine answers with 404 marks the id absent (and wakes the loop);
    /// metadata for it later, or a new listing, clears that.
    #[test]
    fn a_container_the_engine_does_not_know_is_marked_absent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let b = "b".repeat(64);
        let _engine = FakeEngine::start(&sock, vec![meta(&b, "web")]);
        let c = Containers::start(&sock, false, true).unwrap();
        wait("the listing is loaded", || c.get(&b).is_some());
        c.take_changed();
        c.request(A);
        wait("the 404 is recorded", || c.is_absent(A));
        assert_eq!(c.take_changed(), vec![A.to_string()]);
        assert!(!c.is_absent(&b));
        c.put(meta(A, "api"));
        assert!(!c.is_absent(A));
        c.set_absent(A);
        c.replace_all(vec![meta(&b, "web")]);
        assert!(!c.is_absent(A), "a new listing asks again");
    }

    #[test]
    fn changes_wake_the_loop() {
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let c = Containers {
            wake: Some(EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap()),
            tx: Some(tx),
            ..Containers::disabled()
        };
        let readable = |c: &Containers| {
            let fd = c.wake_fd().unwrap();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() == 1
        };
        assert!(!readable(&c));
        c.put(meta(A, "a"));
        assert!(readable(&c));
        assert_eq!(c.take_changed().len(), 1);
        assert!(!readable(&c));
    }
}
