//! The little HTTP/1.1 the Docker Engine API needs, over its unix socket: a GET with a
//! deadline whose whole body is read (bounded), and a GET whose chunked body is a
//! stream (`/events`). Response heads are parsed by `httparse`; the chunked framing is
//! decoded here. Nothing else of HTTP is needed (no TLS, no keep-alive, no redirects).
//!
//! Every call has one deadline for all of it (connecting, the request, each byte of the
//! head, and of the body unless it is a stream): the socket's read timeout is set to the
//! time left before each read, so an engine that trickles a byte now and then cannot
//! hold a call longer than its deadline. Every read is bounded in bytes: the head, each
//! chunk size line, the trailers and a body read whole. Before connecting, the socket
//! and its directories are checked like policy files ([`crate::perm::check_socket`]) and
//! the peer's uid (SO_PEERCRED) must be root's or the socket owner's: whoever serves the
//! socket decides which policy a container gets.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::perm::{Owners, PermError};

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Largest body read whole (a list of a few thousand containers is a few MiB).
pub const MAX_BODY: usize = 32 << 20;
/// Largest chunk announced by a chunked body (a stream reads its chunks piecemeal;
/// nothing the engine sends is one chunk of more than a body).
pub const MAX_CHUNK: u64 = MAX_BODY as u64;
/// Largest chunk size line, and all the trailers of a chunked body together.
const MAX_SIZE_LINE: u64 = 1024;
const MAX_TRAILERS: u64 = 8 << 10;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: timed out after {after:?}")]
    Timeout { path: PathBuf, after: Duration },
    #[error("{path}: bad response: {what}")]
    Bad { path: PathBuf, what: String },
    #[error("{path}: HTTP {status} for {target}")]
    Status {
        path: PathBuf,
        target: String,
        status: u16,
    },
    /// The message of `source` names the path that failed (the socket or a directory).
    #[error("{source}")]
    Untrusted {
        path: PathBuf,
        #[source]
        source: PermError,
    },
    #[error(
        "{path}: served by uid {uid}, neither root nor the socket's owner (uid {owner}): refusing to trust it as the Docker socket (fix: serve it as root{hint})"
    )]
    Peer {
        path: PathBuf,
        uid: u32,
        owner: u32,
        hint: &'static str,
    },
}

impl HttpError {
    /// True when the engine said the object does not exist (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, HttpError::Status { status: 404, .. })
    }

    /// True when the socket was refused by the trust check (its owner, its
    /// directories or its peer), not merely absent or silent.
    pub fn is_untrusted(&self) -> bool {
        matches!(self, HttpError::Untrusted { .. } | HttpError::Peer { .. })
    }
}

/// What bounds the reads from a connection.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// Every read must be done by then.
    At(Instant),
    /// Reads wait as long as the engine is silent; once bytes come, the rest of what
    /// they start must come within this (set again by the reader between items).
    FromFirstByte(Duration),
}

/// The limit of a connection, shared with the reader of its body.
#[derive(Debug, Clone)]
pub struct Deadline(Arc<Mutex<Limit>>);

impl Deadline {
    fn new(l: Limit) -> Deadline {
        Deadline(Arc::new(Mutex::new(l)))
    }

    fn get(&self) -> Limit {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, l: Limit) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = l;
    }

    /// Between two items of a stream: wait for the next as long as it takes, then give
    /// what it starts `within` to arrive.
    pub fn idle(&self, within: Duration) {
        self.set(Limit::FromFirstByte(within));
    }
}

/// The socket, read with its [`Deadline`]: the read timeout is the time left, set
/// before every read (a per-read timeout alone is restarted by every trickled byte).
struct Conn {
    stream: UnixStream,
    deadline: Deadline,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.deadline.get() {
            Limit::At(t) => {
                let left = t.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
                }
                self.stream.set_read_timeout(Some(left))?;
                self.stream.read(buf)
            }
            Limit::FromFirstByte(within) => {
                self.stream.set_read_timeout(None)?;
                let n = self.stream.read(buf)?;
                if n > 0 {
                    self.deadline.set(Limit::At(Instant::now() + within));
                }
                Ok(n)
            }
        }
    }
}

/// A response whose head has been read; the body is read through [`Response::body`].
pub struct Response {
    pub status: u16,
    body: Body,
    deadline: Deadline,
}

enum Body {
    Length(io::Take<BufReader<Conn>>),
    Chunked(Chunked<BufReader<Conn>>),
    Close(BufReader<Conn>),
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Length(r) => r.read(buf),
            Body::Chunked(r) => r.read(buf),
            Body::Close(r) => r.read(buf),
        }
    }
}

impl Response {
    pub fn body(&mut self) -> &mut dyn Read {
        &mut self.body
    }

    /// The limit of the body's reads, for a reader of a stream to set between items.
    pub fn deadline(&self) -> Deadline {
        self.deadline.clone()
    }
}

/// How the body of a response is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRead {
    /// Within the deadline of the call, like the head.
    Whole,
    /// A stream: reads wait as long as the engine is silent, and once bytes come, what
    /// they start must come within the call's timeout (see [`Deadline::idle`]).
    Stream,
}

/// Checks the socket at `sock` (unless `trust` is None: `--insecure-policies`) and
/// connects to it before `deadline`.
fn connect(
    sock: &Path,
    trust: Option<Owners>,
    deadline: Instant,
    timeout: Duration,
) -> Result<UnixStream, HttpError> {
    let (path, owner) = match trust {
        Some(owners) => match crate::perm::check_socket(sock, "the Docker socket", owners) {
            Ok((real, owner)) => (real, Some((owners, owner))),
            // Absent (or unreadable): an engine that is not there, not a refusal.
            Err(PermError::Io { path, error }) => {
                return Err(HttpError::Io {
                    path,
                    source: error,
                })
            }
            Err(source) => {
                return Err(HttpError::Untrusted {
                    path: sock.to_path_buf(),
                    source,
                })
            }
        },
        None => (sock.to_path_buf(), None),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let stream = crate::sys::connect_unix(&path, left).map_err(|e| timed(sock, e, timeout))?;
    if let Some((owners, owner)) = owner {
        let uid = crate::sys::peer_uid(&stream).map_err(|source| HttpError::Io {
            path: sock.to_path_buf(),
            source,
        })?;
        if uid != 0 && uid != owner {
            return Err(HttpError::Peer {
                path: sock.to_path_buf(),
                uid,
                owner,
                hint: owners.hint,
            });
        }
    }
    Ok(stream)
}

/// Sends `GET target` on the socket at `sock` and reads the response head, all within
/// `timeout`; then the body is read as `body` says. `trust`: who may own the socket,
/// its directories and its server (None: anyone, `--insecure-policies`).
pub fn get(
    sock: &Path,
    trust: Option<Owners>,
    target: &str,
    timeout: Duration,
    body: BodyRead,
) -> Result<Response, HttpError> {
    let io_err = |source| HttpError::Io {
        path: sock.to_path_buf(),
        source,
    };
    let deadline_at = Instant::now() + timeout;
    let stream = connect(sock, trust, deadline_at, timeout)?;
    let left = deadline_at.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HttpError::Timeout {
            path: sock.to_path_buf(),
            after: timeout,
        });
    }
    stream.set_write_timeout(Some(left)).map_err(io_err)?;
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: docker\r\nUser-Agent: oomwake\r\nConnection: close\r\n\r\n"
    );
    (&stream)
        .write_all(req.as_bytes())
        .map_err(|e| timed(sock, e, timeout))?;
    let deadline = Deadline::new(Limit::At(deadline_at));
    let mut r = BufReader::new(Conn {
        stream,
        deadline: deadline.clone(),
    });
    let mut head = Vec::with_capacity(1024);
    // Up to the empty line that ends the head, never more than MAX_HEAD bytes (a line
    // without its newline is bounded too).
    loop {
        let before = head.len();
        let room = (MAX_HEAD + 1 - head.len()) as u64;
        let n = (&mut r)
            .take(room)
            .read_until(b'\n', &mut head)
            .map_err(|e| timed(sock, e, timeout))?;
        if head.len() > MAX_HEAD {
            return Err(bad(
                sock,
                &format!("response head over {MAX_HEAD} bytes without its end"),
            ));
        }
        if n == 0 {
            return Err(bad(sock, "connection closed in the response head"));
        }
        if head[before..] == *b"\r\n" || head[before..] == *b"\n" {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut parsed = httparse::Response::new(&mut headers);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad(sock, "incomplete response head")),
        Err(e) => return Err(bad(sock, &e.to_string())),
    }
    let status = parsed.code.unwrap_or(0);
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.ends_with("chunked"));
    let length = header("content-length");
    if body == BodyRead::Stream {
        deadline.idle(timeout);
    }
    let body = if chunked {
        Body::Chunked(Chunked::new(r))
    } else if let Some(len) = length {
        let len: u64 = len
            .parse()
            .map_err(|_| bad(sock, &format!("Content-Length {len:?}")))?;
        Body::Length(r.take(len))
    } else {
        Body::Close(r)
    };
    if !(200..300).contains(&status) {
        return Err(HttpError::Status {
            path: sock.to_path_buf(),
            target: target.to_string(),
            status,
        });
    }
    Ok(Response {
        status,
        body,
        deadline,
    })
}

/// `GET target`, the whole body read within `timeout` (at most [`MAX_BODY`] bytes).
pub fn get_body(
    sock: &Path,
    trust: Option<Owners>,
    target: &str,
    timeout: Duration,
) -> Result<Vec<u8>, HttpError> {
    let mut resp = get(sock, trust, target, timeout, BodyRead::Whole)?;
    let mut body = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = resp
            .body()
            .read(&mut buf)
            .map_err(|e| timed(sock, e, timeout))?;
        if n == 0 {
            return Ok(body);
        }
        if body.len() + n > MAX_BODY {
            return Err(bad(
                sock,
                &format!("response body over {MAX_BODY} bytes: dropped"),
            ));
        }
        body.extend_from_slice(&buf[..n]);
    }
}

fn bad(sock: &Path, what: &str) -> HttpError {
    HttpError::Bad {
        path: sock.to_path_buf(),
        what: what.to_string(),
    }
}

/// An I/O error of a call, a timeout as such (the time is that of the whole call).
pub fn timed(sock: &Path, e: io::Error, after: Duration) -> HttpError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::Timeout {
            path: sock.to_path_buf(),
            after,
        },
        _ => HttpError::Io {
            path: sock.to_path_buf(),
            source: e,
        },
    }
}

/// Decodes `Transfer-Encoding: chunked` (RFC 9112 section 7.1): hex size, optional
/// extensions, CRLF, data, CRLF; a zero size ends the body (trailers are skipped).
/// Size lines, chunk sizes and trailers are bounded ([`MAX_CHUNK`]).
pub struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk; None before a size line.
    left: Option<u64>,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    pub fn new(inner: R) -> Chunked<R> {
        Chunked {
            inner,
            left: None,
            done: false,
        }
    }

    fn size_line(&mut self) -> io::Result<u64> {
        let mut line = Vec::new();
        // The size line is short; anything longer is not HTTP.
        let n = (&mut self.inner)
            .take(MAX_SIZE_LINE)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream ended inside a chunked body",
            ));
        }
        let text = std::str::from_utf8(&line)
            .map_err(|_| invalid("chunk size is not text"))?
            .trim_end_matches(['\r', '\n']);
        let hex = text.split(';').next().unwrap_or("").trim();
        let size =
            u64::from_str_radix(hex, 16).map_err(|_| invalid(&format!("chunk size {hex:?}")))?;
        if size > MAX_CHUNK {
            return Err(invalid(&format!(
                "chunk size {size} over {MAX_CHUNK} bytes"
            )));
        }
        Ok(size)
    }

    fn crlf(&mut self) -> io::Result<()> {
        let mut line = Vec::new();
        (&mut self.inner).take(2).read_until(b'\n', &mut line)?;
        match line.as_slice() {
            b"\r\n" | b"\n" => Ok(()),
            _ => Err(invalid("chunk not followed by CRLF")),
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let left = match self.left {
            Some(n) if n > 0 => n,
            _ => {
                let n = self.size_line()?;
                if n == 0 {
                    // Trailers, up to the empty line; MAX_TRAILERS bytes in all.
                    let mut budget = MAX_TRAILERS;
                    loop {
                        let mut line = Vec::new();
                        let got = (&mut self.inner)
                            .take(budget)
                            .read_until(b'\n', &mut line)?;
                        if got == 0 && budget == 0 {
                            return Err(invalid("trailers too large"));
                        }
                        if got == 0 || line == b"\r\n" || line == b"\n" {
                            break;
                        }
                        budget -= got as u64;
                    }
                    self.done = true;
                    return Ok(0);
                }
                self.left = Some(n);
                n
            }
        };
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream ended inside a chunk",
            ));
        }
        let rest = left - got as u64;
        self.left = Some(rest);
        if rest == 0 {
            self.crlf()?;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(wire: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Chunked::new(wire).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            decode(b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n").unwrap(),
            b"hello, world"
        );
        assert_eq!(decode(b"0\r\nX-Trailer: 1\r\n\r\n").unwrap(), b"");
        assert_eq!(
            decode(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap(),
            b"0123456789"
        );
    }

    #[test]
    fn broken_chunked_bodies_are_errors_not_garbage() {
        assert!(decode(b"zz\r\nhello\r\n").is_err());
        assert!(decode(b"5\r\nhel").is_err());
        assert!(decode(b"5\r\nhelloXX0\r\n\r\n").is_err());
        assert!(decode(b"5\r\nhello\r\n").is_err(), "no final chunk");
    }

    /// A one-shot server on a socket in a TempDir that answers with `reply`.
    fn serve(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let _ = s.write_all(reply);
            }
        });
        (dir, path)
    }

    #[test]
    fn get_reads_length_chunked_and_status() {
        let (_d, p) = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]");
        assert_eq!(
            get_body(&p, None, "/x", Duration::from_secs(5)).unwrap(),
            b"[]"
        );
        let (_d, p) =
            serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
        assert_eq!(
            get_body(&p, None, "/x", Duration::from_secs(5)).unwrap(),
            b"{}"
        );
        let (_d, p) = serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        let e = get_body(&p, None, "/containers/x/json", Duration::from_secs(5)).unwrap_err();
        assert!(e.is_not_found(), "{e}");
    }

    #[test]
    fn a_silent_engine_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // Accepts (the backlog does) and never answers.
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = Instant::now();
        let e = get_body(&path, None, "/x", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn no_engine_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = get_body(&dir.path().join("none"), None, "/x", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, HttpError::Io { .. }), "{e}");
    }

    use super::fake::{endless, serve_with, trickle, within, SENT_CAP};

    /// The engine: a byte every 1.5 s, never a newline. Each byte restarted the
    /// 2 s read timeout and the deadline was looked at only after a newline: the call
    /// waited for ever.
    #[test]
    fn a_head_trickled_byte_by_byte_times_out_at_the_deadline() {
        let (_d, p, _sent) = serve_with(|s| trickle(s, b"HTTP/1.1 200 OK\r\nX-Slow: ", b'a'));
        let t = Instant::now();
        let e = within(Duration::from_secs(5), move || {
            get_body(&p, None, "/x", Duration::from_secs(2))
        })
        .expect("the call returned within 5 s")
        .unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            t.elapsed()
        );
    }

    /// Inside one read of a chunked body (its size line) the deadline holds too.
    #[test]
    fn a_chunk_size_line_trickled_byte_by_byte_times_out_at_the_deadline() {
        let (_d, p, _sent) = serve_with(|s| {
            trickle(
                s,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b'0',
            )
        });
        let e = within(Duration::from_secs(5), move || {
            get_body(&p, None, "/x", Duration::from_secs(2))
        })
        .expect("the call returned within 5 s")
        .unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
    }

    /// An engine whose listen backlog is full (it stopped accepting): connect(2) itself
    /// waited for ever.
    #[test]
    fn an_engine_that_stopped_accepting_times_out_at_connect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Fill the backlog (never accepted) until a connect cannot get in.
        let mut held = Vec::new();
        let full = loop {
            match crate::sys::connect_unix(&path, Duration::from_millis(20)) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "the backlog never filled");
        };
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock, "{full}");
        let t = Instant::now();
        let e = within(Duration::from_secs(5), move || {
            get_body(&path, None, "/x", Duration::from_millis(500))
        })
        .expect("the call returned within 5 s")
        .unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t.elapsed()
        );
        drop(held);
    }

    /// A head line with no newline was read whole into memory (64 MiB here: the cap of
    /// the fake engine; without one, until the agent's cgroup killed it).
    #[test]
    fn an_endless_head_line_is_cut_at_the_head_bound() {
        let (_d, p, sent) = serve_with(|s| endless(s, b"HTTP/1.1 200 OK\r\nX-Long: ", b"", b"a"));
        let e = within(Duration::from_secs(20), move || {
            get_body(&p, None, "/x", Duration::from_secs(10))
        })
        .expect("the call returned")
        .unwrap_err();
        assert!(e.to_string().contains("response head over"), "{e}");
        let sent = sent.join().unwrap();
        assert!(
            sent < 8 << 20,
            "{sent} bytes sent before the client gave up"
        );
    }

    /// Endless trailers after the last chunk were all read (within one read call, so the
    /// deadline was never looked at).
    #[test]
    fn endless_trailers_are_cut() {
        let (_d, p, sent) = serve_with(|s| {
            endless(
                s,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n",
                b"",
                b"X-T: a\r\n",
            )
        });
        let e = within(Duration::from_secs(20), move || {
            get_body(&p, None, "/x", Duration::from_secs(10))
        })
        .expect("the call returned")
        .unwrap_err();
        assert!(e.to_string().contains("trailers too large"), "{e}");
        let sent = sent.join().unwrap();
        assert!(
            sent < 8 << 20,
            "{sent} bytes sent before the client gave up"
        );
    }

    /// A body without an end (no length, never closed; or endless chunks) is dropped at
    /// MAX_BODY.
    #[test]
    fn an_endless_body_is_cut_at_the_body_bound() {
        let mut chunk = b"1000\r\n".to_vec();
        chunk.extend([b'['; 0x1000]);
        chunk.extend(b"\r\n");
        for (head, unit) in [
            (&b"HTTP/1.1 200 OK\r\n\r\n"[..], b"[".to_vec()),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                chunk,
            ),
        ] {
            let (_d, p, sent) = serve_with(move |s| endless(s, head, b"", &unit));
            let e = within(Duration::from_secs(30), move || {
                get_body(&p, None, "/x", Duration::from_secs(20))
            })
            .expect("the call returned")
            .unwrap_err();
            assert!(e.to_string().contains("response body over"), "{e}");
            let sent = sent.join().unwrap();
            assert!(sent < SENT_CAP, "{sent} bytes sent");
        }
    }

    #[test]
    fn a_chunk_larger_than_a_body_is_refused() {
        let e = decode(b"7fffffffffffffff\r\nabc").unwrap_err();
        assert!(e.to_string().contains("over"), "{e}");
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// An engine answering `[]` to every request on `path`, until the test ends.
    fn answer_forever(path: &Path) {
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]");
            }
        });
    }

    const ROOT_ONLY: Option<Owners> = Some(Owners {
        me: None,
        hint: ", or pass --insecure-policies",
    });

    /// Whoever serves the socket chooses the policy of a container (by its name or
    /// labels): a socket another user owns, or in a directory another user can write,
    /// is refused unless the operator opted in.
    #[test]
    fn a_socket_another_user_owns_or_can_replace_is_refused() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let sock = dir.join("docker.sock");
        answer_forever(&sock);
        // root:root 0660 in a 0755 root directory (as Docker's own): trusted.
        chmod(&sock, 0o660);
        let call = |trust| get_body(&sock, trust, "/containers/json", Duration::from_secs(5));
        assert_eq!(call(ROOT_ONLY).unwrap(), b"[]");
        std::os::unix::fs::chown(&sock, Some(65534), None).unwrap();
        let e = call(ROOT_ONLY).unwrap_err();
        assert!(e.is_untrusted(), "{e}");
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert!(e.to_string().contains("--insecure-policies"), "{e}");
        assert_eq!(call(None).unwrap(), b"[]", "the operator opted in");
        std::os::unix::fs::chown(&sock, Some(0), None).unwrap();
        chmod(&dir, 0o777);
        let e = call(ROOT_ONLY).unwrap_err();
        assert!(e.is_untrusted(), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("{}: writable by group or others", dir.display())),
            "{e}"
        );
        // Reached through a link: the target and its directories are judged.
        chmod(&dir, 0o755);
        let link = t.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        assert_eq!(
            get_body(&link, ROOT_ONLY, "/x", Duration::from_secs(5)).unwrap(),
            b"[]"
        );
        chmod(&dir, 0o1777);
        // A sticky root directory (as /tmp) above a socket root owns is fine...
        assert_eq!(call(ROOT_ONLY).unwrap(), b"[]");
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        // ...not one another user owns.
        let e = get_body(&link, ROOT_ONLY, "/x", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert!(e.to_string().contains("reached through"), "{e}");
    }

    /// The path as configured is judged too, not only where it leads: a link another
    /// user owns, or one in a directory another user owns, can be turned after the
    /// check to another socket root serves (dockerd's metrics socket and containerd's
    /// debug socket answer 404 to every container: its metadata is then "absent").
    /// Both were followed.
    #[test]
    fn a_link_to_the_socket_that_another_user_can_turn_is_refused() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        chmod(t.path(), 0o755);
        let dir = t.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        let sock = dir.join("docker.sock");
        answer_forever(&sock);
        // A link in a directory uid 65534 owns (they can replace it at will).
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        chmod(&theirs, 0o755);
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let link = theirs.join("docker.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = get_body(&link, ROOT_ONLY, "/x", Duration::from_secs(5)).unwrap_err();
        assert!(e.is_untrusted(), "{e}");
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert_eq!(
            get_body(&link, None, "/x", Duration::from_secs(5)).unwrap(),
            b"[]",
            "the operator opted in"
        );
        // A link uid 65534 owns, in root's directory.
        let link2 = t.path().join("docker.sock");
        std::os::unix::fs::symlink(&sock, &link2).unwrap();
        std::os::unix::fs::lchown(&link2, Some(65534), None).unwrap();
        let e = get_body(&link2, ROOT_ONLY, "/x", Duration::from_secs(5)).unwrap_err();
        assert!(e.is_untrusted(), "{e}");
        assert!(e.to_string().contains("65534"), "{e}");
        // A chain through root's links in root's directories is fine; one through
        // theirs is not.
        std::os::unix::fs::lchown(&link2, Some(0), None).unwrap();
        let link3 = dir.join("via.sock");
        std::os::unix::fs::symlink(&link2, &link3).unwrap();
        assert_eq!(
            get_body(&link3, ROOT_ONLY, "/x", Duration::from_secs(5)).unwrap(),
            b"[]"
        );
        let link4 = dir.join("via-theirs.sock");
        std::os::unix::fs::symlink(&link, &link4).unwrap();
        let e = get_body(&link4, ROOT_ONLY, "/x", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert!(e.to_string().contains("reached through"), "{e}");
    }

    /// A socket file root owns, served by another user (SO_PEERCRED): refused.
    #[test]
    fn a_socket_served_by_another_user_is_refused() {
        if !is_root() {
            eprintln!("skipped: needs root to change uid");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        chmod(t.path(), 0o755);
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let dir = t.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o755);
        // A thread of uid 65534 (setresuid(2) itself changes the calling thread only;
        // glibc's wrapper would change all) binds and listens.
        let bound = theirs.join("s.sock");
        let l = {
            let bound = bound.clone();
            std::thread::spawn(move || {
                // SAFETY: setresuid takes three ids by value; it changes this thread's
                // credentials only (the raw syscall, not glibc's process-wide wrapper),
                // and the thread ends right after binding.
                let ret = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 0) };
                assert_eq!(ret, 0, "setresuid: {}", io::Error::last_os_error());
                std::os::unix::net::UnixListener::bind(&bound).unwrap()
            })
            .join()
            .unwrap()
        };
        // Root then puts it where a root engine's socket would be, owned by root.
        let sock = dir.join("docker.sock");
        std::fs::rename(&bound, &sock).unwrap();
        std::os::unix::fs::chown(&sock, Some(0), Some(0)).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]");
            }
        });
        let e = get_body(&sock, ROOT_ONLY, "/x", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, HttpError::Peer { uid: 65534, .. }), "{e}");
        assert!(e.is_untrusted());
        assert_eq!(
            get_body(&sock, None, "/x", Duration::from_secs(5)).unwrap(),
            b"[]",
            "the operator opted in"
        );
    }
}

/// Fake engines for the tests of the Docker client: one-shot servers on a unix socket in
/// a TempDir that trickle or flood.
#[cfg(test)]
pub(crate) mod fake {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    /// Most a flooding fake engine sends.
    pub const SENT_CAP: usize = 64 << 20;

    /// Serves one connection: reads the request and hands the stream to `f`, whose
    /// result (the bytes it sent) the handle returns.
    pub fn serve_with(
        f: impl FnOnce(UnixStream) -> usize + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, JoinHandle<usize>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return 0 };
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req);
            f(s)
        });
        (dir, path, h)
    }

    /// Sends `head`, then `byte` every 1.5 s until the client goes (or 30 s).
    pub fn trickle(mut s: UnixStream, head: &[u8], byte: u8) -> usize {
        let end = Instant::now() + Duration::from_secs(30);
        let mut sent = 0;
        if s.write_all(head).is_err() {
            return 0;
        }
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1500));
            if s.write_all(&[byte]).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// Sends `head` and `pre`, then `unit` again and again until the client goes (or
    /// [`SENT_CAP`] bytes); returns the bytes sent.
    pub fn endless(mut s: UnixStream, head: &[u8], pre: &[u8], unit: &[u8]) -> usize {
        let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
        let mut block = Vec::with_capacity(64 << 10);
        while block.len() + unit.len() <= 64 << 10 {
            block.extend_from_slice(unit);
        }
        let mut sent = 0;
        if s.write_all(head).and_then(|_| s.write_all(pre)).is_err() {
            return 0;
        }
        while sent < SENT_CAP {
            if s.write_all(&block).is_err() {
                break;
            }
            sent += block.len();
        }
        sent
    }

    /// Runs `f` on a thread and waits at most `limit` for it (None: still running).
    pub fn within<T: Send + 'static>(
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit).ok()
    }
}
