//! A minimal HTTP/1.1 client over a Unix socket: what cloud-hypervisor's REST API needs.
//!
//! One request per connection. The response body is delimited by `Content-Length` or by chunked
//! transfer coding, and is empty for 204 and 304; only a response with neither is read until the
//! server closes. cloud-hypervisor's server (micro_http) keeps connections alive and never closes
//! after a response, so a client that waited for end-of-file would hang; this one never does for
//! a well-formed response, and every read is bounded by a timeout.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a request may take by default (cloud-hypervisor answers a hotplug once the device
/// has been realized, which includes the whole vhost-user handshake with the backend).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest response head accepted (status line and headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The largest response body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Errors from [`UnixHttpClient`].
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The socket could not be connected to (missing, refused, no permission).
    #[error("Cannot connect to {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No (complete) answer within the timeout.
    #[error("No answer from {} within {timeout:?}", path.display())]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// Reading or writing the connection failed.
    #[error("Connection to {} failed: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server's answer is not valid HTTP/1.1.
    #[error("Malformed HTTP response from {}: {reason}", path.display())]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A complete HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase (may be empty: micro_http sends none).
    pub reason: String,
    /// Header fields in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, transfer coding removed.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 client for one Unix socket.
#[derive(Debug, Clone)]
pub struct UnixHttpClient {
    socket: PathBuf,
    timeout: Duration,
}

impl UnixHttpClient {
    /// A client for `socket`, with [`DEFAULT_TIMEOUT`].
    pub fn new(socket: impl Into<PathBuf>) -> UnixHttpClient {
        UnixHttpClient {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another timeout for each read and write (zero: none).
    pub fn with_timeout(mut self, timeout: Duration) -> UnixHttpClient {
        self.timeout = timeout;
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `method target` with an optional JSON body on a new connection and reads the answer.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        json_body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let stream = UnixStream::connect(&self.socket).map_err(|source| HttpError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        let timeout = (!self.timeout.is_zero()).then_some(self.timeout);
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .map_err(|e| self.io_error(e))?;

        let mut writer = &stream;
        writer
            .write_all(&encode_request(method, target, json_body))
            .and_then(|()| writer.flush())
            .map_err(|e| self.io_error(e))?;

        let mut reader = BufReader::new(&stream);
        read_response(&mut reader, method.eq_ignore_ascii_case("HEAD")).map_err(|e| match e {
            ReadError::Io(e) => self.io_error(e),
            ReadError::Malformed(reason) => HttpError::Malformed {
                path: self.socket.clone(),
                reason,
            },
        })
    }

    fn io_error(&self, source: io::Error) -> HttpError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::Timeout {
                path: self.socket.clone(),
                timeout: self.timeout,
            },
            _ => HttpError::Io {
                path: self.socket.clone(),
                source,
            },
        }
    }
}

/// The request bytes. `Accept: */*` as cloud-hypervisor's own `ch-remote` sends it (micro_http
/// ignores header fields it does not know, such as `Host` and `Connection`).
fn encode_request(method: &str, target: &str, json_body: Option<&[u8]>) -> Vec<u8> {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n"
    );
    if let Some(body) = json_body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(json_body.unwrap_or_default());
    bytes
}

#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Malformed(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

fn malformed<T>(reason: impl Into<String>) -> Result<T, ReadError> {
    Err(ReadError::Malformed(reason.into()))
}

/// Reads one response (skipping interim 1xx ones) from `reader`.
fn read_response(reader: &mut impl BufRead, head_request: bool) -> Result<Response, ReadError> {
    let mut head_budget = MAX_HEAD_BYTES;
    loop {
        let (status, reason, headers) = read_head(reader, &mut head_budget)?;
        match status {
            101 => return malformed("the server switched protocols"),
            100..=199 => continue,
            _ => {}
        }
        let mut response = Response {
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        if !(head_request || status == 204 || status == 304) {
            response.body = read_body(reader, &response)?;
        }
        return Ok(response);
    }
}

/// One line without its line ending; `None` at end of file before any byte.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>, ReadError> {
    let mut line = Vec::new();
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX).saturating_add(1);
    let n = reader.by_ref().take(limit).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return malformed(format!(
            "the response head is larger than {MAX_HEAD_BYTES} bytes"
        ));
    }
    *budget -= n;
    if line.pop() != Some(b'\n') {
        return malformed("the connection closed in the middle of a line");
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .or_else(|_| malformed("a line of the response head is not UTF-8"))
}

type Head = (u16, String, Vec<(String, String)>);

fn read_head(reader: &mut impl BufRead, budget: &mut usize) -> Result<Head, ReadError> {
    let Some(status_line) = read_line(reader, budget)? else {
        return malformed("the connection closed without an answer");
    };
    let (version, rest) = status_line.split_once(' ').unwrap_or((&status_line, ""));
    if !version.starts_with("HTTP/1.") {
        return malformed(format!("bad status line {status_line:?}"));
    }
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = match code.parse::<u16>() {
        Ok(s) if code.len() == 3 && (100..600).contains(&s) => s,
        _ => return malformed(format!("bad status line {status_line:?}")),
    };

    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(reader, budget)? else {
            return malformed("the connection closed in the middle of the headers");
        };
        if line.is_empty() {
            return Ok((status, reason.trim().to_owned(), headers));
        }
        if line.starts_with([' ', '\t']) {
            return malformed("folded header lines are not supported");
        }
        let Some((name, value)) = line.split_once(':') else {
            return malformed(format!("bad header line {line:?}"));
        };
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return malformed(format!("bad header name {name:?}"));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
}

fn read_body(reader: &mut impl BufRead, response: &Response) -> Result<Vec<u8>, ReadError> {
    if let Some(codings) = response.header("Transfer-Encoding") {
        let last = codings.rsplit(',').next().unwrap_or("").trim();
        if last.eq_ignore_ascii_case("chunked") {
            return read_chunked(reader);
        }
        // Not chunked last: the body runs until the server closes (RFC 9112, section 6.3).
        return read_to_close(reader);
    }
    let lengths: Vec<&str> = response
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .collect();
    let Some(first) = lengths.first() else {
        return read_to_close(reader);
    };
    if lengths.iter().any(|l| l != first) {
        return malformed(format!("conflicting Content-Length values {lengths:?}"));
    }
    let length = match first.parse::<usize>() {
        Ok(n) if first.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => return malformed(format!("bad Content-Length {first:?}")),
    };
    read_exact_body(reader, length, Vec::new())
}

fn read_exact_body(
    reader: &mut impl Read,
    length: usize,
    mut body: Vec<u8>,
) -> Result<Vec<u8>, ReadError> {
    let total = body.len().saturating_add(length);
    if total > MAX_BODY_BYTES {
        return malformed(format!("the body is larger than {MAX_BODY_BYTES} bytes"));
    }
    let start = body.len();
    body.resize(total, 0);
    let mut filled = start;
    while filled < total {
        match reader.read(&mut body[filled..]) {
            Ok(0) => {
                return malformed(format!(
                    "the body ended after {} of {length} bytes",
                    filled - start
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(body)
}

fn read_to_close(reader: &mut impl Read) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    let limit = u64::try_from(MAX_BODY_BYTES).unwrap_or(u64::MAX) + 1;
    reader.take(limit).read_to_end(&mut body)?;
    if body.len() > MAX_BODY_BYTES {
        return malformed(format!("the body is larger than {MAX_BODY_BYTES} bytes"));
    }
    Ok(body)
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, ReadError> {
    // Chunk-size lines and trailers get their own budget, like a head.
    let mut budget = MAX_HEAD_BYTES;
    let mut body = Vec::new();
    loop {
        let Some(line) = read_line(reader, &mut budget)? else {
            return malformed("the connection closed before the last chunk");
        };
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = match usize::from_str_radix(size_text, 16) {
            Ok(n) if !size_text.starts_with('+') => n,
            _ => return malformed(format!("bad chunk size line {line:?}")),
        };
        if size == 0 {
            // Trailer fields, ignored, up to the empty line.
            loop {
                match read_line(reader, &mut budget)? {
                    None => return malformed("the connection closed in the chunked trailer"),
                    Some(l) if l.is_empty() => return Ok(body),
                    Some(_) => {}
                }
            }
        }
        body = read_exact_body(reader, size, body)?;
        match read_line(reader, &mut budget)? {
            Some(l) if l.is_empty() => {}
            _ => return malformed("a chunk is not followed by a line ending"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(bytes: &[u8]) -> Result<Response, ReadError> {
        read_response(&mut Cursor::new(bytes.to_vec()), false)
    }

    fn reason_of(result: Result<Response, ReadError>) -> String {
        match result {
            Err(ReadError::Malformed(reason)) => reason,
            other => panic!("expected a malformed response, got {other:?}"),
        }
    }

    #[test]
    fn request_carries_method_target_and_json_body_with_its_length() {
        let bytes = encode_request("PUT", "/api/v1/vm.remove-device", Some(br#"{"id":"a"}"#));
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "PUT /api/v1/vm.remove-device HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
             Connection: close\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n\
             {\"id\":\"a\"}"
        );
        let bytes = encode_request("GET", "/api/v1/vm.info", None);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn content_length_delimits_the_body_without_waiting_for_close() {
        // micro_http's style: empty reason phrase, keep-alive; bytes after the body are not read.
        let r = parse(
            b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\
              Content-Type: application/json\r\nContent-Length: 5\r\n\r\nhelloEXTRA",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.reason, "");
        assert_eq!(r.body, b"hello");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.is_success());
    }

    #[test]
    fn no_content_has_an_empty_body_even_without_a_length() {
        let r = parse(b"HTTP/1.1 204 \r\nConnection: keep-alive\r\n\r\nNOT-A-BODY").unwrap();
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
    }

    #[test]
    fn head_responses_have_no_body() {
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec();
        let r = read_response(&mut Cursor::new(bytes), true).unwrap();
        assert!(r.body.is_empty());
    }

    #[test]
    fn chunked_bodies_are_reassembled_and_trailers_skipped() {
        let r = parse(
            b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\n[\"Er\r\nA;ext=1\r\nror adding\r\n2\r\n\"]\r\n0\r\nX-Trailer: 1\r\n\r\nEXTRA",
        )
        .unwrap();
        assert_eq!(r.status, 500);
        assert_eq!(r.reason, "Internal Server Error");
        assert_eq!(r.body_text(), r#"["Error adding"]"#);
        assert!(!r.is_success());
    }

    #[test]
    fn body_without_length_runs_to_close() {
        let r = parse(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(r.body, b"all of it");
    }

    #[test]
    fn interim_continue_responses_are_skipped() {
        let r = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 \r\n\r\n").unwrap();
        assert_eq!(r.status, 204);
    }

    #[test]
    fn bare_line_feeds_are_accepted() {
        let r = parse(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok").unwrap();
        assert_eq!(r.body, b"ok");
    }

    #[test]
    fn truncated_bodies_are_malformed() {
        let reason = reason_of(parse(b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\nshort"));
        assert!(reason.contains("5 of 10"), "{reason}");
        let reason = reason_of(parse(
            b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        ));
        assert!(reason.contains("2 of 5"), "{reason}");
    }

    #[test]
    fn broken_heads_are_malformed() {
        assert!(reason_of(parse(b"")).contains("without an answer"));
        assert!(reason_of(parse(b"SSH-2.0-OpenSSH\r\n\r\n")).contains("status line"));
        assert!(reason_of(parse(b"HTTP/1.1 2000 \r\n\r\n")).contains("status line"));
        assert!(reason_of(parse(b"HTTP/1.1 200 \r\nContent-Length: 1")).contains("closed"));
        assert!(reason_of(parse(b"HTTP/1.1 200 \r\nno colon\r\n\r\n")).contains("header line"));
        assert!(reason_of(parse(b"HTTP/1.1 200 \r\nA: 1\r\n folded\r\n\r\n")).contains("folded"));
        assert!(reason_of(parse(
            b"HTTP/1.1 200 \r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
        ))
        .contains("conflicting"));
        assert!(reason_of(parse(b"HTTP/1.1 200 \r\nContent-Length: -1\r\n\r\n")).contains("bad"));
        assert!(reason_of(parse(
            b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        ))
        .contains("chunk size"));
        assert!(reason_of(parse(b"HTTP/1.1 101 Switching\r\n\r\n")).contains("switched"));
    }

    #[test]
    fn oversized_heads_and_bodies_are_refused() {
        let mut huge_head = b"HTTP/1.1 200 \r\nX: ".to_vec();
        huge_head.resize(MAX_HEAD_BYTES + 10, b'a');
        huge_head.extend_from_slice(b"\r\n\r\n");
        assert!(reason_of(parse(&huge_head)).contains("head is larger"));
        let reason = reason_of(parse(
            format!(
                "HTTP/1.1 200 \r\nContent-Length: {}\r\n\r\n",
                MAX_BODY_BYTES + 1
            )
            .as_bytes(),
        ));
        assert!(reason.contains("body is larger"), "{reason}");
    }
}
