//! A simulator on a free port and a plain HTTP client, for the tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{spawn, SimConfig, SimHandle, SimStatsSnapshot};

pub(crate) struct TestSim {
    pub handle: SimHandle,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A whole reply.
pub(crate) struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.body))
    }

    /// The SSE events of the body: (`event:` name if any, parsed `data:`), `[DONE]` as a string.
    pub(crate) fn events(&self) -> Vec<(Option<String>, Value)> {
        let mut events = Vec::new();
        for block in self.body.split("\n\n").filter(|block| !block.is_empty()) {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    name = Some(rest.to_owned());
                } else if let Some(rest) = line.strip_prefix("data: ") {
                    data = Some(
                        serde_json::from_str(rest).unwrap_or_else(|_| Value::String(rest.into())),
                    );
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            events.push((name, data.expect("an SSE event without data")));
        }
        events
    }
}

impl TestSim {
    pub(crate) async fn start(cfg: SimConfig) -> Self {
        Self::with_client(cfg, Client::builder(TokioExecutor::new()).build_http()).await
    }

    /// The same, with an HTTP/2-only (h2c prior knowledge) client.
    pub(crate) async fn start_h2(cfg: SimConfig) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        Self::with_client(cfg, client).await
    }

    async fn with_client(cfg: SimConfig, client: Client<HttpConnector, Full<Bytes>>) -> Self {
        let handle = spawn(cfg).await.unwrap();
        Self { handle, client }
    }

    pub(crate) fn stats(&self) -> SimStatsSnapshot {
        self.handle.stats.snapshot()
    }

    /// Sends a request and returns the response with its body unread.
    pub(crate) async fn open(
        &self,
        method: &str,
        path: &str,
        headers: Vec<(&str, String)>,
        body: Option<&Value>,
    ) -> http::Response<Incoming> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.handle.base_url()));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(body.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        self.client
            .request(request.body(body).unwrap())
            .await
            .unwrap()
    }

    /// A POST of `body` whose transport error is returned, not a panic.
    pub(crate) async fn try_post(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        let request = Request::post(format!("{}{path}", self.handle.base_url()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        self.client.request(request).await
    }

    pub(crate) async fn post(
        &self,
        path: &str,
        headers: Vec<(&str, String)>,
        body: &Value,
    ) -> Reply {
        read(self.open("POST", path, headers, Some(body)).await).await
    }

    pub(crate) async fn post_json(
        &self,
        path: &str,
        headers: Vec<(&str, String)>,
        body: &Value,
    ) -> (u16, Value) {
        let reply = self.post(path, headers, body).await;
        (reply.status, reply.json())
    }

    pub(crate) async fn get(&self, path: &str) -> Reply {
        read(self.open("GET", path, vec![], None).await).await
    }
}

pub(crate) async fn read(response: http::Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

/// Waits until `check` holds on the stats (the server side notices a closed stream a little
/// after the client closed it).
pub(crate) async fn eventually(sim: &TestSim, check: impl Fn(&SimStatsSnapshot) -> bool) {
    for _ in 0..200 {
        if check(&sim.stats()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("stats never matched: {:?}", sim.stats());
}
