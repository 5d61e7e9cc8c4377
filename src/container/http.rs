//! The little HTTP/1.1 the Docker Engine API needs, over its unix socket: a GET with a
//! deadline whose whole body is read (bounded), and a GET whose chunked body is a
//! stream (`/events`). Response heads are parsed by `httparse`; the chunked framing is
//! decoded here. Nothing else of HTTP is needed (no TLS, no keep-alive, no redirects).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Largest body read whole (a list of a few thousand containers is a few MiB).
pub const MAX_BODY: usize = 32 << 20;

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
}

impl HttpError {
    /// True when the engine said the object does not exist (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, HttpError::Status { status: 404, .. })
    }
}

/// A response whose head has been read; the body is read through [`Response::body`].
pub struct Response {
    pub status: u16,
    body: Body,
}

enum Body {
    Length(io::Take<BufReader<UnixStream>>),
    Chunked(Chunked<BufReader<UnixStream>>),
    Close(BufReader<UnixStream>),
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
}

/// Sends `GET target` on the socket at `sock` and reads the response head. `timeout`
/// bounds the connection, the request and every later read on the stream (None: reads
/// of the body may wait for ever, as a stream of events does).
pub fn get(
    sock: &Path,
    target: &str,
    timeout: Duration,
    body_timeout: Option<Duration>,
) -> Result<Response, HttpError> {
    let io_err = |source| HttpError::Io {
        path: sock.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(sock).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: docker\r\nUser-Agent: oomwake\r\nConnection: close\r\n\r\n"
    );
    (&stream)
        .write_all(req.as_bytes())
        .map_err(|e| timed(sock, e, timeout))?;
    let mut r = BufReader::new(stream);
    let deadline = Instant::now() + timeout;
    let mut head = Vec::with_capacity(1024);
    // Up to the empty line that ends the head.
    loop {
        let before = head.len();
        let n = r
            .read_until(b'\n', &mut head)
            .map_err(|e| timed(sock, e, timeout))?;
        if n == 0 {
            return Err(bad(sock, "connection closed in the response head"));
        }
        if head[before..] == *b"\r\n" || head[before..] == *b"\n" {
            break;
        }
        if head.len() > MAX_HEAD {
            return Err(bad(sock, "response head too large"));
        }
        if Instant::now() > deadline {
            return Err(HttpError::Timeout {
                path: sock.to_path_buf(),
                after: timeout,
            });
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
    r.get_ref().set_read_timeout(body_timeout).map_err(io_err)?;
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
    Ok(Response { status, body })
}

/// `GET target`, the whole body read within `timeout` (at most [`MAX_BODY`] bytes).
pub fn get_body(sock: &Path, target: &str, timeout: Duration) -> Result<Vec<u8>, HttpError> {
    let deadline = Instant::now() + timeout;
    let mut resp = get(sock, target, timeout, Some(timeout))?;
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
        body.extend_from_slice(&buf[..n]);
        if body.len() > MAX_BODY {
            return Err(bad(sock, "response body too large"));
        }
        if Instant::now() > deadline {
            return Err(HttpError::Timeout {
                path: sock.to_path_buf(),
                after: timeout,
            });
        }
    }
}

fn bad(sock: &Path, what: &str) -> HttpError {
    HttpError::Bad {
        path: sock.to_path_buf(),
        what: what.to_string(),
    }
}

fn timed(sock: &Path, e: io::Error, after: Duration) -> HttpError {
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
        let n = (&mut self.inner).take(1024).read_until(b'\n', &mut line)?;
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
        u64::from_str_radix(hex, 16).map_err(|_| invalid(&format!("chunk size {hex:?}")))
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
                    // Trailers, up to the empty line.
                    loop {
                        let mut line = Vec::new();
                        let got = (&mut self.inner).take(8192).read_until(b'\n', &mut line)?;
                        if got == 0 || line == b"\r\n" || line == b"\n" {
                            break;
                        }
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
        assert_eq!(get_body(&p, "/x", Duration::from_secs(5)).unwrap(), b"[]");
        let (_d, p) =
            serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
        assert_eq!(get_body(&p, "/x", Duration::from_secs(5)).unwrap(), b"{}");
        let (_d, p) = serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        let e = get_body(&p, "/containers/x/json", Duration::from_secs(5)).unwrap_err();
        assert!(e.is_not_found(), "{e}");
    }

    #[test]
    fn a_silent_engine_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // Accepts (the backlog does) and never answers.
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = Instant::now();
        let e = get_body(&path, "/x", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn no_engine_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = get_body(&dir.path().join("none"), "/x", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, HttpError::Io { .. }), "{e}");
    }
}
