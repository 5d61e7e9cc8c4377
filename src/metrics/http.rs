//! The metrics listener: `GET /metrics` over HTTP/1.1, one response per connection.
//! Any local user can connect to it, and the agent runs as root with its memory
//! locked: what one connection may cost is bounded (the request head, the time it may
//! take, the connections served at once), whatever the client sends or withholds. The
//! request head is parsed by `httparse` from a fixed buffer.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the metrics listener allows one client.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Request line and headers together; a longer head is answered 431 and closed.
    pub max_head: usize,
    /// From accept to the end of the response: a client that trickles its request (or
    /// reads the response slowly) is cut off then, whatever each single read takes.
    pub deadline: Duration,
    /// Connections served at once (threads started once, when serving starts); one
    /// more is answered 503 and closed at once.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            // A Prometheus scrape's head is a few hundred bytes.
            max_head: 8 * 1024,
            deadline: Duration::from_secs(5),
            max_connections: 4,
        }
    }
}

/// Stack of a connection thread: it parses a head from a fixed buffer, renders the
/// families and writes a string; with mlockall every byte of it is resident.
const CONN_STACK: usize = crate::sys::THREAD_STACK;

/// Serves `GET /metrics` on `listener` in a thread of its own; `render` produces the body.
pub fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    serve_with(listener, render, ServeLimits::default())
}

/// [`serve`] with explicit limits.
pub fn serve_with(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    limits: ServeLimits,
) {
    std::thread::Builder::new()
        .name("metrics".into())
        .stack_size(crate::sys::THREAD_STACK)
        .spawn(move || accept_loop(listener, render, limits))
        .map(|_| ())
        .unwrap_or_else(|e| log::error!("cannot start the metrics thread: {e}"));
}

fn accept_loop(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    limits: ServeLimits,
) {
    // A fixed pool, started once: no thread (and no stack, locked and charged to the
    // agent's cgroup under mlockall) is created per connection. `busy` counts the
    // connections handed over and not yet done, so the channel never holds more than
    // the pool can take and a send never waits.
    let busy = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = crossbeam_channel::bounded::<TcpStream>(limits.max_connections);
    let mut workers = 0;
    for i in 0..limits.max_connections {
        let (rx, render, busy) = (rx.clone(), render.clone(), busy.clone());
        let started = std::thread::Builder::new()
            .name(format!("metrics-{i}"))
            .stack_size(CONN_STACK)
            .spawn(move || {
                for s in rx {
                    handle(s, &*render, limits);
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            });
        match started {
            Ok(_) => workers += 1,
            Err(e) => log::warn!("metrics: cannot start a connection thread: {e}"),
        }
    }
    if workers == 0 {
        log::error!("metrics: no connection thread could be started; not serving");
        return;
    }
    for stream in listener.incoming() {
        let s = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like repeat at once: do not spin on them.
                log::debug!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= workers {
            busy.fetch_sub(1, Ordering::AcqRel);
            refuse(s);
        } else if let Err(e) = tx.try_send(s) {
            // Cannot happen while `busy` is kept; answered all the same.
            busy.fetch_sub(1, Ordering::AcqRel);
            refuse(e.into_inner());
        }
    }
}

/// Answers a connection beyond the cap.
fn refuse(mut s: TcpStream) {
    // A small answer fits the socket buffer: this write does not wait.
    let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = respond(&mut s, "503 Service Unavailable", "busy\n", None);
}

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    TooLarge,
    TimedOut,
    /// Not HTTP/1.x (httparse refused it).
    Malformed,
    /// The client closed or the connection failed before the head ended.
    Closed,
}

/// What the listener needs of a request.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    path: String,
}

/// Headers a request may carry; more is answered as too large.
const MAX_HEADERS: usize = 32;

/// Parses a head from `buf`: `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Ok(Some(Head {
            method: req.method.unwrap_or("").to_string(),
            path: req.path.unwrap_or("").to_string(),
        })),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed),
    }
}

/// Reads a request head (up to the empty line) into at most `max` bytes and parses
/// it. `read` gets the time left before the deadline and returns like [`Read::read`].
fn read_head(
    max: usize,
    deadline: Instant,
    mut read: impl FnMut(&mut [u8], Duration) -> std::io::Result<usize>,
) -> Result<Head, HeadError> {
    let mut buf = vec![0u8; max];
    let mut len = 0;
    loop {
        if len > 0 {
            if let Some(head) = parse_head(&buf[..len])? {
                return Ok(head);
            }
        }
        if len == max {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::TimedOut);
        }
        match read(&mut buf[len..], left) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

fn handle(mut s: TcpStream, render: &(dyn Fn() -> String + Send + Sync), limits: ServeLimits) {
    let deadline = Instant::now() + limits.deadline;
    let head = read_head(limits.max_head, deadline, |buf, left| {
        s.set_read_timeout(Some(left))?;
        s.read(buf)
    });
    let (status, body) = match head {
        Ok(head) => {
            if head.method == "GET" && (head.path == "/metrics" || head.path == "/") {
                ("200 OK", render())
            } else {
                ("404 Not Found", "not found\n".to_string())
            }
        }
        Err(HeadError::TooLarge) => (
            "431 Request Header Fields Too Large",
            "request head too large\n".to_string(),
        ),
        Err(HeadError::TimedOut) => ("408 Request Timeout", "timed out\n".to_string()),
        Err(HeadError::Malformed) => ("400 Bad Request", "bad request\n".to_string()),
        Err(HeadError::Closed) => return,
    };
    let _ = respond(&mut s, status, &body, Some(deadline));
    // Unread request bytes make close() send a reset, which may discard the response
    // before the client reads it; a polite client has sent nothing more.
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// Writes a whole response, giving up at `deadline` (a client that reads slowly).
fn respond(
    s: &mut TcpStream,
    status: &str,
    body: &str,
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    for part in [head.as_bytes(), body.as_bytes()] {
        let mut rest = part;
        while !rest.is_empty() {
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                s.set_write_timeout(Some(left))?;
            }
            match s.write(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn server(limits: ServeLimits) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve_with(
            l,
            Arc::new(|| "oomwake_watched_cgroups 0\n".to_string()),
            limits,
        );
        addr
    }

    /// A normal scrape, bounded in time; the whole response.
    fn scrape(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    }

    #[test]
    fn serves_over_http() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve(l, Arc::new(|| "oomwake_watched_cgroups 0\n".to_string()));
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.ends_with("oomwake_watched_cgroups 0\n"));
    }

    #[test]
    fn a_request_head_is_read_into_at_most_max_bytes() {
        // An endless request without a newline: the reader stops at the bound.
        let mut fed = 0usize;
        let far = Instant::now() + Duration::from_secs(60);
        let r = read_head(8192, far, |buf, _| {
            buf.fill(b'a');
            fed += buf.len();
            Ok(buf.len())
        });
        assert_eq!(r, Err(HeadError::TooLarge));
        assert!(fed <= 8192, "read {fed} bytes");
        // Headers without an end count too, not only the request line.
        let mut src: &[u8] = b"GET / HTTP/1.1\r\n";
        let mut hdrs = std::io::Read::chain(&mut src, std::io::repeat(b'h'));
        assert_eq!(
            read_head(4096, far, |buf, _| hdrs.read(buf)),
            Err(HeadError::TooLarge)
        );
        // A normal head ends at its blank line.
        let mut req: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nextra";
        let head = read_head(4096, far, |buf, _| req.read(buf)).unwrap();
        assert_eq!(
            head,
            Head {
                method: "GET".into(),
                path: "/metrics".into()
            }
        );
        // A lenient client's bare newlines are accepted; what is not HTTP is refused.
        let mut req: &[u8] = b"GET / HTTP/1.0\n\n";
        assert!(read_head(4096, far, |buf, _| req.read(buf)).is_ok());
        let mut req: &[u8] = b"GET /metrics SMTP/1.1\r\n\r\n";
        assert_eq!(
            read_head(4096, far, |buf, _| req.read(buf)),
            Err(HeadError::Malformed)
        );
        // More headers than the fixed array holds: too large, not a bigger array.
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        let mut req = many.as_bytes();
        assert_eq!(
            read_head(4096, far, |buf, _| req.read(buf)),
            Err(HeadError::TooLarge)
        );
    }

    #[test]
    fn a_trickled_head_ends_at_the_deadline_not_at_a_read_timeout() {
        // One byte per read, each well within any per-read timeout: only the overall
        // deadline ends it.
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut reads = 0;
        let r = read_head(1 << 20, deadline, |buf, left| {
            assert!(left <= Duration::from_millis(300));
            reads += 1;
            std::thread::sleep(Duration::from_millis(10));
            buf[0] = b'x';
            Ok(1)
        });
        assert_eq!(r, Err(HeadError::TimedOut));
        assert!(Instant::now() >= deadline);
        assert!(reads < 1000, "{reads} reads");
    }

    #[test]
    fn a_flood_without_newline_is_cut_off_and_scrapes_go_on() {
        let addr = server(ServeLimits::default());
        let mut s = TcpStream::connect(addr).unwrap();
        // Bounded: the old listener read it all (the test then fails on the assert).
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let chunk = vec![b'a'; 1 << 20];
        let mut sent = 0usize;
        let mut cut = false;
        for _ in 0..64 {
            match s.write_all(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        assert!(cut, "the listener took {sent} bytes of a request line");
        // Socket buffers hold some megabytes; the agent itself read at most max_head.
        assert!(sent < 32 << 20, "{sent}");
        let resp = scrape(addr);
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.ends_with("oomwake_watched_cgroups 0\n"), "{resp}");
    }

    #[test]
    fn a_trickling_client_is_cut_off_and_does_not_hold_up_a_scrape() {
        let addr = server(ServeLimits {
            deadline: Duration::from_secs(3),
            ..ServeLimits::default()
        });
        let mut t = TcpStream::connect(addr).unwrap();
        t.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
        let trickler = std::thread::spawn(move || {
            // A byte every 50 ms, far below any per-read timeout, until cut off (or
            // 20 s, when the test fails).
            t.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let start = Instant::now();
            let mut resp = Vec::new();
            while start.elapsed() < Duration::from_secs(20) {
                let mut b = [0u8; 256];
                match t.read(&mut b) {
                    Ok(0) => return (true, String::from_utf8_lossy(&resp).into_owned()),
                    Ok(n) => resp.extend_from_slice(&b[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return (true, String::from_utf8_lossy(&resp).into_owned()),
                }
                if t.write_all(b"x").is_err() {
                    return (true, String::from_utf8_lossy(&resp).into_owned());
                }
            }
            (false, String::new())
        });
        // Served while the trickler is connected (the old listener served one client at
        // a time: this scrape waited as long as the trickler went on).
        let resp = scrape(addr);
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(
            !trickler.is_finished(),
            "the scrape waited for the trickler"
        );
        let (cut, resp) = trickler.join().unwrap();
        assert!(cut, "a trickling client was never cut off");
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 408"),
            "{resp}"
        );
    }

    #[test]
    fn connections_above_the_cap_are_refused_at_once() {
        let addr = server(ServeLimits {
            max_connections: 2,
            deadline: Duration::from_secs(5),
            ..ServeLimits::default()
        });
        // Two idle clients take both slots until the deadline.
        let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let resp = scrape(addr);
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        // When they are cut off, the slots are free again.
        for mut s in idle {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            assert!(r.is_empty() || r.starts_with("HTTP/1.1 408"), "{r}");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let resp = scrape(addr);
            if resp.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            // The slot is given back just after the 408 is written.
            assert!(Instant::now() < deadline, "{resp}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
