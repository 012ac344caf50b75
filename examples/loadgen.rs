//! The peer harness's load generator (`examples/peers.sh`) for what wrk cannot measure: an open
//! loop at a fixed rate, streaming (time to first token and per-chunk delay), and many streams held
//! open at once (for the proxy's memory per stream). wrk does the closed loops.
//!
//! It runs on one thread (a current-thread runtime), so it takes at most one of the machine's
//! cores, and prints one JSON line of results on stdout.
//!
//! ```text
//! cargo build --release --example loadgen
//! loadgen open   --url U --body-file F [-H 'k: v'] --rate 2000 --secs 10
//! loadgen stream --url U --body-file F [-H 'k: v'] --conns 1 --requests 2000
//! loadgen hold   --url U --body-file F [-H 'k: v'] --streams 1000 --secs 20
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// The URL to POST to.
    #[arg(long)]
    url: String,
    /// The request body.
    #[arg(long)]
    body_file: std::path::PathBuf,
    /// Extra headers, `name: value` (content-type is application/json).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
}

#[derive(Subcommand)]
enum Mode {
    /// Requests started at a fixed rate, whatever the answers do (latency from each send).
    Open {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// Streaming requests in a closed loop: time to the answer's first byte, to its first token
    /// (the first event with content), and the delay between its SSE events.
    Stream {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 1000)]
        requests: usize,
    },
    /// Opens `streams` streaming requests at once, prints `{"held":N,...}` once each has its
    /// first byte, keeps them open `secs` seconds, then exits.
    Hold {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        #[arg(long, default_value_t = 20)]
        secs: u64,
    },
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

struct Req {
    client: HttpClient,
    url: hyper::Uri,
    body: Bytes,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
}

impl Req {
    fn new(t: &Target, max_idle: usize) -> Self {
        let body = Bytes::from(std::fs::read(&t.body_file).expect("read --body-file"));
        let headers = t
            .headers
            .iter()
            .map(|h| {
                let (k, v) = h.split_once(':').expect("a header is `name: value`");
                (k.trim().parse().unwrap(), v.trim().parse().unwrap())
            })
            .collect();
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_idle)
            .build_http();
        Self {
            client,
            url: t.url.parse().expect("--url"),
            body,
            headers,
        }
    }

    async fn send(&self) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let mut b =
            hyper::Request::post(self.url.clone()).header("content-type", "application/json");
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        let req = b.body(Full::new(self.body.clone())).unwrap();
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        Ok(resp)
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<u64>) -> String {
    v.sort_unstable();
    format!(
        "\"{name}_p50_us\":{},\"{name}_p90_us\":{},\"{name}_p99_us\":{},\"{name}_max_us\":{}",
        pct(&v, 0.5),
        pct(&v, 0.9),
        pct(&v, 0.99),
        v.last().copied().unwrap_or(0)
    )
}

async fn open(t: Target, rate: u64, secs: u64) {
    let req = std::rc::Rc::new(Req::new(&t, 1024));
    let total = rate * secs;
    let start = Instant::now();
    let local = tokio::task::LocalSet::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<u64, String>>();
    let mut late = Vec::with_capacity(total as usize);
    local
        .run_until(async {
            for i in 0..total {
                let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep_until(due.into()).await;
                }
                late.push(Instant::now().saturating_duration_since(due).as_micros() as u64);
                let (req, tx) = (req.clone(), tx.clone());
                tokio::task::spawn_local(async move {
                    let sent = Instant::now();
                    let r = match req.send().await {
                        Ok(resp) => match resp.into_body().collect().await {
                            Ok(_) => Ok(sent.elapsed().as_micros() as u64),
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(e),
                    };
                    let _ = tx.send(r);
                });
            }
            drop(tx);
            let mut lat = Vec::with_capacity(total as usize);
            let mut errors = 0u64;
            let mut first_error = String::new();
            while let Some(r) = rx.recv().await {
                match r {
                    Ok(us) => lat.push(us),
                    Err(e) => {
                        errors += 1;
                        if first_error.is_empty() {
                            first_error = e;
                        }
                    }
                }
            }
            let elapsed = start.elapsed().as_secs_f64();
            println!(
                "{{\"mode\":\"open\",\"rate\":{rate},\"ok\":{},\"errors\":{errors},\"achieved_rps\":{:.0},{},{},\"first_error\":{:?}}}",
                lat.len(),
                lat.len() as f64 / elapsed,
                summary("latency", lat),
                summary("send_late", late),
                first_error
            );
        })
        .await;
}

/// Whether `data` holds an event with content: a non-empty `"content":"…"` (Chat's deltas; the
/// first chunk's role-only delta has `"content":""`), `"delta":"…"` (Responses) or `"text":"…"`.
fn has_content(data: &[u8]) -> bool {
    [&b"\"content\":\""[..], b"\"delta\":\"", b"\"text\":\""]
        .iter()
        .any(|pat| {
            data.windows(pat.len())
                .enumerate()
                .any(|(i, w)| w == *pat && data.get(i + pat.len()).is_some_and(|c| *c != b'"'))
        })
}

/// One streaming answer's timings, in µs.
struct StreamTimes {
    /// To the first body byte.
    ttfb: u64,
    /// To the first event with content (the first token).
    ttft: u64,
    /// The delays between SSE events after the first one.
    gaps: Vec<u64>,
    events: usize,
}

/// Reads a streaming answer.
async fn read_stream(
    resp: hyper::Response<hyper::body::Incoming>,
    sent: Instant,
) -> Result<StreamTimes, String> {
    let mut body = resp.into_body();
    let mut ttfb = None;
    let mut ttft = None;
    let mut last = None;
    let mut gaps = Vec::new();
    let mut events = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        if ttfb.is_none() {
            ttfb = Some(now.duration_since(sent).as_micros() as u64);
        }
        if ttft.is_none() && has_content(&data) {
            ttft = Some(now.duration_since(sent).as_micros() as u64);
        }
        let n = data.windows(2).filter(|w| w == b"\n\n").count();
        if n == 0 {
            continue;
        }
        if let Some(prev) = last {
            let gap = now.duration_since(prev).as_micros() as u64;
            // The events of one read arrived together: the gap is shared between them.
            let each = gap / n as u64;
            gaps.extend(std::iter::repeat_n(each, n));
        } else if n > 1 {
            gaps.extend(std::iter::repeat_n(0, n - 1));
        }
        last = Some(now);
        events += n;
    }
    let ttfb = ttfb.unwrap_or(0);
    Ok(StreamTimes {
        ttfb,
        ttft: ttft.unwrap_or(ttfb),
        gaps,
        events,
    })
}

async fn stream(t: Target, conns: usize, requests: usize) {
    let req = std::rc::Rc::new(Req::new(&t, conns));
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..conns {
                let req = req.clone();
                let n = requests / conns + usize::from(c < requests % conns);
                tasks.push(tokio::task::spawn_local(async move {
                    let mut out = (Vec::new(), Vec::new(), 0usize, 0u64, Vec::new());
                    for _ in 0..n {
                        let sent = Instant::now();
                        match req.send().await {
                            Ok(resp) => match read_stream(resp, sent).await {
                                Ok(t) => {
                                    out.0.push(t.ttft);
                                    out.1.extend(t.gaps);
                                    out.2 += t.events;
                                    out.4.push(t.ttfb);
                                }
                                Err(_) => out.3 += 1,
                            },
                            Err(_) => out.3 += 1,
                        }
                    }
                    out
                }));
            }
            let (mut ttft, mut gaps, mut events, mut errors, mut ttfb) =
                (Vec::new(), Vec::new(), 0, 0, Vec::new());
            for t in tasks {
                let (a, b, c, d, e) = t.await.unwrap();
                ttft.extend(a);
                gaps.extend(b);
                events += c;
                errors += d;
                ttfb.extend(e);
            }
            let ok = ttft.len();
            println!(
                "{{\"mode\":\"stream\",\"ok\":{ok},\"errors\":{errors},\"rps\":{:.0},\"events_per_answer\":{:.1},{},{},{}}}",
                ok as f64 / start.elapsed().as_secs_f64(),
                events as f64 / ok.max(1) as f64,
                summary("ttfb", ttfb),
                summary("ttft", ttft),
                summary("chunk_gap", gaps)
            );
        })
        .await;
}

async fn hold(t: Target, streams: usize, secs: u64) {
    let req = std::rc::Rc::new(Req::new(&t, streams));
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
            for _ in 0..streams {
                let (req, tx) = (req.clone(), tx.clone());
                tokio::task::spawn_local(async move {
                    let Ok(resp) = req.send().await else {
                        let _ = tx.send(false);
                        return;
                    };
                    let mut body = resp.into_body();
                    // The first frame: the stream is open and answering.
                    let first = matches!(body.frame().await, Some(Ok(_)));
                    let _ = tx.send(first);
                    while let Some(Ok(_)) = body.frame().await {}
                });
            }
            let (mut held, mut failed) = (0, 0);
            let deadline = tokio::time::sleep(Duration::from_secs(60));
            tokio::pin!(deadline);
            while held + failed < streams {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(true) => held += 1,
                        _ => failed += 1,
                    },
                    _ = &mut deadline => break,
                }
            }
            println!("{{\"mode\":\"hold\",\"held\":{held},\"failed\":{failed}}}");
            tokio::time::sleep(Duration::from_secs(secs)).await;
        })
        .await;
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match cli.mode {
            Mode::Open { target, rate, secs } => open(target, rate, secs).await,
            Mode::Stream {
                target,
                conns,
                requests,
            } => stream(target, conns, requests).await,
            Mode::Hold {
                target,
                streams,
                secs,
            } => hold(target, streams, secs).await,
        }
    });
}
