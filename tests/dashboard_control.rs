#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The dashboard of a split deployment, as real processes: `flex control --dashboard-listen
//! --dashboard-url --api-base-url`, a `flex proxy --dashboard-url` and `flex sim`. A user signs up
//! and creates a key over HTTP; the proxy's `no_byok_key` and `payment_required` name the
//! dashboard pages that fix them; the quickstart shows the proxies' URL; SIGTERM stops the
//! control plane with its dashboard.

#[path = "common/infra.rs"]
mod infra;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use infra::{flex_admin_in, free_port, request, wait_listening, Proc};
use serde_json::json;

const SIM_KEY: &str = "sk-sim-dashboard-control-0000";

/// A form-posting HTTP client with a cookie jar.
struct Browser {
    base: String,
    cookies: HashMap<String, String>,
    last: String,
}

impl Browser {
    async fn send(
        &mut self,
        method: http::Method,
        path: &str,
        form: Option<String>,
    ) -> (u16, String, String) {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("cookie", cookie);
        if form.is_some() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let body = Bytes::from(form.unwrap_or_default());
        let resp = client
            .request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        for c in resp.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let kv = c.split(';').next().unwrap();
            let (k, v) = kv.split_once('=').unwrap();
            self.cookies.insert(k.into(), v.into());
        }
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        if status == 200 {
            self.last = text.clone();
        }
        (status, location, text)
    }

    async fn get(&mut self, path: &str) -> (u16, String, String) {
        self.send(http::Method::GET, path, None).await
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> (u16, String, String) {
        let marker = r#"name="csrf" value=""#;
        let at = self.last.find(marker).expect("a form on the last page") + marker.len();
        let csrf = self.last[at..].split('"').next().unwrap().to_string();
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        let body = all
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace('@', "%40").replace(' ', "+")))
            .collect::<Vec<_>>()
            .join("&");
        self.send(http::Method::POST, path, Some(body)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_deployment_serves_the_dashboard_and_links_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("master.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let (grpc, dash, api, sim) = (free_port(), free_port(), free_port(), free_port());
    let dash_url = format!("http://127.0.0.1:{dash}");
    let flex = env!("CARGO_BIN_EXE_flex");

    let mut cmd = Command::new(flex);
    cmd.args([
        "sim",
        "--listen",
        &format!("127.0.0.1:{sim}"),
        "--openai-key",
        SIM_KEY,
    ]);
    let _sim = Proc::spawn("flex sim", cmd, d.join("sim.log")).tail_on_panic(20);
    let mut cmd = Command::new(flex);
    cmd.arg("control")
        .arg("--database-url")
        .arg(format!("sqlite://{}?mode=rwc", d.join("flex.db").display()))
        .args([
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--admin-token",
            "t0ken",
        ])
        .arg("--master-key-file")
        .arg(d.join("master.key"))
        .args(["--dashboard-listen", &format!("127.0.0.1:{dash}")])
        .args(["--dashboard-url", &dash_url])
        .args(["--api-base-url", &format!("http://127.0.0.1:{api}/v1")]);
    let mut control = Proc::spawn("flex control", cmd, d.join("control.log")).tail_on_panic(40);
    wait_listening(dash, "the dashboard", Duration::from_secs(20));
    let mut cmd = Command::new(flex);
    cmd.arg("proxy")
        .args(["--control-url", &format!("http://127.0.0.1:{grpc}")])
        .arg("--master-key-file")
        .arg(d.join("master.key"))
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--openai-base-url", &format!("http://127.0.0.1:{sim}/v1")])
        .args(["--dashboard-url", &dash_url]);
    let _proxy = Proc::spawn("flex proxy", cmd, d.join("proxy.log")).tail_on_panic(40);
    wait_listening(api, "the proxy", Duration::from_secs(20));
    wait_listening(sim, "the simulator", Duration::from_secs(20));

    // Sign up and create a key over plain HTTP forms.
    let mut b = Browser {
        base: dash_url.clone(),
        cookies: HashMap::new(),
        last: String::new(),
    };
    assert_eq!(b.get("/signup").await.0, 200);
    let (status, to, _) = b
        .post(
            "/signup",
            &[
                ("email", "ada@example.com"),
                ("password", "correct horse battery"),
            ],
        )
        .await;
    assert_eq!(status, 303);
    let org = to
        .trim_start_matches("/orgs/")
        .trim_end_matches("/quickstart")
        .to_string();
    let (_, _, quick) = b.get(&to).await;
    assert!(
        quick.contains(&format!("127.0.0.1:{api}&#x2f;v1")),
        "{quick}"
    );
    b.get(&format!("/orgs/{org}/keys")).await;
    b.post(&format!("/orgs/{org}/keys"), &[("name", "prod")])
        .await;
    let (_, _, keys) = b.get(&format!("/orgs/{org}/keys")).await;
    let at = keys.find(r#"value="flex_live_"#).unwrap() + 7;
    let key: String = keys[at..].chars().take_while(|c| *c != '"').collect();

    // The proxy (its snapshot follows within a moment) links its errors to the dashboard.
    let call = |start_within: &'static str| {
        let api = format!("http://127.0.0.1:{api}/v1/responses");
        let key = key.clone();
        async move {
            request(
                http::Method::POST,
                &api,
                Some(&key),
                Some(json!({"model": "gpt-5.5", "input": "Hi", "start_within": start_within})),
            )
            .await
            .unwrap()
        }
    };
    let mut tries = 0;
    let (status, body) = loop {
        let (s, body) = call("00h-00m-10s").await;
        if s != 401 || tries > 100 {
            break (s, body);
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "no_byok_key");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("Dashboard: {dash_url}/provider-keys")),
        "{msg}"
    );

    // The provider key from the dashboard, then past due: flex is refused, naming billing.
    b.get(&format!("/orgs/{org}/provider-keys")).await;
    let (status, _, _) = b
        .post(
            &format!("/orgs/{org}/provider-keys/openai"),
            &[("secret", SIM_KEY)],
        )
        .await;
    assert_eq!(status, 303);
    let admin = |args: &[&str]| {
        let out = flex_admin_in(
            d,
            &[
                &[
                    "--endpoint",
                    &format!("http://127.0.0.1:{grpc}"),
                    "--token",
                    "t0ken",
                ],
                args,
            ]
            .concat(),
            &[],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    admin(&["billing", "set-status", "--org", &org, "past_due"]);
    let (status, body) = loop {
        let (s, body) = call("00h-00m-10s").await;
        if s == 402 || tries > 200 {
            break (s, body);
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 402, "{body}");
    assert!(
        body.contains(&format!("Dashboard: {dash_url}/billing")),
        "{body}"
    );
    let (status, body) = call("default").await;
    assert_eq!(status, 200, "default keeps working: {body}");
    let (_, _, billing) = b.get(&format!("/orgs/{org}/billing")).await;
    assert!(billing.contains("flex is paused"), "{billing}");

    // The short links the errors name go to the signed-in user's org.
    let (status, to, _) = b.get("/billing").await;
    assert_eq!(
        (status, to.as_str()),
        (303, format!("/orgs/{org}/billing").as_str())
    );

    // SIGTERM stops the control plane, dashboard included.
    let code = control.terminate(Duration::from_secs(15));
    assert!(code.success(), "{code:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", dash)).is_err());
}
