//! Test harness: a control plane on SQLite in a temp dir, the provider simulator, and a proxy,
//! all in process on free loopback ports, wired exactly like `flex up`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flex::sim::{self, SimConfig, SimHandle};
use flex_control_plane::{ControlPlane, Metadata};
use flex_data_plane::providers::BaseUrls;
use flex_data_plane::proxy::ProxyConfig;
use flex_data_plane::snapshot::SnapshotStore;
use flex_data_plane::upstream::UpstreamConfig;
use flex_shared::crypto::MasterKeyring;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::net::TcpListener;

pub const OPENAI_KEY: &str = "sk-sim-openai-test-key-000000";
pub const ANTHROPIC_KEY: &str = "sk-ant-sim-test-key-000000";
pub const GEMINI_KEY: &str = "AIza-sim-test-key-000000";

pub struct Stack {
    pub cp: Arc<ControlPlane>,
    pub sim: SimHandle,
    pub base: String,
    pub api_key: String,
    pub org_id: String,
    pub key_id: String,
    pub keyring: Arc<MasterKeyring>,
    pub dir: tempfile::TempDir,
    pub store: Arc<SnapshotStore>,
}

pub struct Options {
    pub sim: SimConfig,
    /// OpenAI base URL instead of the simulator's.
    pub openai_url: Option<String>,
    /// Extra CA for upstream HTTPS.
    pub ca: Option<std::path::PathBuf>,
    /// Anthropic base URL instead of the simulator's.
    pub anthropic_url: Option<String>,
}

pub fn sim_config() -> SimConfig {
    SimConfig {
        openai_key: Some(OPENAI_KEY.into()),
        anthropic_key: Some(ANTHROPIC_KEY.into()),
        gemini_key: Some(GEMINI_KEY.into()),
        flex_delay_ms: 200,
        standard_delay_ms: 50,
        ..SimConfig::default()
    }
}

pub async fn stack() -> Stack {
    stack_with(Options {
        sim: sim_config(),
        openai_url: None,
        ca: None,
        anthropic_url: None,
    })
    .await
}

pub async fn stack_with(opts: Options) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let keyring =
        Arc::new(MasterKeyring::parse(&MasterKeyring::generate_file_text(), "test").unwrap());
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("flex.db").display());
    let cp = Arc::new(ControlPlane::open(&db, keyring.clone()).await.unwrap());
    let meta = Metadata::new("test");
    let org = cp.create_org(&meta, "acme", None).await.unwrap().org;
    let key = cp
        .create_api_key(&meta, &org.org_id, "k", None, None)
        .await
        .unwrap();
    for (provider, key) in [
        ("openai", OPENAI_KEY),
        ("anthropic", ANTHROPIC_KEY),
        ("gemini", GEMINI_KEY),
    ] {
        cp.set_provider_key(
            &meta,
            &org.org_id,
            provider,
            &SecretString::from(key.to_string()),
        )
        .await
        .unwrap();
    }
    let sim = sim::spawn(opts.sim).await.unwrap();
    let openai_url = opts
        .openai_url
        .clone()
        .unwrap_or_else(|| sim.openai_base_url());
    let ca = opts.ca.clone();
    let cfg = ProxyConfig {
        base_urls: BaseUrls {
            openai: openai_url,
            anthropic: opts.anthropic_url.clone().unwrap_or_else(|| sim.base_url()),
            gemini: sim.base_url(),
        },
        ..ProxyConfig::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let upstream = UpstreamConfig {
        extra_ca_file: ca,
        ..UpstreamConfig::default()
    };
    let store = flex::run::embedded_proxy(
        &cp,
        flex_data_plane::snapshot::SnapshotStore::new(Some(keyring.clone()), None),
        listener,
        &upstream,
        cfg,
        None,
    )
    .unwrap();
    // Wait until the proxy has the snapshot with the key.
    for _ in 0..100 {
        if store.version() >= cp.snapshot().version {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Stack {
        cp,
        sim,
        base,
        api_key: key.secret.as_ref().unwrap().expose_secret().to_string(),
        org_id: org.org_id,
        key_id: key.key.key_id,
        keyring,
        dir,
        store,
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

pub async fn post(url: &str, key: Option<&str>, body: &Value) -> Reply {
    post_raw(
        url,
        key.map(|k| ("authorization", format!("Bearer {k}"))),
        Bytes::from(body.to_string()),
    )
    .await
}

pub async fn post_raw(url: &str, auth: Option<(&str, String)>, body: Bytes) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::post(url).header("content-type", "application/json");
    if let Some((name, value)) = auth {
        req = req.header(name, value);
    }
    let resp = client
        .request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str, key: Option<&str>) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::get(url);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}
