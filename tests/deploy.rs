//! The deployment artifacts in `deploy/`, checked against the real binary and real servers:
//!
//! - the systemd units: `systemd-analyze verify` (warnings count as failures; a unit with a
//!   wrong value proves they are seen) and `systemd-analyze security --offline` under a
//!   threshold, the directives a production unit needs, TimeoutStopSec above the proxy's drain,
//!   and every FLEX_* variable of the example env files accepted by `flex <cmd> --help`;
//! - `deploy/make-secrets.sh` (real openssl) and `deploy/nats/nats-server.conf`:
//!   `nats-server -t` on the file with the paths moved into a temp dir, then a fleet run from the
//!   deploy files: nats-server on that configuration, `flex control` and two `flex proxy`
//!   started the way systemd would start the units (ExecStart, EnvironmentFile, LoadCredential,
//!   StateDirectory, under a temp root), requests through both proxies, usage in the ledger,
//!   no permission violation on the way; then what the NATS permissions refuse (a proxy
//!   publishing snapshots, deleting a stream, reading usage, an unknown or foreign
//!   certificate, no certificate) and a SIGTERM drain within TimeoutStopSec;
//! - `deploy/compose.yaml` and `deploy/docker/Dockerfile`, which CI cannot build or run (no
//!   Docker daemon): every flex command line and FLEX_* variable they use is run through the
//!   real binary (names in its help, values through its parser), and their paths, ports, ids
//!   and grace periods agree with the rest.
//!
//! Postgres, nats-server, bash and openssl are required (see `common/infra.rs`); nothing is
//! skipped silently. systemd-analyze is used when it works here; when it does not, the test
//! says why on stderr and the other checks still run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/infra.rs"]
mod infra;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flex_data_plane::plane_tls::{self, ClientTlsFiles};
use infra::{admin_json_of, free_port, nats_server_binary, output_with_stdin, request, Pg, Proc};
use serde_json::{json, Value};

const OPENAI_KEY: &str = "sk-sim-deploy-0000000000";
/// The one FLEX_* variable that is not a flag: the log filter (src/telemetry.rs).
const NOT_A_FLAG: &str = "FLEX_LOG";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn flex() -> &'static str {
    env!("CARGO_BIN_EXE_flex")
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// Parsers for the subsets of the formats the deploy files use (each asserts it understood).

/// `KEY=VALUE` lines (systemd EnvironmentFile and compose env_file read them alike as long as
/// values have no quotes, spaces, backslashes or `$`, which is asserted).
fn parse_env(text: &str, origin: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (k, v) = l
            .split_once('=')
            .unwrap_or_else(|| panic!("{origin}: not KEY=VALUE: {l}"));
        assert!(
            k.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "{origin}: bad variable name {k}"
        );
        assert!(
            !v.contains(['"', '\'', ' ', '\\', '$']),
            "{origin}: {k}: keep values unquoted, without spaces, backslashes or $ (systemd and compose must read them alike)"
        );
        out.push((k.to_string(), v.to_string()));
    }
    out
}

/// A systemd unit as (section, key, value) entries.
struct Unit {
    name: String,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn load(name: &str) -> Self {
        let text = read(&deploy(&format!("systemd/{name}")));
        let mut section = String::new();
        let mut entries = Vec::new();
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
                continue;
            }
            assert!(!l.ends_with('\\'), "{name}: no line continuations: {l}");
            if l.starts_with('[') {
                section = l.trim_matches(['[', ']']).to_string();
                continue;
            }
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}: not Key=Value: {l}"));
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
        Self {
            name: name.to_string(),
            entries,
        }
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(sec, k, _)| sec == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    fn one(&self, key: &str) -> &str {
        let v = self.all(key);
        assert_eq!(v.len(), 1, "{}: [Service] {key}= once: {v:?}", self.name);
        v[0]
    }

    /// `LoadCredential=NAME:SOURCE` pairs.
    fn credentials(&self) -> Vec<(String, String)> {
        self.all("LoadCredential")
            .iter()
            .map(|v| {
                let (n, src) = v.split_once(':').unwrap();
                (n.to_string(), src.to_string())
            })
            .collect()
    }
}

/// Seconds of a systemd time span such as `50`, `50s`, `2min` or `1min 30s`.
fn timespan_secs(v: &str) -> u64 {
    v.split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits.parse().unwrap_or_else(|_| panic!("time span {v}"));
            match &part[digits.len()..] {
                "" | "s" | "sec" => n,
                "m" | "min" => n * 60,
                other => panic!("time span {v}: unit {other} not handled here"),
            }
        })
        .sum()
}

/// One service of compose.yaml: the keys this test reads.
#[derive(Default, Debug)]
struct Service {
    image: String,
    build: bool,
    command: Option<Vec<String>>,
    environment: Vec<(String, String)>,
    env_file: Vec<String>,
    volumes: Vec<String>,
    ports: Vec<String>,
    stop_grace_period: Option<String>,
}

/// The services of compose.yaml, by indentation (2: service, 4: key, 6: entries), with flow
/// sequences written as JSON.
fn parse_compose(text: &str) -> BTreeMap<String, Service> {
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let mut top = String::new();
    let mut current: Option<String> = None;
    let mut key = String::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let l = line.trim();
        match indent {
            0 => {
                top = l.trim_end_matches(':').to_string();
                current = None;
            }
            2 if top == "services" => {
                let name = l.trim_end_matches(':').to_string();
                services.insert(name.clone(), Service::default());
                current = Some(name);
            }
            4 => {
                let Some(svc) = current.as_ref().and_then(|c| services.get_mut(c)) else {
                    continue;
                };
                let (k, v) = l.split_once(':').unwrap();
                key = k.to_string();
                let v = v.trim();
                match k {
                    "image" => svc.image = v.to_string(),
                    "build" => svc.build = true,
                    "command" => {
                        svc.command = Some(
                            serde_json::from_str(v)
                                .unwrap_or_else(|e| panic!("compose command {v}: {e}")),
                        )
                    }
                    "env_file" => {
                        svc.env_file = v
                            .trim_matches(['[', ']'])
                            .split(',')
                            .map(|f| f.trim().to_string())
                            .collect()
                    }
                    "stop_grace_period" => svc.stop_grace_period = Some(v.to_string()),
                    _ => {}
                }
            }
            6 => {
                let Some(svc) = current.as_ref().and_then(|c| services.get_mut(c)) else {
                    continue;
                };
                match key.as_str() {
                    "environment" => {
                        let (k, v) = l.split_once(':').unwrap();
                        svc.environment
                            .push((k.to_string(), v.trim().trim_matches('"').to_string()));
                    }
                    "volumes" => svc.volumes.push(l.trim_start_matches("- ").to_string()),
                    "ports" => svc
                        .ports
                        .push(l.trim_start_matches("- ").trim_matches('"').to_string()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    services
}

// ---------------------------------------------------------------------------------------------
// The binary's view of its flags.

/// The `[env: NAME` entries of `flex CMD --help`.
fn help_env_names(cmd: &str) -> BTreeSet<String> {
    let out = Command::new(flex())
        .env_clear()
        .args([cmd, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "flex {cmd} --help: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let names: BTreeSet<String> = text
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().trim().to_string())
        .collect();
    assert!(
        names.len() > 3,
        "flex {cmd} --help lists no env vars: {text}"
    );
    names
}

/// Every FLEX_* name is a flag of `flex CMD` (or the log filter).
fn flex_vars_known<'a>(
    cmd: &str,
    names: impl IntoIterator<Item = &'a str>,
    origin: &str,
) -> Result<(), String> {
    let known = help_env_names(cmd);
    let mut checked = 0;
    for n in names {
        if !n.starts_with("FLEX_") {
            continue;
        }
        checked += 1;
        if n != NOT_A_FLAG && !known.contains(n) {
            return Err(format!(
                "{origin}: {n} is not read by `flex {cmd}` (its --help lists {known:?})"
            ));
        }
    }
    if checked == 0 {
        return Err(format!("{origin}: no FLEX_* variable found"));
    }
    Ok(())
}

fn assert_flex_vars_known<'a>(cmd: &str, names: impl IntoIterator<Item = &'a str>, origin: &str) {
    flex_vars_known(cmd, names, origin).unwrap_or_else(|e| panic!("{e}"));
}

/// Runs `flex ARGS` with exactly `env`, and fails if clap refused an argument or a variable's
/// value (exit code 2 and a usage error). The process may fail later (a missing file, say) or
/// keep running (then it is killed after a moment): both mean the command line was accepted.
fn parses(args: &[String], env: &[(String, String)], origin: &str) -> Result<(), String> {
    let mut child = Command::new(flex())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(3) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let clap_error = ["invalid value", "unexpected argument", "required arguments"]
        .iter()
        .any(|e| stderr.contains(e));
    if status.is_some_and(|s| s.code() == Some(2)) || clap_error {
        return Err(format!(
            "{origin}: `flex {}` with {env:?} is refused by the argument parser:\n{stderr}",
            args.join(" ")
        ));
    }
    Ok(())
}

fn assert_parses(args: &[String], env: &[(String, String)], origin: &str) {
    parses(args, env, origin).unwrap_or_else(|e| panic!("{e}"));
}

/// The same command with `--help` appended: flag names and values on the command line parse.
fn args_parse(args: &[String], origin: &str) -> Result<(), String> {
    let out = Command::new(flex())
        .env_clear()
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "{origin}: `flex {} --help` fails: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

#[test]
fn the_argument_checks_catch_a_bad_variable() {
    // The checks above are not vacuous: a value the parser refuses, an unknown flag, an unknown
    // variable.
    let bad = parses(
        &["proxy".into()],
        &[("FLEX_SHUTDOWN_GRACE_SECS".into(), "thirty".into())],
        "negative control",
    );
    assert!(
        bad.is_err_and(|e| e.contains("invalid value")),
        "a bad FLEX_SHUTDOWN_GRACE_SECS went unnoticed"
    );
    let bad = args_parse(&["proxy".into(), "--grace".into()], "negative control");
    assert!(bad.is_err(), "an unknown flag went unnoticed");
    assert!(flex_vars_known("proxy", ["FLEX_GRACE"], "negative control").is_err());
    assert!(flex_vars_known("proxy", ["FLEX_LISTEN", NOT_A_FLAG], "positive control").is_ok());
    // The one FLEX_* variable that is not a flag is real.
    assert!(read(&repo().join("src/telemetry.rs")).contains(NOT_A_FLAG));
}

// ---------------------------------------------------------------------------------------------
// systemd

/// The example env file of a unit (`/etc/flex/NAME.env` in the unit, deploy/systemd/NAME.env).
fn unit_env(unit: &Unit, stem: &str) -> Vec<(String, String)> {
    let installed = format!("/etc/flex/{stem}.env");
    assert!(
        unit.all("EnvironmentFile").contains(&installed.as_str()),
        "{}: EnvironmentFile={installed}",
        unit.name
    );
    parse_env(
        &read(&deploy(&format!("systemd/{stem}.env"))),
        &format!("{stem}.env"),
    )
}

fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Checks shared by both units; returns the example env.
fn check_unit(unit: &Unit, stem: &str, cmd: &str) -> Vec<(String, String)> {
    let name = &unit.name;
    assert_eq!(unit.one("ExecStart"), format!("/usr/local/bin/flex {cmd}"));
    for (k, v) in [
        ("Type", "exec"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
        ("UMask", "0077"),
    ] {
        assert_eq!(unit.one(k), v, "{name}: {k}");
    }
    assert!(unit
        .entries
        .iter()
        .any(|(sec, k, v)| sec == "Install" && k == "WantedBy" && v == "multi-user.target"));

    let env = unit_env(unit, stem);
    for (k, v) in &env {
        assert!(k.starts_with("FLEX_"), "{stem}.env: {k}: FLEX_* only");
        // Secrets are referenced by path: never a token, a password or a URL with a password.
        assert!(
            ![
                "FLEX_ADMIN_TOKEN",
                "FLEX_NATS_PASSWORD",
                "FLEX_NATS_TOKEN",
                "FLEX_NATS_USER"
            ]
            .contains(&k.as_str()),
            "{stem}.env: {k} is a secret: keep it out of the example env file"
        );
        if let Some((_, rest)) = v.split_once("://") {
            let authority = rest.split('/').next().unwrap();
            let userinfo = authority.split_once('@').map(|(u, _)| u).unwrap_or("");
            assert!(
                !userinfo.contains(':'),
                "{stem}.env: {k} carries a password"
            );
        }
    }
    assert_flex_vars_known(
        cmd,
        env.iter().map(|(k, _)| k.as_str()),
        &format!("{stem}.env"),
    );
    // The env as a whole goes through the parser (paths into an empty temp root, so the process
    // stops at the first missing file).
    let root = tempfile::tempdir().unwrap();
    let rooted: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.clone(), root_path(root.path(), v)))
        .collect();
    assert_parses(&[cmd.into()], &rooted, &format!("{stem}.env"));

    // Key files come as credentials: each /run/credentials/UNIT/NAME has a LoadCredential=NAME,
    // and each credential is used.
    let creds = unit.credentials();
    let prefix = format!("/run/credentials/{name}/");
    let used: BTreeSet<&str> = env
        .iter()
        .filter_map(|(_, v)| v.strip_prefix(prefix.as_str()))
        .collect();
    let loaded: BTreeSet<&str> = creds.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(used, loaded, "{name}: credentials used vs LoadCredential=");
    assert!(
        env_get(&env, "FLEX_MASTER_KEY_FILE").is_some_and(|v| v.starts_with(&prefix)),
        "{name}: the master key is a credential"
    );
    for (k, v) in &env {
        if k.ends_with("_KEY") {
            assert!(v.starts_with(&prefix), "{name}: {k} should be a credential");
        }
    }
    for (_, src) in &creds {
        assert!(
            src.starts_with("/etc/flex/secrets/") || src.starts_with("/etc/flex/tls/"),
            "{name}: credential source {src}"
        );
    }
    env
}

/// `value` with an absolute path moved under `root` (a temp root standing in for `/`).
fn root_path(root: &Path, value: &str) -> String {
    if ["/etc/", "/run/credentials/", "/var/lib/"]
        .iter()
        .any(|p| value.starts_with(p))
    {
        s(&root.join(value.trim_start_matches('/')))
    } else {
        value.to_string()
    }
}

#[test]
fn systemd_units_verify_and_match_the_binary() {
    let control = Unit::load("flex-control.service");
    let proxy = Unit::load("flex-proxy.service");
    check_unit(&control, "flex-control", "control");
    let penv = check_unit(&proxy, "flex-proxy", "proxy");

    // The control plane's secrets come from a root-only env file written by make-secrets.sh.
    assert!(control
        .all("EnvironmentFile")
        .contains(&"/etc/flex/secrets/control-secrets.env"));
    let script = read(&deploy("make-secrets.sh"));
    assert!(script.contains("control-secrets.env") && script.contains("FLEX_ADMIN_TOKEN="));

    // The proxy's state dir is its StateDirectory, and a stop outlasts the drain: the grace
    // period, then up to 5 s for the usage log and 5 s for the snapshot.
    let state = proxy.one("StateDirectory");
    assert_eq!(
        env_get(&penv, "FLEX_STATE_DIR"),
        Some(format!("/var/lib/{state}").as_str())
    );
    assert_eq!(proxy.one("StateDirectoryMode"), "0700");
    let grace: u64 = env_get(&penv, "FLEX_SHUTDOWN_GRACE_SECS")
        .unwrap()
        .parse()
        .unwrap();
    let stop = timespan_secs(proxy.one("TimeoutStopSec"));
    assert!(
        stop > grace + 10,
        "TimeoutStopSec={stop} must exceed FLEX_SHUTDOWN_GRACE_SECS={grace} + 10"
    );

    match systemd_analyze() {
        Err(why) => eprintln!(
            "NOTE: systemd-analyze is not usable here ({why}); the units were checked by the \
             assertions above only"
        ),
        Ok(sa) => {
            for unit in ["flex-control.service", "flex-proxy.service"] {
                let text = read(&deploy(&format!("systemd/{unit}")));
                let diag = sa.verify(unit, &text);
                assert!(diag.is_empty(), "systemd-analyze verify {unit}:\n{diag}");
                sa.security(unit, &text);
            }
            eprintln!("systemd-analyze verify and security: both units clean");
        }
    }
}

struct SystemdAnalyze {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

/// systemd-analyze, if it is installed and verifies a known-good unit cleanly and flags a
/// known-bad one; otherwise why not.
fn systemd_analyze() -> Result<SystemdAnalyze, String> {
    let bin = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("systemd-analyze is not installed (apt-get install systemd)")?;
    let sa = SystemdAnalyze {
        bin,
        dir: tempfile::tempdir().unwrap(),
    };
    let good = "[Unit]\nDescription=probe\n[Service]\nType=exec\nExecStart=/usr/local/bin/flex proxy\nProtectSystem=strict\n";
    let diag = sa.verify("probe-good.service", good);
    if !diag.is_empty() {
        return Err(format!("a known-good unit does not verify cleanly: {diag}"));
    }
    let diag = sa.verify(
        "probe-bad.service",
        &good.replace("ProtectSystem=strict", "ProtectSystem=stricter"),
    );
    if diag.is_empty() {
        return Err("a unit with a bad value verifies without a word".into());
    }
    Ok(sa)
}

impl SystemdAnalyze {
    /// Writes `text` as `unit` (ExecStart's /usr/local/bin/flex pointed at the built binary,
    /// which verify requires to exist) and returns what `verify` says (empty: clean).
    fn verify(&self, unit: &str, text: &str) -> String {
        let path = self.write(unit, text);
        let out = Command::new(&self.bin)
            .args(["verify", "--man=no", "--recursive-errors=no"])
            .arg(&path)
            .output()
            .unwrap();
        let mut diag = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !out.status.success() {
            diag = format!("exit {:?}: {diag}", out.status.code());
        }
        diag
    }

    /// `systemd-analyze security --offline=yes`: the exposure must stay under 1.5 (of 10).
    fn security(&self, unit: &str, text: &str) {
        let path = self.write(unit, text);
        let out = Command::new(&self.bin)
            .args(["security", "--offline=yes", "--threshold=15"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let level = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("(no exposure level)")
            .to_string();
        assert!(
            out.status.success(),
            "systemd-analyze security {unit}: {level}\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{level}");
    }

    fn write(&self, unit: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(unit);
        std::fs::write(&path, text.replace("/usr/local/bin/flex", flex())).unwrap();
        path
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets and NATS

/// Runs deploy/make-secrets.sh OUT PROXIES… (real openssl).
fn make_secrets(out: &Path, proxies: &[&str]) {
    let res = Command::new("bash")
        .arg(deploy("make-secrets.sh"))
        .arg(out)
        .args(proxies)
        .output()
        .expect("bash is needed to run deploy/make-secrets.sh");
    assert!(
        res.status.success(),
        "make-secrets.sh: {}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// nats-server.conf with its listen address, monitoring port and paths moved under `root`.
fn nats_conf(root: &Path, port: u16, http_port: u16) -> String {
    let text = read(&deploy("nats/nats-server.conf"));
    let mut conf = text.clone();
    for (from, to) in [
        ("listen: 0.0.0.0:4222", format!("listen: 127.0.0.1:{port}")),
        (
            "http: 127.0.0.1:8222",
            format!("http: 127.0.0.1:{http_port}"),
        ),
        ("/etc/nats/", format!("{}/", s(&root.join("etc/nats")))),
        (
            "/var/lib/nats/",
            format!("{}/", s(&root.join("var/lib/nats"))),
        ),
    ] {
        assert!(
            conf.contains(from),
            "nats-server.conf no longer has `{from}`"
        );
        conf = conf.replace(from, &to);
    }
    conf
}

/// Installs the NATS files of `pki` under `root` as deploy/README.md says.
fn install_nats(root: &Path, pki: &Path) {
    let certs = root.join("etc/nats/certs");
    std::fs::create_dir_all(&certs).unwrap();
    for f in ["ca.pem", "nats.pem", "nats.key"] {
        std::fs::copy(pki.join(f), certs.join(f)).unwrap();
    }
    std::fs::create_dir_all(root.join("var/lib/nats")).unwrap();
}

fn nats_test(conf: &Path) -> std::process::Output {
    Command::new(nats_server_binary())
        .arg("-c")
        .arg(conf)
        .arg("-t")
        .output()
        .unwrap()
}

#[test]
fn make_secrets_and_the_nats_configuration_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    make_secrets(&pki, &["edge-1", "edge-2"]);
    for f in [
        "ca.pem",
        "nats.pem",
        "control.pem",
        "edge-1.pem",
        "edge-2.pem",
        "master.key",
        "admin-token",
        "control-secrets.env",
    ] {
        assert!(pki.join(f).is_file(), "make-secrets.sh did not write {f}");
    }
    for f in [
        "ca.key",
        "nats.key",
        "control.key",
        "edge-1.key",
        "master.key",
        "admin-token",
        "pg-password",
        "control-secrets.env",
    ] {
        let mode = std::fs::metadata(pki.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "{f} is readable by others: {mode:o}");
    }
    // The master key is what `flex control` accepts: 64 hex characters.
    let mk = read(&pki.join("master.key"));
    assert!(mk.trim().len() == 64 && mk.trim().chars().all(|c| c.is_ascii_hexdigit()));
    // A second run keeps everything and adds a proxy under the same CA.
    let ca_before = read(&pki.join("ca.pem"));
    let key_before = read(&pki.join("master.key"));
    make_secrets(&pki, &["edge-3"]);
    assert_eq!(read(&pki.join("ca.pem")), ca_before);
    assert_eq!(read(&pki.join("master.key")), key_before);
    assert!(pki.join("edge-3.pem").is_file());
    let secrets = parse_env(
        &read(&pki.join("control-secrets.env")),
        "control-secrets.env",
    );
    let names: Vec<&str> = secrets.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["FLEX_ADMIN_TOKEN", "PGPASSWORD"]);
    assert_flex_vars_known("control", names, "control-secrets.env");

    // The configuration as written (paths moved into the temp root): `nats-server -t`.
    let root = dir.path().join("root");
    install_nats(&root, &pki);
    let conf = root.join("etc/nats/nats-server.conf");
    std::fs::write(&conf, nats_conf(&root, free_port(), free_port())).unwrap();
    let out = nats_test(&conf);
    assert!(
        out.status.success(),
        "nats-server -t: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // -t is not a no-op: a broken copy fails.
    let broken = root.join("etc/nats/broken.conf");
    let text = read(&conf);
    std::fs::write(&broken, &text[..text.rfind('}').unwrap()]).unwrap();
    assert!(
        !nats_test(&broken).status.success(),
        "nats-server -t accepts anything"
    );

    // What it says matches the code: streams, subjects, the durable consumer, TLS, users.
    let text = read(&deploy("nats/nats-server.conf"));
    use flex_shared::snapshot::nats;
    for needle in [
        nats::FULL_SUBJECT.to_string(),
        nats::DELTA_SUBJECT.to_string(),
        format!("\"{}.>\"", nats::ACK_PREFIX),
        format!("\"{}.*\"", nats::ACK_PREFIX),
        format!("$JS.API.STREAM.CREATE.{}", nats::STREAM),
        format!("$JS.API.STREAM.CREATE.{}", flex_shared::usage::NATS_STREAM),
        format!(
            "$JS.ACK.{}.{}.>",
            flex_shared::usage::NATS_STREAM,
            flex_control_plane::usage_consumer::DURABLE
        ),
        "\"flex.usage.*\"".to_string(),
        format!(
            "$JS.API.STREAM.CREATE.{}",
            flex_control_plane::ledger_stream::LEDGER_STREAM
        ),
        format!("\"{}\"", flex_control_plane::ledger_stream::LEDGER_SUBJECTS),
        "verify_and_map: true".to_string(),
        "store_dir:".to_string(),
        "jetstream: enabled".to_string(),
        "\"CN=flex-control\"".to_string(),
        "{ user: \"CN=analytics\", permissions: $ANALYTICS_PERMISSIONS }".to_string(),
    ] {
        assert!(text.contains(&needle), "nats-server.conf lacks {needle}");
    }
    assert_eq!(
        flex_shared::usage::nats_subject("org_x"),
        "flex.usage.org_x",
        "usage subjects are flex.usage.<one token>"
    );
    // Every proxy id the deploy files use is a NATS user.
    let penv = parse_env(&read(&deploy("systemd/flex-proxy.env")), "flex-proxy.env");
    let mut ids = vec![env_get(&penv, "FLEX_PROXY_ID").unwrap().to_string()];
    for svc in parse_compose(&read(&deploy("compose.yaml"))).values() {
        if let Some(id) = env_get(&svc.environment, "FLEX_PROXY_ID") {
            ids.push(id.to_string());
        }
    }
    assert!(ids.len() >= 3, "{ids:?}");
    for id in ids {
        assert!(
            text.contains(&format!(
                "{{ user: \"CN={id}\", permissions: $PROXY_PERMISSIONS }}"
            )),
            "nats-server.conf has no user for proxy {id}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A fleet from the deploy files.

/// A host's root: the files deploy/README.md installs, in place.
struct Host {
    root: PathBuf,
}

impl Host {
    fn new(parent: &Path, name: &str) -> Self {
        let root = parent.join(name);
        std::fs::create_dir_all(&root).unwrap();
        Self { root }
    }

    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn install(&self, abs: &str, from: &Path) {
        let to = self.path(abs);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap();
    }

    /// Starts `unit` as systemd would: its EnvironmentFile(s) in order, its credentials copied
    /// to /run/credentials/UNIT/ (0400), its StateDirectory made (0700), its ExecStart with
    /// /usr/local/bin/flex → the built binary, every path under this root. `set` replaces
    /// deployment-specific values (addresses, the database); each must be a variable the env
    /// files set, except those in `add`. Its output goes to `log` (a new file).
    fn start(
        &self,
        unit: &Unit,
        set: &[(&str, String)],
        add: &[(&str, String)],
        log: PathBuf,
    ) -> Proc {
        let mut env: Vec<(String, String)> = Vec::new();
        for file in unit.all("EnvironmentFile") {
            let path = self.path(file.trim_start_matches('-'));
            env.extend(parse_env(&read(&path), file));
        }
        for (k, v) in set {
            assert!(
                env.iter().any(|(ek, _)| ek == k),
                "{}: its env files do not set {k}",
                unit.name
            );
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.clone()));
        }
        for (k, v) in add {
            env.push((k.to_string(), v.clone()));
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| {
                let v = root_path(&self.root, &v);
                (k, v)
            })
            .collect();
        let creds = self.path(&format!("/run/credentials/{}", unit.name));
        std::fs::create_dir_all(&creds).unwrap();
        for (name, src) in unit.credentials() {
            let to = creds.join(&name);
            std::fs::copy(self.path(&src), &to)
                .unwrap_or_else(|e| panic!("{}: LoadCredential={name}:{src}: {e}", unit.name));
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        for dir in unit.all("StateDirectory") {
            let d = self.path(&format!("/var/lib/{dir}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let exec: Vec<&str> = unit.one("ExecStart").split_whitespace().collect();
        assert_eq!(exec[0], "/usr/local/bin/flex");
        let mut cmd = Command::new(flex());
        cmd.env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("CREDENTIALS_DIRECTORY", &creds)
            .args(&exec[1..]);
        Proc::spawn(&unit.name, cmd, log)
    }
}

struct NatsProc {
    child: Child,
}

impl Drop for NatsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn admin(ca: &Path, port: u16, token: &str, args: &[&str], stdin: Option<&str>) -> Value {
    let out = output_with_stdin(
        Command::new(flex())
            .env_clear()
            .arg("admin")
            .args(["--endpoint", &format!("https://localhost:{port}"), "--ca"])
            .arg(ca)
            .args(["--token", token, "--json"])
            .args(args),
        stdin,
    );
    admin_json_of(&out, args)
}

/// Polls `f` every 50 ms until it returns Some, at most `within`.
async fn until<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let t0 = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if t0.elapsed() > within => panic!("{what}: not within {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// NATS connect options with the client certificate `name` of `pki` (and an event log).
fn nats_options(
    pki: &Path,
    name: Option<&str>,
    events: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> async_nats::ConnectOptions {
    // The inbox prefix flex itself sets: the control plane's or a proxy's.
    let inbox = if name == Some("flex-control") {
        flex::run::CONTROL_INBOX
    } else {
        flex::run::PROXY_INBOX
    };
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .custom_inbox_prefix(inbox);
    if let Some(tx) = events {
        opts = opts.event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e.to_string());
            }
        });
    }
    let files = ClientTlsFiles {
        ca: Some(pki.join("ca.pem")),
        cert: name.map(|n| pki.join(format!("{n}.pem"))),
        key: name.map(|n| pki.join(format!("{n}.key"))),
        ..ClientTlsFiles::default()
    };
    plane_tls::nats_options(opts, &files).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_runs_from_the_deploy_files_and_nats_permissions_hold() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    make_secrets(&pki, &["edge-1", "edge-2", "edge-9", "analytics"]);
    let token = read(&pki.join("admin-token")).trim().to_string();
    let ca = pki.join("ca.pem");

    // NATS, from deploy/nats/nats-server.conf.
    let nats_host = Host::new(dir.path(), "nats-host");
    install_nats(&nats_host.root, &pki);
    let nats_port = free_port();
    let conf = nats_host.path("/etc/nats/nats-server.conf");
    std::fs::write(&conf, nats_conf(&nats_host.root, nats_port, free_port())).unwrap();
    let nats_log = dir.path().join("nats.log");
    let _nats = NatsProc {
        child: Command::new(nats_server_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&nats_log).unwrap())
            .spawn()
            .unwrap(),
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nats-server did not start:\n{}",
            read(&nats_log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let nats_url = format!("tls://localhost:{nats_port}");

    let pg = Pg::new().await;
    let sim = flex::sim::spawn(flex::sim::SimConfig {
        openai_key: Some(OPENAI_KEY.into()),
        flex_delay_ms: 0,
        standard_delay_ms: 5,
        ..flex::sim::SimConfig::default()
    })
    .await
    .unwrap();

    // flex control, installed as deploy/README.md says and started from its unit.
    let control_unit = Unit::load("flex-control.service");
    let control_host = Host::new(dir.path(), "control-host");
    control_host.install(
        "/etc/flex/flex-control.env",
        &deploy("systemd/flex-control.env"),
    );
    control_host.install(
        "/etc/flex/secrets/control-secrets.env",
        &pki.join("control-secrets.env"),
    );
    control_host.install("/etc/flex/secrets/master.key", &pki.join("master.key"));
    for f in ["ca.pem", "control.pem", "control.key"] {
        control_host.install(&format!("/etc/flex/tls/{f}"), &pki.join(f));
    }
    let control_port = free_port();
    let control = control_host.start(
        &control_unit,
        &[
            ("FLEX_DATABASE_URL", pg.url()),
            ("FLEX_NATS_URL", nats_url.clone()),
            ("FLEX_LISTEN", format!("127.0.0.1:{control_port}")),
        ],
        &[],
        dir.path().join("control.log"),
    );
    let t0 = Instant::now();
    loop {
        let out = Command::new(flex())
            .env_clear()
            .arg("admin")
            .args(["--endpoint", &format!("https://localhost:{control_port}")])
            .arg("--ca")
            .arg(&ca)
            .args(["--token", &token, "org", "list"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the control plane did not answer: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            control.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let org = admin(
        &ca,
        control_port,
        &token,
        &["org", "create", "deploy"],
        None,
    )["org_id"]
        .as_str()
        .unwrap()
        .to_string();
    admin(
        &ca,
        control_port,
        &token,
        &["provider-key", "set", "--org", &org, "--provider", "openai"],
        Some(OPENAI_KEY),
    );
    let api_key = admin(
        &ca,
        control_port,
        &token,
        &["key", "create", "--org", &org],
        None,
    )["api_key"]
        .as_str()
        .unwrap()
        .to_string();

    // Two proxies, each on its own host with its own certificate as /etc/flex/tls/proxy.pem.
    let proxy_unit = Unit::load("flex-proxy.service");
    let mut proxies = Vec::new();
    for id in ["edge-1", "edge-2"] {
        let host = Host::new(dir.path(), &format!("{id}-host"));
        host.install(
            "/etc/flex/flex-proxy.env",
            &deploy("systemd/flex-proxy.env"),
        );
        host.install("/etc/flex/secrets/master.key", &pki.join("master.key"));
        host.install("/etc/flex/tls/ca.pem", &ca);
        host.install("/etc/flex/tls/proxy.pem", &pki.join(format!("{id}.pem")));
        host.install("/etc/flex/tls/proxy.key", &pki.join(format!("{id}.key")));
        let port = free_port();
        let proc = host.start(
            &proxy_unit,
            &[
                ("FLEX_NATS_URL", nats_url.clone()),
                ("FLEX_LISTEN", format!("127.0.0.1:{port}")),
                ("FLEX_PROXY_ID", id.to_string()),
            ],
            &[("FLEX_OPENAI_BASE_URL", sim.openai_base_url())],
            dir.path().join(format!("{id}.log")),
        );
        proxies.push((id, port, proc, host));
    }

    // Both serve the key through to the provider.
    for (id, port, proc, _) in &proxies {
        let base = format!("http://127.0.0.1:{port}");
        let body = until(Duration::from_secs(20), id, || {
            let (base, key) = (base.clone(), api_key.clone());
            async move {
                match request(
                    http::Method::POST,
                    &format!("{base}/v1/chat/completions"),
                    Some(&key),
                    Some(json!({"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}], "start_within": "default"})),
                )
                .await
                {
                    Ok((200, body)) => Ok(body),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["choices"][0]["message"]["content"].is_string(),
            "{id}: {body}\n{}",
            proc.log_tail()
        );
    }
    // Their reports reach the control plane (flex.snapshot.ack.*) and their usage the ledger
    // (FLEX_USAGE through the durable consumer).
    until(Duration::from_secs(10), "both proxies listed", || {
        let v = admin(&ca, control_port, &token, &["proxies"], None);
        async move {
            let current = v["current_version"].clone();
            let listed = v["proxies"].as_array().cloned().unwrap_or_default();
            let ok = ["edge-1", "edge-2"].iter().all(|id| {
                listed.iter().any(|p| {
                    p["proxy_id"] == *id
                        && p["connected"] == true
                        && p["applied_version"] == current
                })
            });
            if ok {
                Ok(())
            } else {
                Err(v.to_string())
            }
        }
    })
    .await;
    until(Duration::from_secs(15), "usage in the ledger", || {
        let v = admin(&ca, control_port, &token, &["usage", "--org", &org], None);
        async move {
            if v["requests"] == 2 {
                Ok(())
            } else {
                Err(v.to_string())
            }
        }
    })
    .await;
    // The settled ledger reaches FLEX_LEDGER, and an analytics reader (its own identity and
    // inbox) reads it with a durable consumer.
    let analytics = nats_options(&pki, Some("analytics"), None)
        .custom_inbox_prefix("_INBOX.flex-analytics")
        .connect(&nats_url)
        .await
        .expect("analytics connects");
    let ajs = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(analytics.clone());
    let rows = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    until(Duration::from_secs(15), "rows on FLEX_LEDGER", || {
        let (ajs, rows) = (ajs.clone(), rows.clone());
        async move {
            let stream = ajs
                .get_stream("FLEX_LEDGER")
                .await
                .map_err(|e| e.to_string())?;
            let consumer = stream
                .get_or_create_consumer(
                    "reports",
                    async_nats::jetstream::consumer::pull::Config {
                        durable_name: Some("reports".into()),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            let mut batch = consumer
                .fetch()
                .max_messages(10)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .map_err(|e| e.to_string())?;
            while let Some(Ok(m)) = futures_util::StreamExt::next(&mut batch).await {
                m.ack().await.map_err(|e| e.to_string())?;
                let row: flex_control_plane::ledger_stream::LedgerRow =
                    serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?;
                rows.lock().unwrap().push(row);
            }
            match rows.lock().unwrap().len() {
                2 => Ok(()),
                n => Err(format!("{n} rows")),
            }
        }
    })
    .await;
    assert!(rows
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.org_id == org && r.input_tokens > 0));
    // Nothing on the way was refused by a permission.
    for log in [control.log_text(), read(&nats_log)]
        .into_iter()
        .chain(proxies.iter().map(|p| p.2.log_text()))
    {
        let lower = log.to_lowercase();
        assert!(
            !lower.contains("violation"),
            "a permission was refused during normal operation:\n{log}"
        );
    }

    // What the permissions refuse. A proxy's identity: it cannot publish a snapshot, delete a
    // stream, or read usage.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let edge = nats_options(&pki, Some("edge-1"), Some(tx))
        .connect(&nats_url)
        .await
        .expect("edge-1 connects");
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(edge.clone());
    let snapshots = js.get_stream("FLEX_SNAPSHOTS").await.unwrap();
    let before = snapshots.cached_info().state.messages;
    assert!(before > 0);
    let forged = match js
        .publish("flex.snapshot.full", Bytes::from_static(b"forged"))
        .await
    {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(forged, "a proxy stored a snapshot");
    assert!(
        js.delete_stream("FLEX_SNAPSHOTS").await.is_err(),
        "a proxy deleted the snapshot stream"
    );
    assert!(
        js.delete_stream("FLEX_USAGE").await.is_err(),
        "a proxy deleted the usage stream"
    );
    let usage = js.get_stream("FLEX_USAGE").await.unwrap();
    let read_usage = usage
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("snoop".into()),
            ..Default::default()
        })
        .await;
    assert!(
        read_usage.is_err(),
        "a proxy created a consumer on FLEX_USAGE"
    );
    let ledger = js.get_stream("FLEX_LEDGER").await;
    assert!(ledger.is_err(), "a proxy looked into FLEX_LEDGER");
    let forged_row = match js
        .publish("flex.ledger.org_x", Bytes::from_static(b"{}"))
        .await
    {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(forged_row, "a proxy stored a ledger row");
    // The analytics reader cannot look into FLEX_USAGE or store a ledger row either.
    assert!(
        ajs.get_stream("FLEX_USAGE").await.is_err(),
        "an analytics reader looked into FLEX_USAGE"
    );
    let forged_by_analytics = match ajs
        .publish(format!("flex.ledger.{org}"), Bytes::from_static(b"{}"))
        .await
    {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(
        forged_by_analytics,
        "an analytics reader stored a ledger row"
    );
    drop(analytics);
    let _sub = edge.subscribe("flex.usage.>").await.unwrap();
    edge.flush().await.unwrap();
    let mut events = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(e)) => events.push(e.to_lowercase()),
            _ if events
                .iter()
                .any(|e| e.contains("subscription") && e.contains("flex.usage")) =>
            {
                break
            }
            _ => {}
        }
    }
    assert!(
        events
            .iter()
            .any(|e| e.contains("permissions violation") && e.contains("flex.usage")),
        "subscribing to flex.usage.> as a proxy was not refused: {events:?}"
    );
    // Nor the control plane's replies (where its pulled usage messages arrive).
    let _sub = edge.subscribe("_INBOX.flex-control.>").await.unwrap();
    edge.flush().await.unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3)
        && !events
            .iter()
            .any(|e| e.contains("permissions violation") && e.contains("_inbox.flex-control"))
    {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            events.push(e.to_lowercase());
        }
    }
    assert!(
        events
            .iter()
            .any(|e| e.contains("permissions violation") && e.contains("_inbox.flex-control")),
        "subscribing to the control plane's inbox as a proxy was not refused: {events:?}"
    );
    let after = js.get_stream("FLEX_SNAPSHOTS").await.unwrap();
    assert_eq!(after.cached_info().state.messages, before);
    drop(edge);

    // Only enrolled identities: a certificate from the fleet CA whose CN is not a NATS user,
    // one from another CA with an enrolled name, none at all.
    let unknown = nats_options(&pki, Some("edge-9"), None)
        .connect(&nats_url)
        .await;
    assert!(
        unknown.is_err(),
        "a certificate without a NATS user connected"
    );
    let other = dir.path().join("other-pki");
    make_secrets(&other, &["edge-1"]);
    let foreign = nats_options(&pki, None, None)
        .add_client_certificate(other.join("edge-1.pem"), other.join("edge-1.key"))
        .connect(&nats_url)
        .await;
    assert!(foreign.is_err(), "a certificate from another CA connected");
    let anonymous = nats_options(&pki, None, None).connect(&nats_url).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate connected"
    );
    // The enrolled identities do connect (the control plane's, a proxy's).
    for name in ["control", "edge-2"] {
        nats_options(&pki, Some(name), None)
            .connect(&nats_url)
            .await
            .unwrap_or_else(|e| panic!("{name} cannot connect: {e}"));
    }

    // `systemctl stop`: SIGTERM, and the proxy is gone well within TimeoutStopSec.
    let stop_within = Duration::from_secs(timespan_secs(proxy_unit.one("TimeoutStopSec")));
    let (id, _, proc, host) = &mut proxies[0];
    let pid = proc.pid();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = proc.child.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < stop_within,
            "{id} ignored SIGTERM for {stop_within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "{id} exited {status:?}\n{}",
        proc.log_tail()
    );
    // It leaves its snapshot in the StateDirectory for the next start.
    let state = host.path("/var/lib/flex-proxy");
    assert!(
        std::fs::read_dir(&state).unwrap().count() > 1,
        "{id}: nothing in its state dir"
    );
    eprintln!(
        "fleet from the deploy files: 2 proxies served and reported usage; {id} stopped by SIGTERM in {:?}",
        t0.elapsed()
    );

    drop(proxies);
    drop(control);
    pg.drop_db().await;
}

// ---------------------------------------------------------------------------------------------
// Docker

#[test]
fn compose_and_dockerfile_use_what_the_binary_accepts() {
    let services = parse_compose(&read(&deploy("compose.yaml")));
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    for want in ["postgres", "nats", "sim", "control", "proxy-1", "proxy-2"] {
        assert!(names.contains(want), "compose.yaml: no service {want}");
    }
    let flex_image = &services["control"].image;
    let flex_services: Vec<(&String, &Service)> = services
        .iter()
        .filter(|(_, s)| &s.image == flex_image)
        .collect();
    assert_eq!(flex_services.len(), 4, "sim, control and two proxies");
    assert!(
        flex_services.iter().any(|(_, s)| s.build),
        "one flex service builds the image"
    );

    let root = tempfile::tempdir().unwrap();
    let mut proxy_ids = BTreeSet::new();
    for (name, svc) in &flex_services {
        let origin = format!("compose.yaml {name}");
        let cmd = svc
            .command
            .clone()
            .unwrap_or_else(|| panic!("{origin}: command"));
        assert!(!svc.environment.is_empty(), "{origin}: environment");
        assert_flex_vars_known(
            &cmd[0],
            svc.environment.iter().map(|(k, _)| k.as_str()),
            &origin,
        );
        args_parse(&cmd, &origin).unwrap_or_else(|e| panic!("{e}"));
        // The whole service: its command line and environment through the parser (paths under
        // an empty temp root, listen addresses on a free loopback port).
        let mut env: Vec<(String, String)> = svc
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), root_path(root.path(), v)))
            .collect();
        for file in &svc.env_file {
            // Written by make-secrets.sh: stand-in values of the same names.
            assert_eq!(file, "./secrets/control-secrets.env", "{origin}");
            env.push(("FLEX_ADMIN_TOKEN".into(), "t".into()));
            env.push(("PGPASSWORD".into(), "p".into()));
        }
        let args: Vec<String> = cmd
            .iter()
            .map(|a| {
                if a.starts_with("0.0.0.0:") {
                    "127.0.0.1:0".into()
                } else {
                    a.clone()
                }
            })
            .collect();
        for (k, v) in env.iter_mut() {
            if k == "FLEX_LISTEN" {
                *v = "127.0.0.1:0".into();
            }
        }
        assert_parses(&args, &env, &origin);

        if cmd[0] == "proxy" {
            let id = env_get(&svc.environment, "FLEX_PROXY_ID").unwrap();
            proxy_ids.insert(id.to_string());
            // Its NATS identity is its own certificate, and its state dir its own volume.
            assert_eq!(
                env_get(&svc.environment, "FLEX_NATS_CERT"),
                Some(format!("/etc/flex/pki/{id}.pem").as_str())
            );
            let state = env_get(&svc.environment, "FLEX_STATE_DIR").unwrap();
            assert!(
                svc.volumes
                    .iter()
                    .any(|v| v.ends_with(&format!(":{state}")) && !v.starts_with('.')),
                "{origin}: {state} on a named volume"
            );
            let grace: u64 = env_get(&svc.environment, "FLEX_SHUTDOWN_GRACE_SECS")
                .unwrap()
                .parse()
                .unwrap();
            let stop = timespan_secs(svc.stop_grace_period.as_deref().unwrap());
            assert!(
                stop > grace + 10,
                "{origin}: stop_grace_period {stop}s must exceed the grace {grace}s + 10"
            );
        }
    }
    assert_eq!(proxy_ids.len(), 2, "two proxies with distinct ids");

    // NATS mounts the configuration and every file it names.
    let conf = read(&deploy("nats/nats-server.conf"));
    let nats = &services["nats"];
    assert_eq!(
        nats.command.as_deref().unwrap(),
        ["nats-server", "--config", "/etc/nats/nats-server.conf"]
    );
    assert!(nats
        .volumes
        .iter()
        .any(|v| v.starts_with("./nats/nats-server.conf:/etc/nats/nats-server.conf")));
    for word in conf.split_whitespace() {
        if let Some(file) = word.strip_prefix("/etc/nats/certs/") {
            assert!(
                nats.volumes
                    .iter()
                    .any(|v| v == &format!("./secrets/{file}:/etc/nats/certs/{file}:ro")),
                "compose.yaml: nats does not mount {file}"
            );
        }
    }
    assert!(nats.volumes.iter().any(|v| v.ends_with(":/var/lib/nats")));
    assert!(conf.contains("store_dir: /var/lib/nats/"));

    // The Dockerfile: multi-stage, locked release build, non-root runtime, `flex` entrypoint.
    let docker = read(&deploy("docker/Dockerfile"));
    let froms: Vec<&str> = docker.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].contains("rust:") && froms[0].ends_with("AS build"));
    assert!(froms[1].contains("debian:") && froms[1].contains("-slim"));
    assert!(docker.contains("cargo build --release --locked --bin flex"));
    assert!(docker.contains("COPY --from=build"));
    assert!(docker.contains("ENTRYPOINT [\"flex\"]"));
    let user = docker
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "USER {user}"
    );
    assert!(
        docker.contains("install -d -o flex -g flex -m 0700 /var/lib/flex-proxy"),
        "the proxies' state dir exists, owned by the flex user, for the named volumes"
    );
    let cmd = docker
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("a CMD line");
    let cmd: Vec<String> = serde_json::from_str(cmd).unwrap();
    let out = Command::new(flex()).args(&cmd).output().unwrap();
    assert!(out.status.success(), "flex {cmd:?}");
    // The Rust image is at least the workspace's rust-version.
    let want = read(&repo().join("Cargo.toml"))
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let have = docker
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION=");
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        version(have) >= version(&want),
        "RUST_VERSION {have} < rust-version {want}"
    );
    // Ports the image exposes are the ones compose listens on.
    let exposed = docker
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap();
    for (name, svc) in &flex_services {
        let listen = env_get(&svc.environment, "FLEX_LISTEN")
            .map(str::to_string)
            .or_else(|| {
                let cmd = svc.command.as_ref().unwrap();
                cmd.iter()
                    .position(|a| a == "--listen")
                    .map(|i| cmd[i + 1].clone())
            })
            .unwrap_or_else(|| panic!("{name}: no listen address"));
        let port = listen.rsplit(':').next().unwrap();
        assert!(
            exposed.split_whitespace().any(|p| p == port),
            "{name} listens on {port}, the image exposes {exposed}"
        );
    }
    // The build context leaves out build output and secrets; so does git.
    let ignore = read(&deploy("docker/Dockerfile.dockerignore"));
    for entry in ["target", "deploy/secrets", ".git"] {
        assert!(
            ignore.lines().any(|l| l == entry),
            "Dockerfile.dockerignore: {entry}"
        );
    }
    assert!(read(&deploy(".gitignore")).lines().any(|l| l == "secrets/"));
    // And the README says plainly that none of this is built in CI.
    let readme = read(&deploy("README.md"));
    assert!(readme.contains("not built in CI"), "deploy/README.md");
}
