//! A minimal blocking HTTP/1.1 client over a Unix socket: one request per connection
//! (`Connection: close`), short timeouts, bounded answers. Enough for the scheduler's JSON API.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::ReporterError;

/// The largest answer read (head and body).
const MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// An answer.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, transfer coding removed.
    pub body: Vec<u8>,
}

/// Sends one request and reads the whole answer. `on_connected` runs once the connection is
/// made, before anything is written.
pub fn request(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    timeout: Duration,
    on_connected: impl FnOnce(),
) -> Result<Response, ReporterError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ReporterError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    on_connected();
    let io = |source| ReporterError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nHost: vgpu-scheduler\r\nConnection: close\r\n");
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body.unwrap_or_default()).map_err(io)?;
    stream.flush().map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(io)?;
    if raw.len() as u64 > MAX_RESPONSE_BYTES {
        return Err(ReporterError::Malformed(format!(
            "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
        )));
    }
    parse(&raw).map_err(ReporterError::Malformed)
}

/// Parses a whole HTTP/1.1 answer read until the server closed the connection (`Connection:
/// close`): status, and a body delimited by chunked coding, `Content-Length` or the close.
pub fn parse(raw: &[u8]) -> Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the connection closed before a complete HTTP head came")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "the HTTP head is not UTF-8")?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| format!("bad Content-Length {length:?}"))?;
        rest.get(..length)
            .ok_or("the connection closed before the whole body came")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line is cut off")?;
        let line = std::str::from_utf8(&rest[..end]).map_err(|_| "a chunk size is not UTF-8")?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
        rest = &rest[end + 2..];
        if n == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..n).ok_or("a chunk is cut off")?;
        out.extend_from_slice(chunk);
        rest = rest.get(n + 2..).ok_or("a chunk is cut off")?;
    }
}

/// Percent-encodes a query-string value (everything but RFC 3986 unreserved characters).
pub(crate) fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_and_chunked_bodies_are_read() {
        let r = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhixx").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, b"hi".as_slice()));
        let r = parse(b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (409, b"abcd".as_slice()));
    }

    #[test]
    fn cut_off_answers_are_malformed() {
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab").is_err());
        assert!(parse(b"SMTP 200\r\n\r\n").is_err());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode_query_value("lc-42_1.x~"), "lc-42_1.x~");
        assert_eq!(encode_query_value("a b&c=+"), "a%20b%26c%3D%2B");
    }
}
