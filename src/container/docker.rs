//! The Docker Engine API as oomwake reads it: the running containers
//! (`GET /containers/json`), one container (`GET /containers/<id>/json`) and the stream
//! of container events (`GET /events`), turned into [`Meta`]. Only the fields used are
//! parsed; everything from the engine is data that may be missing or odd (no unwrap).

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::http::{self, BodyRead, HttpError};
use crate::perm::Owners;
use crate::policy::ContainerInfo;

/// Largest event of the events stream (an event carries the container's labels, and
/// Docker accepts a label of a megabyte): a longer one drops the stream, which is then
/// opened again (the containers are listed again).
pub const MAX_EVENT: usize = 4 << 20;

/// What the agent knows of one container: what policies match and audit lines carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The full id (64 hex digits).
    pub id: String,
    pub info: ContainerInfo,
}

impl Meta {
    pub fn compose_project(&self) -> Option<&str> {
        self.info
            .labels
            .get("com.docker.compose.project")
            .map(String::as_str)
    }

    pub fn compose_service(&self) -> Option<&str> {
        self.info
            .labels
            .get("com.docker.compose.service")
            .map(String::as_str)
    }
}

/// Docker's names start with `/` (`/api-1`); policies and audit lines use them without.
fn strip_slash(name: &str) -> String {
    name.strip_prefix('/').unwrap_or(name).to_string()
}

#[derive(Deserialize)]
struct ListEntry {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Names", default)]
    names: Option<Vec<String>>,
    #[serde(rename = "Image", default)]
    image: Option<String>,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

/// Parses the body of `GET /containers/json`.
pub fn parse_list(body: &[u8]) -> Result<Vec<Meta>, serde_json::Error> {
    let entries: Vec<ListEntry> = serde_json::from_slice(body)?;
    Ok(entries
        .into_iter()
        .map(|e| {
            // A linked container is also listed as `/other/alias`: the own name has
            // one slash only.
            let names = e.names.unwrap_or_default();
            let name = names
                .iter()
                .find(|n| n.matches('/').count() <= 1)
                .or(names.first())
                .map(|n| strip_slash(n))
                .unwrap_or_default();
            Meta {
                id: e.id,
                info: ContainerInfo {
                    name,
                    image: e.image.unwrap_or_default(),
                    labels: e.labels.unwrap_or_default(),
                },
            }
        })
        .collect())
}

#[derive(Deserialize)]
struct Inspect {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name", default)]
    name: Option<String>,
    #[serde(rename = "Config", default)]
    config: Option<InspectConfig>,
    #[serde(rename = "State", default)]
    state: Option<InspectState>,
}

#[derive(Deserialize)]
struct InspectState {
    #[serde(rename = "Pid", default)]
    pid: i64,
}

#[derive(Deserialize)]
struct InspectConfig {
    #[serde(rename = "Image", default)]
    image: Option<String>,
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

/// Parses the body of `GET /containers/<id>/json`; the image is `Config.Image`, the
/// reference as given to `docker run`.
pub fn parse_inspect(body: &[u8]) -> Result<Meta, serde_json::Error> {
    parse_inspect_with_pid(body).map(|(m, _)| m)
}

/// [`parse_inspect`], and the pid of the container's first process while it runs.
pub fn parse_inspect_with_pid(body: &[u8]) -> Result<(Meta, Option<u32>), serde_json::Error> {
    let i: Inspect = serde_json::from_slice(body)?;
    let pid = i
        .state
        .as_ref()
        .and_then(|s| u32::try_from(s.pid).ok())
        .filter(|&p| p > 0);
    let (image, labels) = match i.config {
        Some(c) => (c.image.unwrap_or_default(), c.labels.unwrap_or_default()),
        None => (String::new(), BTreeMap::new()),
    };
    Ok((
        Meta {
            id: i.id,
            info: ContainerInfo {
                name: i.name.as_deref().map(strip_slash).unwrap_or_default(),
                image,
                labels,
            },
        },
        pid,
    ))
}

/// One container event of `GET /events`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Event {
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "Action", default)]
    pub action: String,
    #[serde(rename = "Actor", default)]
    pub actor: Actor,
    #[serde(rename = "timeNano", default)]
    pub time_nano: i64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Actor {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Attributes", default)]
    pub attributes: BTreeMap<String, String>,
}

impl Event {
    /// What the event's attributes alone tell (name and image; labels are mixed with
    /// other attributes there, so they are taken from an inspect, not from here).
    pub fn name(&self) -> Option<&str> {
        self.actor.attributes.get("name").map(String::as_str)
    }
}

/// The actions the agent follows. `create` comes before the cgroup exists, so a
/// container's name is usually known before its first page fault.
pub const ACTIONS: [&str; 5] = ["create", "start", "rename", "die", "destroy"];

/// The query of the events stream: container events of [`ACTIONS`] only.
pub fn events_target() -> String {
    // {"type":["container"],"event":["create",...]} percent-encoded.
    let events = ACTIONS
        .iter()
        .map(|a| format!("%22{a}%22"))
        .collect::<Vec<_>>()
        .join("%2C");
    format!(
        "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%2C%22event%22%3A%5B{events}%5D%7D"
    )
}

/// A client of one engine socket; every call but the events stream has a deadline (and
/// each event of that stream, once it starts, has one too).
#[derive(Debug, Clone)]
pub struct Engine {
    pub socket: PathBuf,
    pub timeout: Duration,
    /// Who may own the socket, its directories and its server (None: anyone,
    /// `--insecure-policies`).
    pub trust: Option<Owners>,
}

/// Added to the message of a refused socket: how to accept it anyway.
const INSECURE_HINT: &str = ", or pass --insecure-policies";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{path}: {target}: {source}")]
    Json {
        path: PathBuf,
        target: String,
        #[source]
        source: serde_json::Error,
    },
}

impl EngineError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, EngineError::Http(e) if e.is_not_found())
    }

    /// The socket was refused by the trust check (see [`HttpError::is_untrusted`]).
    pub fn is_untrusted(&self) -> bool {
        matches!(self, EngineError::Http(e) if e.is_untrusted())
    }
}

impl Engine {
    /// A client that uses the socket only if it, its directories and its server are
    /// root's (or the caller's): see [`crate::perm::check_socket`].
    pub fn new(socket: &Path, timeout: Duration) -> Engine {
        Engine {
            socket: socket.to_path_buf(),
            timeout,
            trust: Some(Owners::current(INSECURE_HINT)),
        }
    }

    /// Trusts the socket whoever owns or serves it (`--insecure-policies`).
    pub fn insecure(mut self, insecure: bool) -> Engine {
        if insecure {
            self.trust = None;
        }
        self
    }

    fn json_err(&self, target: &str, source: serde_json::Error) -> EngineError {
        EngineError::Json {
            path: self.socket.clone(),
            target: target.to_string(),
            source,
        }
    }

    /// The running containers.
    pub fn list(&self) -> Result<Vec<Meta>, EngineError> {
        let target = "/containers/json";
        let body = http::get_body(&self.socket, self.trust, target, self.timeout)?;
        parse_list(&body).map_err(|e| self.json_err(target, e))
    }

    /// One container by id (or name); `Ok(None)` if the engine does not know it.
    pub fn inspect(&self, id: &str) -> Result<Option<Meta>, EngineError> {
        Ok(self.inspect_with_pid(id)?.map(|(m, _)| m))
    }

    /// [`Engine::inspect`], and the pid of its first process while it runs.
    pub fn inspect_with_pid(&self, id: &str) -> Result<Option<(Meta, Option<u32>)>, EngineError> {
        // Ids and names are [a-zA-Z0-9_.-]: nothing to escape; anything else is no
        // container (and must not reach the request line).
        if id.is_empty()
            || !id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
        {
            return Ok(None);
        }
        let target = format!("/containers/{id}/json");
        match http::get_body(&self.socket, self.trust, &target, self.timeout) {
            Ok(body) => parse_inspect_with_pid(&body)
                .map(Some)
                .map_err(|e| self.json_err(&target, e)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the events stream; its reads wait as long as the engine is silent, and
    /// each event, once its first byte came, must be whole within the timeout.
    pub fn events(&self) -> Result<Events, EngineError> {
        let target = events_target();
        let resp = http::get(
            &self.socket,
            self.trust,
            &target,
            self.timeout,
            BodyRead::Stream,
        )?;
        Ok(Events {
            resp,
            within: self.timeout,
        })
    }
}

/// The open events stream.
pub struct Events {
    resp: http::Response,
    within: Duration,
}

impl Events {
    /// Calls `f` for every event until the stream ends (engine stopped) or fails (an
    /// event over [`MAX_EVENT`] bytes, or not whole within the timeout, fails it).
    pub fn for_each(mut self, f: impl FnMut(Event)) -> io::Result<()> {
        let deadline = self.resp.deadline();
        let within = self.within;
        read_events_with(self.resp.body(), &mut || deadline.idle(within), f)
    }
}

/// The events of a stream of JSON objects (one per line, in any chunking).
///
/// Items are split here, each at most [`MAX_EVENT`] bytes (an endless item is an error,
/// not a buffer that grows), then parsed into an [`Event`], never into a
/// `serde_json::Value`: serde_json skips unknown values without recursion, so the
/// deepest item needs a few KiB of stack, where building a `Value` of it took more than
/// 256 KiB in a debug build (this runs on a small, locked stack: `sys::THREAD_STACK`).
pub fn read_events(r: &mut dyn Read, f: impl FnMut(Event)) -> io::Result<()> {
    read_events_with(r, &mut || {}, f)
}

/// [`read_events`]; `idle` is called before waiting for the next item (the stream's
/// deadline is then lifted until its first byte).
fn read_events_with(
    r: &mut dyn Read,
    idle: &mut dyn FnMut(),
    mut f: impl FnMut(Event),
) -> io::Result<()> {
    let mut r = BufReader::with_capacity(16 << 10, r);
    let mut item = Vec::new();
    let mut split = Split::default();
    loop {
        if item.is_empty() {
            idle();
        }
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            if item.is_empty() {
                return Ok(());
            }
            if !split.can_end() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the events stream ended inside an event",
                ));
            }
            deliver(&item, &mut f)?;
            return Ok(());
        }
        let mut used = 0;
        let mut whole = false;
        for &b in buf {
            used += 1;
            if item.is_empty() && b.is_ascii_whitespace() {
                continue;
            }
            let (keep, end) = split.step(b)?;
            if keep {
                item.push(b);
            }
            if end {
                whole = true;
                break;
            }
        }
        r.consume(used);
        if item.len() > MAX_EVENT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an event over {MAX_EVENT} bytes: dropping the stream"),
            ));
        }
        if whole {
            deliver(&item, &mut f)?;
            item.clear();
            // The memory of one large event is not kept (it would stay locked).
            if item.capacity() > 64 << 10 {
                item = Vec::new();
            }
            split = Split::default();
        }
    }
}

/// Hands one item to `f` if it is an event; an item that is not JSON ends the stream.
fn deliver(item: &[u8], f: &mut impl FnMut(Event)) -> io::Result<()> {
    match serde_json::from_slice::<Event>(item) {
        Ok(ev) => f(ev),
        // An event of a shape this version does not know is skipped, not fatal; an item
        // that is not JSON at all (checked without building anything) is.
        Err(_) => {
            serde_json::from_slice::<serde::de::IgnoredAny>(item).map_err(io::Error::other)?;
        }
    }
    Ok(())
}

/// Where one top-level JSON item of a stream ends: nesting is counted, not stacked.
#[derive(Default)]
struct Split {
    depth: usize,
    started: bool,
    in_str: bool,
    esc: bool,
    /// A bare scalar (number, `true`...), which ends at whitespace.
    scalar: bool,
}

impl Split {
    /// Takes the next byte of an item: whether to keep it, and whether the item ends.
    fn step(&mut self, b: u8) -> io::Result<(bool, bool)> {
        let first = !self.started;
        self.started = true;
        if self.in_str {
            if self.esc {
                self.esc = false;
            } else if b == b'\\' {
                self.esc = true;
            } else if b == b'"' {
                self.in_str = false;
                return Ok((true, self.depth == 0));
            }
            return Ok((true, false));
        }
        if self.scalar {
            if b.is_ascii_whitespace() {
                return Ok((false, true));
            }
            return Ok((true, false));
        }
        match b {
            b'"' => self.in_str = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth = self
                    .depth
                    .checked_sub(1)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unbalanced JSON"))?;
                return Ok((true, self.depth == 0));
            }
            _ if first => self.scalar = true,
            _ => {}
        }
        Ok((true, false))
    }

    /// Whether the end of the stream may end the item (a bare scalar).
    fn can_end(&self) -> bool {
        self.scalar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from Docker 20.10 here (`curl --unix-socket /var/run/docker.sock`), for a
    // container run with three labels (two of them compose's).
    const LIST: &[u8] = include_bytes!("fixtures/containers.json");
    const INSPECT: &[u8] = include_bytes!("fixtures/inspect.json");
    const EVENTS: &[u8] = include_bytes!("fixtures/events.jsonl");
    const ID: &str = "b947f87c20cd823078c5f5b32ef1a497026575d4bea5dd96ca07f118044e0bfd";

    #[test]
    fn list_of_a_real_engine() {
        let l = parse_list(LIST).unwrap();
        assert_eq!(l.len(), 1);
        let m = &l[0];
        assert_eq!(m.id, ID);
        assert_eq!(m.info.name, "oomwake-dm-fixture");
        assert_eq!(m.info.image, "oomwake-dm-fixture:1");
        assert_eq!(m.info.labels.get("tier").map(String::as_str), Some("api"));
        assert_eq!(m.compose_project(), Some("shop"));
        assert_eq!(m.compose_service(), Some("api"));
    }

    #[test]
    fn inspect_of_a_real_engine() {
        let m = parse_inspect(INSPECT).unwrap();
        assert_eq!(m.id, ID);
        assert_eq!(m.info.name, "oomwake-dm-fixture");
        assert_eq!(m.info.image, "oomwake-dm-fixture:1");
        assert_eq!(m.info.labels.len(), 3);
        let (_, pid) = parse_inspect_with_pid(INSPECT).unwrap();
        assert_eq!(pid, Some(29290));
        let (_, none) = parse_inspect_with_pid(br#"{"Id":"a","State":{"Pid":0}}"#).unwrap();
        assert_eq!(none, None, "a stopped container has no process");
    }

    #[test]
    fn events_of_a_real_engine() {
        let mut got = Vec::new();
        read_events(&mut &EVENTS[..], |e| got.push(e)).unwrap();
        let actions: Vec<&str> = got.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["create", "start", "rename", "die", "destroy"]);
        assert!(got
            .iter()
            .all(|e| e.kind == "container" && e.actor.id.len() == 64));
        assert_eq!(got[2].name(), Some("oomwake-dm-fixture2"));
        assert_eq!(
            got[2].actor.attributes.get("oldName").map(String::as_str),
            Some("/oomwake-dm-fixture")
        );
    }

    #[test]
    fn odd_but_valid_shapes_are_accepted() {
        // null labels and names, a linked alias before the own name.
        let l = parse_list(
            br#"[{"Id":"a","Names":["/web/db","/db"],"Image":"x","Labels":null},{"Id":"b","Names":null}]"#,
        )
        .unwrap();
        assert_eq!(l[0].info.name, "db");
        assert!(l[0].info.labels.is_empty());
        assert_eq!(l[1].info.name, "");
        assert_eq!(l[1].info.image, "");
        let m = parse_inspect(br#"{"Id":"a","Name":"/x","Config":null}"#).unwrap();
        assert_eq!(m.info.name, "x");
        // Unknown event shapes are skipped; garbage ends the stream with an error.
        let mut n = 0;
        read_events(
            &mut &br#"{"Type":"container","Action":"start","Actor":{"ID":"a"}} [1] {"x":1}"#[..],
            |_| n += 1,
        )
        .unwrap();
        assert_eq!(
            n, 2,
            "an object with defaults is still an event; [1] is skipped"
        );
        assert!(read_events(&mut &b"{not json"[..], |_| {}).is_err());
        assert!(parse_list(b"{}").is_err());
    }

    /// The Docker threads run on a small stack (sys::THREAD_STACK, locked whole under
    /// mlockall): JSON nested as deep as serde_json builds values (127 levels), and
    /// deeper, is read on such a stack without overflowing, in a debug build too.
    #[test]
    fn deeply_nested_json_fits_the_docker_threads_stack() {
        let nest = |depth: usize| {
            let mut v = "1".to_string();
            for _ in 0..depth {
                v = format!("{{\"a\":[{v}]}}");
            }
            v
        };
        // Each level is an object and an array: 63 levels make 126 nestings.
        let deep = nest(63);
        let too_deep = nest(200);
        let t = std::thread::Builder::new()
            .stack_size(crate::sys::THREAD_STACK)
            .spawn(move || {
                let stream = format!(
                    r#"{{"Type":"container","Action":"start","Actor":{{"ID":"a"}},"x":{deep}}}
{deep}
{{"Type":"container","Action":"rename","Actor":{{"ID":"a","Attributes":{deep}}}}}
{{"Type":"container","Action":"die","Actor":{{"ID":"b"}}}}"#
                );
                let mut got = Vec::new();
                read_events(&mut stream.as_bytes(), |e| got.push(e.action)).unwrap();
                let inspect = format!(r#"{{"Id":"a","Name":"/x","HostConfig":{deep}}}"#);
                let m = parse_inspect(inspect.as_bytes()).unwrap();
                let list = format!(r#"[{{"Id":"a","Names":["/x"],"Mounts":{deep}}}]"#);
                let l = parse_list(list.as_bytes()).unwrap();
                // Unknown fields are skipped without recursion, at any depth.
                let mut n = 0;
                read_events(&mut too_deep.as_bytes(), |_| n += 1).unwrap();
                let skipped = n == 1 && parse_inspect(too_deep.as_bytes()).is_err();
                (got, m.info.name, l.len(), skipped)
            })
            .unwrap();
        let (got, name, listed, skipped) = t.join().expect("no stack overflow");
        // The deep object is an event with defaults (no Type); the rename with a deep
        // value for its attributes is of a shape not known: skipped.
        assert_eq!(got, ["start", "", "die"]);
        assert_eq!((name.as_str(), listed), ("x", 1));
        assert!(
            skipped,
            "400 levels: an event with defaults; an inspect without an Id"
        );
    }

    #[test]
    fn the_events_query_names_the_followed_actions() {
        let t = events_target();
        assert!(t.starts_with("/events?filters=%7B%22type%22%3A%5B%22container%22%5D"));
        for a in ACTIONS {
            assert!(t.contains(&format!("%22{a}%22")), "{t}");
        }
    }

    #[test]
    fn inspect_never_puts_odd_bytes_on_the_request_line() {
        let e = Engine::new(Path::new("/nonexistent/socket"), Duration::from_secs(1));
        assert!(e.inspect("a b\r\nHost: x").unwrap().is_none());
        assert!(e.inspect("../../version").unwrap().is_none());
        assert!(e.inspect("").unwrap().is_none());
    }

    use crate::container::http::fake::{endless, serve_with, trickle, within};
    use std::time::Instant;

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

    /// `oomwake explain NAME` inspects the container by name through this call: an
    /// engine that trickles its head kept it waiting for ever.
    #[test]
    fn inspect_by_name_holds_its_deadline_against_a_trickling_engine() {
        let (_d, p, _sent) = serve_with(|s| trickle(s, b"HTTP/1.1 200 OK\r\n", b'x'));
        let t = Instant::now();
        let e = within(Duration::from_secs(5), move || {
            Engine::new(&p, Duration::from_secs(2)).inspect_with_pid("api-1")
        })
        .expect("inspect returned within 5 s")
        .unwrap_err();
        assert!(
            matches!(e, EngineError::Http(HttpError::Timeout { .. })),
            "{e}"
        );
        assert!(t.elapsed() >= Duration::from_millis(1900));
    }

    #[test]
    fn opening_the_events_stream_holds_its_deadline() {
        let (_d, p, _sent) = serve_with(|s| trickle(s, b"HTTP/1.1 200 OK\r\nX: ", b'x'));
        let r = within(Duration::from_secs(5), move || {
            Engine::new(&p, Duration::from_secs(2)).events().map(|_| ())
        })
        .expect("events() returned within 5 s");
        assert!(
            matches!(r, Err(EngineError::Http(HttpError::Timeout { .. }))),
            "{:?}",
            r.err()
        );
    }

    /// Items are split by their JSON nesting, in any chunking: braces, brackets and
    /// escaped quotes inside strings do not end an item.
    #[test]
    fn events_split_in_any_chunking() {
        struct ByteAtATime<'a>(&'a [u8]);
        impl Read for ByteAtATime<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match (self.0.split_first(), buf.first_mut()) {
                    (Some((&b, rest)), Some(out)) => {
                        *out = b;
                        self.0 = rest;
                        Ok(1)
                    }
                    _ => Ok(0),
                }
            }
        }
        let mut got = Vec::new();
        read_events(&mut ByteAtATime(EVENTS), |e| got.push(e.action)).unwrap();
        assert_eq!(got, ["create", "start", "rename", "die", "destroy"]);
        let odd = br#"{"Action":"rename","Actor":{"ID":"a","Attributes":{"name":"x}\"{[\\"}}}{"Action":"die"}"#;
        let mut names = Vec::new();
        read_events(&mut ByteAtATime(odd), |e| {
            names.push((e.action.clone(), e.name().map(str::to_string)))
        })
        .unwrap();
        assert_eq!(
            names,
            [
                ("rename".to_string(), Some("x}\"{[\\".to_string())),
                ("die".to_string(), None)
            ]
        );
        // An item cut by the end of the stream, or a stray closing bracket: errors.
        assert!(read_events(&mut &br#"{"Action":"die""#[..], |_| {}).is_err());
        assert!(read_events(&mut &b"]"[..], |_| {}).is_err());
    }

    /// The stream may be silent for ever between events, but an event that has begun
    /// must be whole within the timeout (it waited for ever, 1.5 s a byte).
    #[test]
    fn an_event_trickled_byte_by_byte_drops_the_stream() {
        let (_d, p, _sent) = serve_with(|s| {
            let mut head = CHUNKED.to_vec();
            // A whole event first, then one that never ends, in one big chunk.
            let ev = br#"{"Type":"container","Action":"start","Actor":{"ID":"a"}}"#;
            head.extend(format!("{:x}\r\n", ev.len()).as_bytes());
            head.extend(ev);
            head.extend(b"\r\n1000\r\n{\"Type\":\"container\",\"x\":\"");
            trickle(s, &head, b'a')
        });
        let t = Instant::now();
        let (got, r) = within(Duration::from_secs(8), move || {
            let mut got = Vec::new();
            let r = Engine::new(&p, Duration::from_secs(2))
                .events()
                .map(|st| st.for_each(|e| got.push(e.action)));
            (got, r)
        })
        .expect("the stream was dropped within 8 s");
        let r = r.expect("the stream opened");
        assert!(r.is_err(), "a half event is no end of stream");
        assert_eq!(got, ["start"]);
        assert!(t.elapsed() >= Duration::from_millis(1900));
    }

    /// A silent stream is not dropped: events far apart still arrive.
    #[test]
    fn a_silent_events_stream_is_kept() {
        let (_d, p, _sent) = serve_with(|mut s| {
            use std::io::Write;
            let ev = br#"{"Type":"container","Action":"die","Actor":{"ID":"a"}}"#;
            let chunk = |s: &mut std::os::unix::net::UnixStream| {
                let _ = s.write_all(format!("{:x}\r\n", ev.len() + 1).as_bytes());
                let _ = s.write_all(ev);
                let _ = s.write_all(b"\n\r\n");
            };
            let _ = s.write_all(CHUNKED);
            chunk(&mut s);
            std::thread::sleep(Duration::from_millis(2500));
            chunk(&mut s);
            let _ = s.write_all(b"0\r\n\r\n");
            0
        });
        let mut got = 0;
        Engine::new(&p, Duration::from_millis(1000))
            .events()
            .unwrap()
            .for_each(|_| got += 1)
            .unwrap();
        assert_eq!(got, 2);
    }

    /// One endless event (a string that never closes, an array nested for ever) was
    /// buffered whole: here 64 MiB (the fake engine's cap); from a real engine, until
    /// the agent's memory cgroup killed it.
    #[test]
    fn an_endless_event_is_cut_at_the_event_bound() {
        let mut string = b"1000\r\n".to_vec();
        string.extend([b'a'; 0x1000]);
        string.extend(b"\r\n");
        let mut nested = b"1000\r\n".to_vec();
        nested.extend([b'['; 0x1000]);
        nested.extend(b"\r\n");
        let open = br#"{"Type":"container","x":""#;
        let mut pre_string = format!("{:x}\r\n", open.len()).into_bytes();
        pre_string.extend(open);
        pre_string.extend(b"\r\n");
        for (pre, unit) in [(pre_string, string), (Vec::new(), nested)] {
            let (_d, p, sent) = serve_with(move |s| endless(s, CHUNKED, &pre, &unit));
            let r = within(Duration::from_secs(30), move || {
                Engine::new(&p, Duration::from_secs(20))
                    .events()
                    .map(|st| st.for_each(|_| {}))
            })
            .expect("the stream was dropped")
            .expect("the stream opened");
            let sent = sent.join().unwrap();
            assert!(
                sent < MAX_EVENT + (8 << 20),
                "{sent} bytes sent before the client gave up"
            );
            let e = r.unwrap_err();
            assert!(e.to_string().contains("an event over"), "{e}");
        }
    }
}
