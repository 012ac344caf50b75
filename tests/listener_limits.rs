#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The proxy listener's limits against real `flex up --demo` processes on free ports, over raw
//! sockets: a slowloris head, a silent connection, a stalled HTTP/2 preface and an idle
//! keep-alive connection are closed by `--header-read-timeout-secs` / `--idle-timeout-secs`
//! (and a request in flight longer than both is not); a silent TLS connection by
//! `--tls-handshake-timeout-secs`; 5,000 idle connections leave the proxy serving; at
//! `--max-connections` the listener waits for a connection to close; an unauthenticated 32 MiB
//! upload gets its 401 before the rest of its body is sent; a `Content-Length` over
//! `--max-body-mib` gets 413 with nothing read; a stalled body gets 408; HTTP/2 advertises
//! `--http2-max-concurrent-streams`.
//!
//! Time is only bounded from above, generously: "closed within the timeout plus 10 s", never
//! "not before". The 5,000 idle connections need 5,000 open files in this process and 5,000 in
//! the proxy (a child, with the same limit): the test reads its soft `RLIMIT_NOFILE` from
//! /proc/self/limits and opens fewer, saying so, when the limit is lower.

#[path = "common/infra.rs"]
mod infra;

use std::time::{Duration, Instant};

use infra::{free_port, request, FlexUp};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `flex up --demo` with `args`, its metrics on a free port.
struct Up {
    up: FlexUp,
    key: String,
    metrics: String,
}

impl Up {
    async fn start(args: &[&str]) -> Self {
        let metrics_port = free_port();
        let metrics_listen = format!("127.0.0.1:{metrics_port}");
        let mut all = vec!["--demo", "--metrics-listen", &metrics_listen];
        all.extend_from_slice(args);
        let up = FlexUp::start(&all, |_| {});
        let demo = up
            .wait_for_file_async("demo.json", Duration::from_secs(60))
            .await;
        let demo: Value = serde_json::from_slice(&std::fs::read(demo).unwrap()).unwrap();
        Self {
            key: demo["api_key"].as_str().unwrap().to_string(),
            metrics: format!("http://{metrics_listen}/metrics"),
            up,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.up.api)
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr()).await.unwrap()
    }

    /// A real request through the proxy (the simulator answers at once): 200.
    async fn serves(&self) {
        let (status, body) = request(
            http::Method::POST,
            &format!("http://{}/v1/responses", self.addr()),
            Some(&self.key),
            Some(
                json!({"model": "gpt-5.5", "input": "hi #sim flex_delay_ms=0",
                        "start_within": "00h-00m-10s"}),
            ),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    /// The value of one sample of the metrics exposition (`name{labels}` as written), 0 if absent.
    async fn metric(&self, sample: &str) -> f64 {
        let (status, text) = request(http::Method::GET, &self.metrics, None, None)
            .await
            .unwrap();
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

/// Reads until the peer closes (EOF or a reset) or `within` passes: what arrived, and whether
/// it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = within.checked_sub(t0.elapsed()) {
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (got, false)
}

/// Writes `bytes` one a second, until the peer closes the connection (a read sees EOF or a
/// reset, or a write fails) or `within` passes: how many were written, and whether it closed.
async fn trickle(stream: &mut TcpStream, bytes: &[u8], within: Duration) -> (usize, bool) {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    for (i, b) in bytes.iter().enumerate() {
        if t0.elapsed() > within {
            return (i, false);
        }
        if stream.write_all(&[*b]).await.is_err() {
            return (i, true);
        }
        // Wait a second for the close (anything else read, e.g. an error response, is ignored).
        let tick = Instant::now();
        while let Some(left) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            match tokio::time::timeout(left, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (i + 1, true),
                Ok(Ok(_)) => {}
                Err(_) => break,
            }
        }
    }
    (bytes.len(), false)
}

/// One HTTP/1.1 response read off a raw socket: status, head, body (by its Content-Length).
async fn read_response(stream: &mut TcpStream, within: Duration) -> (u16, String, Vec<u8>) {
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                return (status, head, got[end + 4..end + 4 + len].to_vec());
            }
        }
        let left = within.checked_sub(t0.elapsed()).unwrap_or_else(|| {
            panic!(
                "no whole response within {within:?}; got {:?}",
                String::from_utf8_lossy(&got)
            )
        });
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!(
                "the connection closed before a whole response; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
}

const POST_HEAD: &[u8] = b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_silent_and_idle_connections_are_closed() {
    let up = Up::start(&[
        "--header-read-timeout-secs",
        "2",
        "--idle-timeout-secs",
        "3",
    ])
    .await;
    let bound = Duration::from_secs(2 + 10);

    // Slowloris: one byte of the head a second; closed long before the head is whole.
    let slowloris = async {
        let mut s = up.connect().await;
        let (sent, closed) = trickle(&mut s, POST_HEAD, bound).await;
        assert!(
            closed,
            "a head sent a byte a second was not closed within {bound:?}"
        );
        assert!(sent < POST_HEAD.len(), "the whole head went through");
    };
    // A stalled HTTP/2 preface: hyper's HTTP/1.1 timer does not run yet; the first-request
    // deadline closes it.
    let preface = async {
        let mut s = up.connect().await;
        let (sent, closed) = trickle(&mut s, H2_PREFACE, bound).await;
        assert!(
            closed,
            "an HTTP/2 preface a byte a second was not closed within {bound:?}"
        );
        assert!(sent < H2_PREFACE.len(), "the whole preface went through");
    };
    // A connection that sends nothing.
    let silent = async {
        let mut s = up.connect().await;
        let (got, closed) = read_until_closed(&mut s, bound).await;
        assert!(
            closed,
            "a silent connection was not closed within {bound:?}"
        );
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    };
    // An idle keep-alive connection after one request.
    let idle = async {
        let mut s = up.connect().await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let (status, _, body) = read_response(&mut s, Duration::from_secs(10)).await;
        assert_eq!((status, body.as_slice()), (200, b"ok".as_slice()));
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(3 + 10)).await;
        assert!(closed, "an idle keep-alive connection stayed open");
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    };
    // Meanwhile the proxy serves.
    let serving = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        up.serves().await;
    };
    // A request in flight is never idle: a race whose flex starts after 4 s, longer than both
    // timeouts, with not a byte sent before.
    let in_flight = async {
        let (status, body) = request(
            http::Method::POST,
            &format!("http://{}/v1/responses", up.addr()),
            Some(&up.key),
            Some(
                json!({"model": "gpt-5.5", "input": "hi #sim flex_delay_ms=4000",
                        "start_within": "00h-00m-30s"}),
            ),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
    };
    tokio::join!(slowloris, preface, silent, idle, serving, in_flight);
    assert!(
        up.metric(r#"flex_listener_timeouts_total{kind="header_read"}"#)
            .await
            >= 3.0
    );
    assert!(up.metric("flex_listener_connections_accepted_total").await >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_connection_is_closed_after_the_handshake_timeout() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = infra::Pki::new(pki_dir.path(), "listener");
    let (cert, key) = pki.server("api");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let up = Up::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-handshake-timeout-secs",
        "2",
        "--header-read-timeout-secs",
        "300",
    ])
    .await;
    let mut s = up.connect().await;
    let bound = Duration::from_secs(2 + 10);
    let (got, closed) = read_until_closed(&mut s, bound).await;
    assert!(
        closed,
        "a silent TLS connection was not closed within {bound:?}"
    );
    assert!(got.is_empty());
    assert_eq!(
        up.metric(r#"flex_listener_timeouts_total{kind="tls_handshake"}"#)
            .await,
        1.0
    );
}

/// The soft limit of open files of this process.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_leave_the_proxy_serving() {
    // Long timeouts, so the idle connections stay for the whole test; the default cap (10,000).
    let up = Up::start(&[
        "--header-read-timeout-secs",
        "300",
        "--idle-timeout-secs",
        "300",
    ])
    .await;
    // Room for the other tests of this binary, the proxy's own files and its requests.
    let want = 5_000u64;
    let n = want.min(open_files_limit().saturating_sub(500)) as usize;
    if (n as u64) < want {
        eprintln!(
            "RLIMIT_NOFILE is {}: opening {n} idle connections instead of {want}",
            open_files_limit()
        );
    }
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(up.connect().await);
    }
    // The proxy accepted them all and holds them open.
    let t0 = Instant::now();
    while up.metric("flex_listener_connections").await < n as f64 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the proxy holds {} of {n} connections",
            up.metric("flex_listener_connections").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And serves others meanwhile.
    up.serves().await;
    let (status, text) = request(
        http::Method::GET,
        &format!("http://{}/readyz", up.addr()),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    // None of the idle ones was closed.
    let mut buf = [0u8; 1];
    for s in idle.iter_mut().step_by(97) {
        assert!(
            tokio::time::timeout(Duration::from_millis(10), s.read(&mut buf))
                .await
                .is_err(),
            "an idle connection was closed or answered"
        );
    }
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_listener_waits_for_one_to_close() {
    let up = Up::start(&[
        "--max-connections",
        "20",
        "--header-read-timeout-secs",
        "300",
        "--idle-timeout-secs",
        "300",
    ])
    .await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(up.connect().await);
    }
    let t0 = Instant::now();
    while up.metric("flex_listener_connections").await < 20.0 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The 21st connects (the kernel's accept queue) but is not served while 20 are open.
    let mut waiting = up.connect().await;
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_secs(1), waiting.read(&mut buf))
            .await
            .is_err(),
        "a connection past --max-connections was served"
    );
    assert!(up.metric("flex_listener_saturated_total").await >= 1.0);
    assert_eq!(up.metric("flex_listener_connections_max").await, 20.0);
    // One closes: the waiting connection is accepted and answered.
    drop(idle.pop());
    let (status, _, body) = read_response(&mut waiting, Duration::from_secs(10)).await;
    assert_eq!((status, body.as_slice()), (200, b"ok".as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_checked_before_they_are_read() {
    let up = Up::start(&[
        "--body-read-timeout-secs",
        "2",
        "--http2-max-concurrent-streams",
        "7",
    ])
    .await;
    let at_once = Duration::from_secs(10);

    // An unauthenticated 32 MiB upload: headers and 1 KiB of body, then the 401 arrives (in
    // OpenAI's envelope) and the proxy closes the connection without reading the rest.
    let mut s = up.connect().await;
    let head = format!(
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        32 * 1024 * 1024
    );
    let mut first = head.into_bytes();
    first.extend_from_slice(&[b' '; 1024]);
    s.write_all(&first).await.unwrap();
    let (status, _, body) = read_response(&mut s, at_once).await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "missing_api_key", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Authorization"),
        "{v}"
    );
    let (_, closed) = read_until_closed(&mut s, at_once).await;
    assert!(closed, "the connection stayed open for the unread body");

    // With `Expect: 100-continue` and a wrong key on /v1/messages: no `100`, the 401 at once, in
    // Anthropic's envelope, and not a byte of the body sent.
    let mut s = up.connect().await;
    s.write_all(
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: flex_live_nope\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            32 * 1024 * 1024
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, head, body) = read_response(&mut s, at_once).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(status, 401);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");

    // A Content-Length over --max-body-mib (32) with a good key: 413 before any body is sent.
    let mut s = up.connect().await;
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            up.key,
            33 * 1024 * 1024
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, _, body) = read_response(&mut s, at_once).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("34603008 bytes"), "{message}");
    assert!(message.contains("--max-body-mib"), "{message}");

    // A body that stalls: 20 of 200 bytes, then nothing; 408 after --body-read-timeout-secs.
    let mut s = up.connect().await;
    s.write_all(
        format!(
            "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"model\": \"gpt-5.5\",",
            up.key
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, _, body) = read_response(&mut s, Duration::from_secs(2 + 10)).await;
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "body_read_timeout", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("--body-read-timeout-secs"), "{message}");
    assert!(message.contains("Fix:"), "{message}");

    // A whole body is served as ever.
    up.serves().await;

    // HTTP/2 (h2c) advertises the stream cap in its SETTINGS.
    let mut s = up.connect().await;
    s.write_all(H2_PREFACE).await.unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut header = [0u8; 9];
    tokio::time::timeout(at_once, s.read_exact(&mut header))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(header[3], 4, "the server's first frame is SETTINGS");
    let len =
        (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    let max_streams = payload.chunks(6).find_map(|p| {
        (u16::from_be_bytes([p[0], p[1]]) == 3)
            .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
    });
    assert_eq!(max_streams, Some(7), "SETTINGS {payload:?}");

    assert_eq!(
        up.metric(r#"flex_listener_timeouts_total{kind="body_read"}"#)
            .await,
        1.0
    );
}
