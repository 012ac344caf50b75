//! `flex up`: the whole product in one process (an in-process control plane on SQLite, the
//! proxy, the dashboard), and `--demo`'s org, key, user and simulator keys.

use super::*;

fn demo_sim_keys(dir: &Path) -> Result<serde_json::Value> {
    let text = load_or_create(&dir.join("sim-keys.json"), || {
        json!({
            "openai": format!("sk-sim-{}", random_hex(16)),
            "anthropic": format!("sk-ant-sim-{}", random_hex(16)),
            "gemini": format!("AIza-sim-{}", random_hex(16)),
        })
        .to_string()
    })?;
    serde_json::from_str(&text).context("sim-keys.json is corrupt; delete it to regenerate")
}

/// Creates (or finds) the demo org, key and provider keys and writes demo.json.
/// Where a local `flex up` serves what `demo.json` names.
struct DemoUrls<'a> {
    base_url: &'a str,
    admin_endpoint: &'a str,
    admin_token: &'a str,
    /// `None`: no dashboard in this start (the default port was busy).
    dashboard_url: Option<&'a str>,
}

/// The demo org's dashboard user: the one `demo` names when it still exists, else a new owner
/// of `org_id` with a generated password. Sets `dashboard_email` and `dashboard_password`.
async fn ensure_demo_user(
    cp: &ControlPlane,
    org_id: &str,
    demo: &mut serde_json::Value,
) -> Result<()> {
    let known = demo["dashboard_email"]
        .as_str()
        .filter(|_| demo["dashboard_password"].as_str().is_some())
        .is_some_and(|email| cp.find_user(email).is_ok());
    if known {
        return Ok(());
    }
    let password = random_hex(16);
    let meta = Metadata::new("flex-up-demo");
    let user = cp
        .create_user(
            &meta,
            DEMO_USER_EMAIL,
            &SecretString::from(password.clone()),
            Some((org_id, flex_control_plane::domain::Role::Owner)),
        )
        .await
        .with_context(|| format!("cannot create the demo's dashboard user {DEMO_USER_EMAIL}; delete the data dir to start the demo afresh"))?;
    tracing::info!(user_id = %user.user_id, "demo dashboard user created");
    demo["dashboard_email"] = json!(DEMO_USER_EMAIL);
    demo["dashboard_password"] = json!(password);
    Ok(())
}

/// The demo's dashboard account.
pub const DEMO_USER_EMAIL: &str = "demo@example.com";

async fn ensure_demo(
    cp: &ControlPlane,
    dir: &Path,
    urls: &DemoUrls<'_>,
    sim_keys: &serde_json::Value,
) -> Result<serde_json::Value> {
    let DemoUrls {
        base_url,
        admin_endpoint,
        admin_token,
        dashboard_url,
    } = *urls;
    let path = dir.join("demo.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) {
            let org_ok = v["org_id"]
                .as_str()
                .is_some_and(|o| cp.state().orgs.contains_key(o));
            let key_ok = v["api_key"].as_str().is_some_and(|k| {
                cp.snapshot()
                    .api_keys
                    .iter()
                    .any(|e| e.key_hash == flex_shared::keys::hash(k))
            });
            if org_ok && key_ok {
                v["base_url"] = json!(base_url);
                v["admin_endpoint"] = json!(admin_endpoint);
                v["dashboard_url"] = json!(dashboard_url);
                let org_id = v["org_id"].as_str().unwrap_or_default().to_string();
                ensure_demo_user(cp, &org_id, &mut v).await?;
                write_private(&path, &serde_json::to_string_pretty(&v)?)?;
                return Ok(v);
            }
        }
    }
    let meta = Metadata::new("flex-up-demo");
    let org = cp.create_org(&meta, "demo", None).await?.org;
    let key = cp
        .create_api_key(&meta, &org.org_id, "demo", None, None)
        .await?;
    let secret = key
        .secret
        .as_ref()
        .map(|s| s.expose_secret().to_string())
        .unwrap_or_default();
    for provider in ["openai", "anthropic", "gemini"] {
        if let Some(k) = sim_keys[provider].as_str() {
            cp.set_provider_key(
                &meta,
                &org.org_id,
                provider,
                &SecretString::from(k.to_string()),
            )
            .await?;
        }
    }
    let mut v = json!({
        "base_url": base_url,
        "api_key": secret,
        "org_id": org.org_id,
        "admin_endpoint": admin_endpoint,
        "admin_token": admin_token,
        "dashboard_url": dashboard_url,
    });
    ensure_demo_user(cp, &org.org_id, &mut v).await?;
    write_private(&path, &serde_json::to_string_pretty(&v)?)?;
    Ok(v)
}

pub async fn up(args: UpArgs) -> Result<()> {
    let dir = &args.data_dir;
    private_dir(dir, "--data-dir")?;
    let token = load_or_create(&dir.join("admin-token"), || format!("{}\n", random_hex(32)))?
        .trim()
        .to_string();
    let key_path = dir.join("master.key");
    // The key file's text, wiped at once: the keyring reads the file itself.
    drop(secrecy::zeroize::Zeroizing::new(load_or_create(
        &key_path,
        MasterKeyring::generate_file_text,
    )?));
    let keyring = Arc::new(MasterKeyring::load(&key_path)?);
    let db = format!("sqlite://{}?mode=rwc", dir.join("flex.db").display());
    let cp = Arc::new(
        ControlPlane::open(&db, keyring.clone())
            .await?
            .with_master_key_file(&key_path),
    );

    let admin_listener = bind(args.admin_listen, "the admin API").await?;
    let admin_endpoint = format!("http://{}", admin_listener.local_addr()?);
    // `flex admin --data-dir DIR` reads the endpoint from here (and the token from admin-token).
    write_private(&dir.join("admin-endpoint"), &format!("{admin_endpoint}\n"))?;
    let token_secret = SecretString::from(token.clone());
    {
        let cp = cp.clone();
        tokio::spawn(async move {
            if let Err(e) = cp
                .serve_with_listener(admin_listener, &token_secret, std::future::pending())
                .await
            {
                tracing::error!(error = %e, "admin API stopped");
            }
        });
    }

    // Bound now, so a given address in use fails before anything else starts.
    let dashboard_listener = up_dashboard_listener(args.dashboard_listen).await?;
    let dashboard_url = match (&dashboard_listener, &args.dashboard_url) {
        (None, _) => None,
        (Some(_), Some(u)) => Some(u.clone()),
        (Some(l), None) => Some(format!("http://{}", l.local_addr()?)),
    };
    // The embedded proxy's no_byok_key and payment_required link to the dashboard's pages.
    flex_data_plane::error::set_dashboard_url(dashboard_url.as_deref());

    let needs_sim = args.demo
        && (args.upstream.openai_base_url.is_none()
            || args.upstream.anthropic_base_url.is_none()
            || args.upstream.gemini_base_url.is_none());
    let sim_keys = if args.demo {
        Some(demo_sim_keys(dir)?)
    } else {
        None
    };
    let sim = match (&sim_keys, needs_sim) {
        (Some(k), true) => Some(
            sim::spawn(SimConfig {
                openai_key: k["openai"].as_str().map(str::to_string),
                anthropic_key: k["anthropic"].as_str().map(str::to_string),
                gemini_key: k["gemini"].as_str().map(str::to_string),
                flex_delay_ms: 1500,
                standard_delay_ms: 200,
                ..SimConfig::default()
            })
            .await?,
        ),
        _ => None,
    };
    let urls = base_urls(
        &args.upstream,
        sim.as_ref()
            .map(|s| (s.openai_base_url(), s.base_url()))
            .as_ref()
            .map(|(a, b)| (a.as_str(), b.as_str())),
    );

    let listener = bind(args.listen, "the proxy").await?;
    let scheme = if args.upstream.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let base_url = format!("{scheme}://{}/v1", listener.local_addr()?);
    let (upstream, tls) = upstream_and_tls(&args.upstream)?;
    let (metrics_listener, metrics_url) =
        metrics_listener(args.metrics.metrics_listen, true).await?;
    let limits = limits_of(&args.limits, EMBEDDED_PROXY_ID, true)?;
    cp.set_limit_counters(Arc::new(SharedCounters(limits.limiter())));
    // From here on SIGINT and SIGTERM stop the process cleanly.
    let stop = shutdown_signal();
    let (drain, drained) = tokio::sync::oneshot::channel::<()>();
    let (store, server, feed) = embedded_proxy_until(
        &cp,
        // No state dir: the control plane runs in this process, so the proxy always starts from
        // it, never from a persisted snapshot (nothing to write on every update).
        SnapshotStore::new(Some(keyring), None).with_key_file(Some(key_path.clone())),
        listener,
        &upstream,
        ProxyConfig {
            // One exposition for the whole process: the proxy's series and the control plane's.
            extra_metrics: Some(ExtraMetrics(Arc::new({
                let cp = cp.clone();
                move |out: &mut String| {
                    flex_control_plane::metrics::metrics().encode_into(out, &cp.proxies().list());
                }
            }))),
            limits,
            metrics: metrics_listener.is_some(),
            listener: listener_config(&args.listener)?,
            ..proxy_config(&args.upstream, urls)
        },
        tls,
        async {
            let _ = drained.await;
        },
        Duration::from_secs(args.drain.shutdown_grace_secs),
        metrics_listener,
    )?;

    if let (Some(dashboard_listener), Some(url)) = (dashboard_listener, &dashboard_url) {
        let cp = cp.clone();
        let cfg = DashboardConfig::new(url).with_api_base_url(&base_url);
        tokio::spawn(async move {
            if let Err(e) = cp
                .serve_dashboard(dashboard_listener, cfg, std::future::pending())
                .await
            {
                tracing::error!(error = %e, "dashboard stopped");
            }
        });
    }

    println!("FlexInference is up.");
    println!("  API:       {base_url}");
    if let Some(url) = &dashboard_url {
        println!("  dashboard: {url}");
    }
    if let Some(url) = &metrics_url {
        println!("  metrics:   {url}");
    }
    println!(
        "  admin:     {admin_endpoint}  (token in {})",
        dir.join("admin-token").display()
    );
    if let (true, Some(keys)) = (args.demo, &sim_keys) {
        let urls = DemoUrls {
            base_url: &base_url,
            admin_endpoint: &admin_endpoint,
            admin_token: &token,
            dashboard_url: dashboard_url.as_deref(),
        };
        let mut demo = ensure_demo(&cp, dir, &urls, keys).await?;
        // Where this start serves its metrics (null when the default port was busy).
        demo["metrics_url"] = json!(metrics_url);
        write_private(
            &dir.join("demo.json"),
            &serde_json::to_string_pretty(&demo)?,
        )?;
        if let Some(s) = &sim {
            println!(
                "  simulator: {} (flex starts after 1.5 s, standard after 0.2 s)",
                s.base_url()
            );
        }
        println!(
            "  demo:      {} (org {})",
            dir.join("demo.json").display(),
            demo["org_id"].as_str().unwrap_or("")
        );
        if let Some(url) = &dashboard_url {
            println!(
                "  sign in:   {url} as {} with password {} (also in demo.json)",
                demo["dashboard_email"].as_str().unwrap_or(""),
                demo["dashboard_password"].as_str().unwrap_or("")
            );
        }
        println!();
        println!("Try it (flex wins; put \"#sim flex_delay_ms=20000\" in the input to see standard take over):");
        println!(
            "  curl -s {base_url}/responses -H \"Authorization: Bearer $(jq -r .api_key {})\" -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"gpt-5.5\", \"input\": \"Hello!\", \"start_within\": \"00h-00m-10s\"}}'",
            dir.join("demo.json").display()
        );
    }
    stop.await;
    drain_proxy(
        &store,
        Duration::from_secs(args.drain.drain_delay_secs),
        || {
            let _ = drain.send(());
        },
    )
    .await;
    if let Err(e) = server.await {
        tracing::warn!(error = %e, "the proxy server task ended abnormally");
    }
    // The answers are out; their usage must reach the ledger before the process ends.
    feed.flush(SHUTDOWN_USAGE_FLUSH).await;
    flush_snapshot(store).await;
    Ok(())
}
