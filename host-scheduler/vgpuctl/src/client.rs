//! Talking to the scheduler: over its Unix API socket (the usual way) or over TCP (`http://`).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use vgpu_vmm::http::{HttpError, UnixHttpClient, MAX_BODY_BYTES};

use crate::api::{ApiRequest, ErrorBody};

/// Where the scheduler listens when neither `--scheduler` nor `VGPU_SCHEDULER` says otherwise.
pub const DEFAULT_SCHEDULER: &str = "/var/lib/vgpu/api.sock";

/// The environment variable that names the scheduler.
pub const SCHEDULER_ENV: &str = "VGPU_SCHEDULER";

/// How long one request may take (attach starts a backend).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens where the scheduler should.
    #[error("Cannot reach the vgpu scheduler at {endpoint} ({reason}); {hint}")]
    Unreachable {
        /// Where vgpuctl looked.
        endpoint: Endpoint,
        /// Why it failed.
        reason: String,
        /// How to start it or point vgpuctl elsewhere.
        hint: String,
    },
    /// The scheduler refused the request: its own message.
    #[error("{0}")]
    Api(String),
    /// An error status without the usual `{"error": ...}` body.
    #[error("The scheduler answered {method} {path} with HTTP {status}: {body}")]
    Status {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// The status code.
        status: u16,
        /// The body as text.
        body: String,
    },
    /// A success answer that is not the JSON expected.
    #[error("The scheduler's answer to {method} {path} is not the expected JSON: {source}")]
    BadJson {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The connection failed after it was made, or the answer is not HTTP.
    #[error("Talking to the vgpu scheduler at {endpoint} failed: {reason}")]
    Transport {
        /// The scheduler.
        endpoint: Endpoint,
        /// What went wrong.
        reason: String,
    },
    /// `--scheduler` names something vgpuctl cannot talk to.
    #[error(
        "Scheduler address {0:?} is neither a Unix socket path nor an http://HOST:PORT address"
    )]
    BadEndpoint(String),
}

/// Where the scheduler's API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Its Unix socket (`$STATE_DIR/api.sock`).
    Unix(PathBuf),
    /// Its optional TCP listener, as `host:port`.
    Tcp(String),
}

impl Endpoint {
    /// Parses `--scheduler`: `http://HOST:PORT[/]`, `unix:PATH` or a socket path.
    pub fn parse(text: &str) -> Result<Endpoint, ClientError> {
        if let Some(rest) = text.strip_prefix("http://") {
            let authority = rest.strip_suffix('/').unwrap_or(rest);
            let valid = !authority.is_empty()
                && !authority.contains(['/', '?', '#', '@', ' '])
                && authority
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            return if valid {
                Ok(Endpoint::Tcp(authority.to_owned()))
            } else {
                Err(ClientError::BadEndpoint(text.to_owned()))
            };
        }
        let path = text.strip_prefix("unix:").unwrap_or(text);
        if path.is_empty() || path.contains("://") {
            return Err(ClientError::BadEndpoint(text.to_owned()));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }

    /// `--scheduler` if given, else `$VGPU_SCHEDULER` if set and not empty, else the default.
    pub fn resolve(flag: Option<&str>, env: Option<&str>) -> Result<Endpoint, ClientError> {
        let text = flag
            .or(env.filter(|e| !e.is_empty()))
            .unwrap_or(DEFAULT_SCHEDULER);
        Endpoint::parse(text)
    }

    /// What to tell a user whose scheduler is not there.
    fn start_hint(&self) -> String {
        let how = match self {
            Endpoint::Unix(path) => {
                let state_dir = (path.file_name() == Some("api.sock".as_ref()))
                    .then(|| path.parent())
                    .flatten()
                    .filter(|dir| !dir.as_os_str().is_empty());
                match state_dir {
                    Some(dir) => {
                        format!(
                            "start it with `vgpu-scheduler --state-dir {}`",
                            dir.display()
                        )
                    }
                    None => "start it with `vgpu-scheduler --state-dir DIR` (its API socket is \
                             DIR/api.sock)"
                        .to_owned(),
                }
            }
            Endpoint::Tcp(addr) => {
                format!("start it with `vgpu-scheduler --listen-tcp {addr}`")
            }
        };
        format!(
            "{how}, or point vgpuctl at a running scheduler with --scheduler PATH_OR_URL or \
             {SCHEDULER_ENV}"
        )
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "http://{addr}"),
        }
    }
}

/// An answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// A client of one scheduler.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    timeout: Duration,
}

impl Client {
    /// A client of the scheduler at `endpoint`.
    pub fn new(endpoint: Endpoint) -> Client {
        Client {
            endpoint,
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// The scheduler this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends `request`; a 2xx answer is returned, any other becomes an error carrying the
    /// scheduler's message.
    pub fn send(&self, request: &ApiRequest) -> Result<ApiResponse, ClientError> {
        let body = request.body.as_ref().map(|b| b.to_string().into_bytes());
        tracing::debug!(method = request.method, path = %request.path, "scheduler request");
        let response = match &self.endpoint {
            Endpoint::Unix(path) => UnixHttpClient::new(path)
                .with_timeout(self.timeout)
                .request(request.method, &request.path, body.as_deref())
                .map(|r| ApiResponse {
                    status: r.status,
                    body: r.body,
                })
                .map_err(|e| self.unix_error(e))?,
            Endpoint::Tcp(addr) => tcp_request(addr, self.timeout, request, body.as_deref())
                .map_err(|e| e.into_client(self))?,
        };
        if (200..300).contains(&response.status) {
            return Ok(response);
        }
        Err(match serde_json::from_slice::<ErrorBody>(&response.body) {
            Ok(e) => ClientError::Api(e.error),
            Err(_) => ClientError::Status {
                method: request.method,
                path: request.path.clone(),
                status: response.status,
                body: String::from_utf8_lossy(&response.body).trim().to_owned(),
            },
        })
    }

    /// Sends `request` and parses the answer as `T`.
    pub fn send_json<T: DeserializeOwned>(&self, request: &ApiRequest) -> Result<T, ClientError> {
        let response = self.send(request)?;
        serde_json::from_slice(&response.body).map_err(|source| ClientError::BadJson {
            method: request.method,
            path: request.path.clone(),
            source,
        })
    }

    fn unreachable(&self, reason: String) -> ClientError {
        ClientError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason,
            hint: self.endpoint.start_hint(),
        }
    }

    fn unix_error(&self, error: HttpError) -> ClientError {
        match error {
            HttpError::Connect { source, .. } => self.unreachable(source.to_string()),
            other => ClientError::Transport {
                endpoint: self.endpoint.clone(),
                reason: other.to_string(),
            },
        }
    }
}

enum TcpError {
    Connect(io::Error),
    Other(String),
}

impl TcpError {
    fn into_client(self, client: &Client) -> ClientError {
        match self {
            TcpError::Connect(e) => client.unreachable(e.to_string()),
            TcpError::Other(reason) => ClientError::Transport {
                endpoint: client.endpoint.clone(),
                reason,
            },
        }
    }
}

/// One request on a new TCP connection with `Connection: close`; the answer is read to the end.
fn tcp_request(
    addr: &str,
    timeout: Duration,
    request: &ApiRequest,
    body: Option<&[u8]>,
) -> Result<ApiResponse, TcpError> {
    let mut stream = TcpStream::connect(addr).map_err(TcpError::Connect)?;
    let io = |e: io::Error| TcpError::Other(e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n",
        request.method, request.path
    );
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body.unwrap_or_default()).map_err(io)?;
    let mut raw = Vec::new();
    let limit = u64::try_from(MAX_BODY_BYTES).unwrap_or(u64::MAX) * 2;
    stream.take(limit).read_to_end(&mut raw).map_err(io)?;
    parse_response(&raw).map_err(TcpError::Other)
}

/// Parses a whole HTTP/1.1 answer read until the server closed (the reporter's parser: the
/// scheduler's API answers both alike).
fn parse_response(raw: &[u8]) -> Result<ApiResponse, String> {
    let answer = vgpu_ledger::reporter::http::parse(raw)?;
    Ok(ApiResponse {
        status: answer.status,
        body: answer.body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_as_unix_paths_or_http_addresses() {
        assert_eq!(
            Endpoint::parse("/var/lib/vgpu/api.sock").unwrap(),
            Endpoint::Unix(PathBuf::from("/var/lib/vgpu/api.sock"))
        );
        assert_eq!(
            Endpoint::parse("unix:/tmp/a.sock").unwrap(),
            Endpoint::Unix(PathBuf::from("/tmp/a.sock"))
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:7070/").unwrap(),
            Endpoint::Tcp("127.0.0.1:7070".to_owned())
        );
        assert_eq!(
            Endpoint::parse("http://[::1]:7070").unwrap().to_string(),
            "http://[::1]:7070"
        );
        for bad in [
            "",
            "https://x:1",
            "http://host",
            "http://:80",
            "http://h:1/v1",
            "unix:",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(ClientError::BadEndpoint(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_flag_wins_over_the_environment_which_wins_over_the_default() {
        let unix = |p: &str| Endpoint::Unix(PathBuf::from(p));
        assert_eq!(
            Endpoint::resolve(Some("/a.sock"), Some("/b.sock")).unwrap(),
            unix("/a.sock")
        );
        assert_eq!(
            Endpoint::resolve(None, Some("/b.sock")).unwrap(),
            unix("/b.sock")
        );
        assert_eq!(
            Endpoint::resolve(None, Some("")).unwrap(),
            unix(DEFAULT_SCHEDULER)
        );
        assert_eq!(
            Endpoint::resolve(None, None).unwrap(),
            unix(DEFAULT_SCHEDULER)
        );
    }

    #[test]
    fn the_start_hint_names_the_state_dir_of_the_socket() {
        let hint = Endpoint::Unix(PathBuf::from("/srv/vgpu/api.sock")).start_hint();
        assert!(
            hint.starts_with("start it with `vgpu-scheduler --state-dir /srv/vgpu`"),
            "{hint}"
        );
        let hint = Endpoint::Unix(PathBuf::from("/tmp/other.sock")).start_hint();
        assert!(hint.contains("--state-dir DIR"), "{hint}");
        assert!(hint.contains("VGPU_SCHEDULER"), "{hint}");
    }

    #[test]
    fn tcp_requests_send_the_body_and_read_the_answer() {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(&stream);
            let mut head = Vec::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                head.push(std::mem::take(&mut line));
            }
            let mut body = [0u8; 12];
            reader.read_exact(&mut body).unwrap();
            (&stream)
                .write_all(
                    b"HTTP/1.1 409 Conflict\r\ncontent-length: 18\r\n\r\n{\"error\":\"Taken.\"}",
                )
                .unwrap();
            (head, body)
        });
        let client = Client::new(Endpoint::parse(&format!("http://{addr}")).unwrap());
        let request =
            ApiRequest::with_body("PATCH", "/v1/slices/a", serde_json::json!({"weight": 2}));
        let err = client.send(&request).unwrap_err();
        assert_eq!(err.to_string(), "Taken.");
        let (head, body) = server.join().unwrap();
        assert_eq!(head[0], "PATCH /v1/slices/a HTTP/1.1\r\n");
        assert!(
            head.contains(&"Content-Length: 12\r\n".to_owned()),
            "{head:?}"
        );
        assert_eq!(&body, b"{\"weight\":2}");
    }

    #[test]
    fn an_unreachable_tcp_scheduler_says_how_to_start_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let client = Client::new(Endpoint::Tcp(addr.clone()));
        let err = client
            .send(&ApiRequest::new("GET", "/v1/util"))
            .unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("`vgpu-scheduler --listen-tcp {addr}`")),
            "{err}"
        );
    }

    #[test]
    fn whole_answers_parse_by_length_chunks_or_close() {
        let by_length =
            parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}xx").unwrap();
        assert_eq!(
            by_length,
            ApiResponse {
                status: 201,
                body: b"{}".to_vec()
            }
        );
        let chunked = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2;x=y\r\n2]\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(chunked.body, b"[1,2]");
        let to_close = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!(
            to_close,
            ApiResponse {
                status: 204,
                body: Vec::new()
            }
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}").is_err());
    }
}
