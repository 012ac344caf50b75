//! Test fixture: the same suite runs on SQLite (a temp dir) and on a real Postgres (a fresh
//! database per test, dropped afterwards). Postgres comes from `FLEX_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432`); if it is unreachable the test fails, never skips.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Arc;

use flex_control_plane::{ControlPlane, Metadata};
use flex_shared::crypto::MasterKeyring;
use sqlx::{Connection, Executor, PgConnection};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

fn pg_base() -> String {
    std::env::var("FLEX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
        .trim_end_matches('/')
        .to_string()
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("flex.db").display());
                Self {
                    url,
                    backend,
                    _dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres => {
                let base = pg_base();
                let admin = format!("{base}/postgres");
                let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
                    panic!(
                        "Postgres is unreachable at {admin}: {e}. These tests need a real Postgres \
                         (trust auth, user postgres) on 127.0.0.1:5432, or set FLEX_TEST_POSTGRES_URL \
                         to a server base URL such as postgres://USER@HOST:PORT. They never skip."
                    )
                });
                let name = format!("flex_test_{}", uuid::Uuid::new_v4().simple());
                conn.execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
                conn.close().await.ok();
                Self {
                    url: format!("{base}/{name}"),
                    backend,
                    _dir: None,
                    pg: Some((admin, name)),
                }
            }
        }
    }

    pub async fn open(&self, keyring: Arc<MasterKeyring>) -> Arc<ControlPlane> {
        Arc::new(
            ControlPlane::open(&self.url, keyring)
                .await
                .unwrap_or_else(|e| panic!("open control plane on {:?}: {e}", self.backend)),
        )
    }
}

impl TestDb {
    /// A control plane whose keyring comes from `path` and that reloads it on rotation.
    pub async fn open_with_key_file(&self, path: &std::path::Path) -> Arc<ControlPlane> {
        let keyring = Arc::new(MasterKeyring::load(path).expect("master key file"));
        Arc::new(
            ControlPlane::open(&self.url, keyring)
                .await
                .unwrap_or_else(|e| panic!("open control plane on {:?}: {e}", self.backend))
                .with_master_key_file(path),
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Drop runs outside async; use a private runtime on a plain thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                    conn.close().await.ok();
                }
            });
        })
        .join();
    }
}

pub fn keyring_text(id: &str, byte: u8) -> String {
    format!("{id}={}\n", hex::encode([byte; 32]))
}

pub fn keyring(text: &str) -> Arc<MasterKeyring> {
    Arc::new(MasterKeyring::parse(text, "test").expect("keyring"))
}

pub fn k1() -> Arc<MasterKeyring> {
    keyring(&keyring_text("k1", 0x11))
}

pub fn meta() -> Metadata {
    Metadata::new("test")
}

/// Generates `mod $name { sqlite, postgres }` running `async fn $name(Backend)` on both.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            }
        )*
    };
}
