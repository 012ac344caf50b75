//! Logging and, when asked for, trace export.
//!
//! Log lines go to stderr, filtered by `FLEX_LOG` (default `warn,flex=info`). With an OTLP
//! endpoint (`--otlp-endpoint`, `FLEX_OTLP_ENDPOINT`, or the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`) on `up`, `control` or
//! `proxy`, a `tracing-opentelemetry` layer also turns the spans of our crates (info and above,
//! whatever `FLEX_LOG` says) into OpenTelemetry spans, and a batch processor exports them over
//! OTLP/gRPC. Without an endpoint no OpenTelemetry code runs.
//!
//! What a span carries is what its `tracing` fields carry: the proxy's `request` span
//! (`data-plane/src/proxy.rs`) and the control plane's `grpc` span
//! (`control-plane/src/grpc_trace.rs`) record ids, names and numbers only, never a key, a token
//! or prompt text.
//!
//! With export on, a request that carries a W3C `traceparent` (and `tracestate`) gets its
//! `request` span as a child of the caller's span ([`caller_trace`]); those headers are never
//! sent on to a provider. The control plane's gRPC calls do the same with that metadata.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use flex_data_plane::plane_tls;
use flex_data_plane::proxy::CallerTrace;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::cli::Command;

/// How long the exit waits for queued spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Trace export, shared by `up`, `control` and `proxy`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OtlpArgs {
    /// Export traces over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317 (https://…
    /// trusts the public webpki roots, or --otlp-ca). Default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    /// then OTEL_EXPORTER_OTLP_ENDPOINT; with none of them nothing is exported.
    #[arg(long, env = "FLEX_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// PEM certificate of the private CA that signed an https:// collector's certificate; it is
    /// trusted instead of the public webpki roots.
    #[arg(long, env = "FLEX_OTLP_CA", value_name = "FILE")]
    pub otlp_ca: Option<PathBuf>,
    /// service.name of the exported spans (default: OTEL_SERVICE_NAME, else flex-up,
    /// flex-control or flex-proxy, after the command).
    #[arg(long, env = "FLEX_OTLP_SERVICE_NAME")]
    pub otlp_service_name: Option<String>,
}

/// Where and as whom spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub endpoint: String,
    /// What named the endpoint, for error messages.
    pub source: &'static str,
    pub service_name: String,
    /// The CA to trust for an https:// endpoint (`--otlp-ca`).
    pub ca: Option<PathBuf>,
}

impl OtlpArgs {
    /// The export to set up, if any: the flag (or `FLEX_OTLP_ENDPOINT`) first, then the standard
    /// OpenTelemetry variables, read through `env`.
    pub fn export(
        &self,
        default_service: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Option<Export> {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let (endpoint, source) = match &self.otlp_endpoint {
            Some(e) if !e.trim().is_empty() => (e.clone(), "--otlp-endpoint"),
            _ => set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .map(|e| (e, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
                .or_else(|| {
                    set("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| (e, "OTEL_EXPORTER_OTLP_ENDPOINT"))
                })?,
        };
        let service_name = self
            .otlp_service_name
            .clone()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| set("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| default_service.to_string());
        Some(Export {
            endpoint: endpoint.trim().to_string(),
            source,
            service_name,
            ca: self.otlp_ca.clone(),
        })
    }
}

/// What [`init`] installed. Call [`Telemetry::shutdown`] before the process exits so the spans
/// still queued are exported.
#[must_use = "shut it down before exiting, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Sets up logging for `command`, and trace export when it is a long-running command with an
/// OTLP endpoint. Fails (before anything else starts) on an endpoint that cannot be used.
pub fn init(command: &Command) -> Result<Telemetry> {
    let filter =
        EnvFilter::try_from_env("FLEX_LOG").unwrap_or_else(|_| EnvFilter::new("warn,flex=info"));
    let otlp = match command {
        Command::Up(a) => Some((&a.otlp, "flex-up")),
        Command::Control(a) => Some((&a.otlp, "flex-control")),
        Command::Proxy(a) => Some((&a.otlp, "flex-proxy")),
        Command::Admin(_) | Command::Sim(_) | Command::Keygen(_) => None,
    };
    let export = otlp.and_then(|(args, service)| args.export(service, env_var));
    if let (None, Some(ca)) = (&export, otlp.and_then(|(a, _)| a.otlp_ca.as_ref())) {
        anyhow::bail!(
            "--otlp-ca {}: no OTLP endpoint is set, so the CA would not be used. Fix: pass the \
             collector's address with --otlp-endpoint https://HOST:4317 (or \
             OTEL_EXPORTER_OTLP_ENDPOINT), or drop --otlp-ca",
            ca.display()
        );
    }
    let Some(export) = export else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
        return Ok(Telemetry { provider: None });
    };
    let provider = tracer_provider(&export)?;
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("flex"))
        // Our crates only (`flex`, `flex_data_plane`, …: a target prefix): never the spans of
        // the HTTP/2 stack that carries the export itself.
        .with_filter(Targets::new().with_target("flex", Level::INFO));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(otel)
        .try_init()
        .context("cannot install the trace exporter: logging was already set up")?;
    // Only now: linking a span to its caller needs the OpenTelemetry layer installed.
    let _ = CALLER_TRACE.set(CallerTrace::new(link_to_caller));
    flex_control_plane::grpc_trace::link_callers_with(link_to_caller);
    tracing::info!(
        endpoint = %export.endpoint,
        service_name = %export.service_name,
        "exporting traces over OTLP/gRPC"
    );
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Set by [`init`] when it installs trace export.
static CALLER_TRACE: OnceLock<CallerTrace> = OnceLock::new();

/// What the proxy uses to make its request spans children of the caller's trace: `Some` only
/// when traces are exported (without export no trace header is even looked at).
pub fn caller_trace() -> Option<CallerTrace> {
    CALLER_TRACE.get().cloned()
}

/// A request's headers, read by the W3C propagator.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let all: Vec<&str> = self
            .0
            .get_all(key)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!all.is_empty()).then_some(all)
    }
}

/// Makes `span` (not yet entered) a child of the caller's span named by `traceparent`, with its
/// `tracestate`. A missing or malformed `traceparent` leaves the span a root: never an error.
fn link_to_caller(headers: &http::HeaderMap, span: &tracing::Span) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if !cx.span().span_context().is_valid() {
        return;
    }
    // Fails only for a span that is not exported or already started: it then stays a root.
    let _ = span.set_parent(cx);
}

/// The trust of the exporter's channel: `Some` for an https:// endpoint (the `--otlp-ca` CA,
/// else the public webpki roots), `None` for http://. A CA file that cannot be used, or a CA
/// with an http:// endpoint, is an error naming the flag, the reason and the fix.
fn tls_config(export: &Export) -> Result<Option<tonic::transport::ClientTlsConfig>> {
    let https = export.endpoint.starts_with("https://");
    let cfg = tonic::transport::ClientTlsConfig::new();
    match (&export.ca, https) {
        (None, false) => Ok(None),
        (None, true) => Ok(Some(
            cfg.trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        )),
        (Some(ca), false) => anyhow::bail!(
            "--otlp-ca {}: {} `{}` is not https://, so the CA would not be used. Fix: give the \
             collector's TLS address, e.g. --otlp-endpoint https://collector.internal:4317, or \
             drop --otlp-ca",
            ca.display(),
            export.source,
            export.endpoint
        ),
        (Some(ca), true) => {
            let pem = plane_tls::read_ca("--otlp-ca", ca)?;
            Ok(Some(cfg.ca_certificate(
                tonic::transport::Certificate::from_pem(pem),
            )))
        }
    }
}

/// A tracer provider with a batch OTLP/gRPC exporter (tonic). The channel connects lazily: a
/// collector that is down costs the spans of the failed exports (logged as warnings), never a
/// request.
fn tracer_provider(export: &Export) -> Result<SdkTracerProvider> {
    let https = export.endpoint.starts_with("https://");
    if !https && !export.endpoint.starts_with("http://") {
        anyhow::bail!(
            "{} `{}` has no scheme; pass the collector's gRPC address as a URL, e.g. \
             --otlp-endpoint http://127.0.0.1:4317 (https://… for TLS)",
            export.source,
            export.endpoint
        );
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(export.endpoint.clone());
    if let Some(tls) = tls_config(export)? {
        builder = builder.with_tls_config(tls);
    }
    let exporter = builder.build().with_context(|| {
        format!(
            "{} `{}` cannot be used as an OTLP/gRPC endpoint; pass the collector's gRPC address \
             with its scheme, e.g. --otlp-endpoint http://127.0.0.1:4317",
            export.source, export.endpoint
        )
    })?;
    let resource = Resource::builder()
        .with_service_name(export.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource);
    // The SDK's default (parent-based) would let a caller's `traceparent` flagged "not sampled"
    // switch our request span off: an API caller does not decide what the operator records.
    // OTEL_TRACES_SAMPLER (e.g. parentbased_always_on) still chooses otherwise.
    if env_var("OTEL_TRACES_SAMPLER").is_none_or(|v| v.trim().is_empty()) {
        provider = provider.with_sampler(Sampler::AlwaysOn);
    }
    Ok(provider.build())
}

impl Telemetry {
    /// Exports the spans still queued (at most [`SHUTDOWN_TIMEOUT`]) and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The batch processor's own thread does the export and needs this runtime's workers
        // (the gRPC connection lives there), so the wait must not hold one of them.
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "trace export did not finish cleanly"),
            Err(e) => tracing::warn!(error = %e, "trace export shutdown failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{link_to_caller, tls_config, Export, OtlpArgs};
    use opentelemetry::trace::{TraceContextExt as _, TraceId, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        let args = OtlpArgs::default();
        assert_eq!(args.export("flex-proxy", env(&[])), None);
        assert_eq!(
            args.export(
                "flex-proxy",
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", " "),
                    ("OTEL_SERVICE_NAME", "x")
                ])
            ),
            None
        );
    }

    #[test]
    fn the_flag_wins_then_the_standard_variables() {
        let std_vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_SERVICE_NAME", "from-otel"),
        ];
        let flag = OtlpArgs {
            otlp_endpoint: Some("http://flag:4317".into()),
            otlp_service_name: None,
            otlp_ca: None,
        };
        assert_eq!(
            flag.export("flex-up", env(&std_vars)),
            Some(Export {
                endpoint: "http://flag:4317".into(),
                source: "--otlp-endpoint",
                service_name: "from-otel".into(),
                ca: None,
            })
        );
        let none = OtlpArgs::default();
        let got = none.export("flex-control", env(&std_vars));
        assert_eq!(
            got.map(|e| (e.endpoint, e.source)),
            Some((
                "http://general:4317".to_string(),
                "OTEL_EXPORTER_OTLP_ENDPOINT"
            ))
        );
        let traces = [
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
        ];
        let got = none.export("flex-control", env(&traces));
        assert_eq!(
            got.map(|e| (e.endpoint, e.service_name)),
            Some(("http://traces:4317".to_string(), "flex-control".to_string()))
        );
        let named = OtlpArgs {
            otlp_endpoint: None,
            otlp_service_name: Some("edge-eu".into()),
            otlp_ca: None,
        };
        let got = named.export("flex-proxy", env(&std_vars));
        assert_eq!(got.map(|e| e.service_name), Some("edge-eu".to_string()));
    }

    fn export(endpoint: &str, ca: Option<std::path::PathBuf>) -> Export {
        Export {
            endpoint: endpoint.into(),
            source: "--otlp-endpoint",
            service_name: "flex-test".into(),
            ca,
        }
    }

    #[test]
    fn the_collector_ca_is_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, params.self_signed(&ca_key).unwrap().pem()).unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();

        assert!(tls_config(&export("http://c:4317", None))
            .unwrap()
            .is_none());
        assert!(tls_config(&export("https://c:4317", None))
            .unwrap()
            .is_some());
        assert!(tls_config(&export("https://c:4317", Some(ca.clone())))
            .unwrap()
            .is_some());

        let err = |e: Export| format!("{:#}", tls_config(&e).unwrap_err());
        let e = err(export(
            "https://c:4317",
            Some(dir.path().join("missing.pem")),
        ));
        assert!(
            e.contains("--otlp-ca") && e.contains("cannot read") && e.contains("Fix:"),
            "{e}"
        );
        let e = err(export("https://c:4317", Some(junk)));
        assert!(
            e.contains("--otlp-ca") && e.contains("no `-----BEGIN CERTIFICATE-----`"),
            "{e}"
        );
        let e = err(export("http://c:4317", Some(ca)));
        assert!(
            e.contains("--otlp-ca") && e.contains("not https://") && e.contains("Fix:"),
            "{e}"
        );
    }

    /// The trace id of a `request`-like span given `headers`, under an OpenTelemetry layer that
    /// exports nowhere.
    fn trace_of(headers: &[(&str, &str)]) -> TraceId {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request");
            link_to_caller(&map, &span);
            span.context().span().span_context().trace_id()
        })
    }

    #[test]
    fn a_traceparent_links_the_request_span_and_a_bad_one_is_ignored() {
        let tid = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        for flags in ["01", "00"] {
            let trace = trace_of(&[
                (
                    "traceparent",
                    &format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"),
                ),
                ("tracestate", "caller=1"),
            ]);
            assert_eq!(trace, tid, "flags {flags}");
        }
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "junk",
            "",
        ] {
            let trace = trace_of(&[("traceparent", bad)]);
            assert!(trace != tid && trace != TraceId::INVALID, "{bad:?}");
        }
        assert!(trace_of(&[]) != TraceId::INVALID);
    }
}
