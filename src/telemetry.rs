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
//! (`data-plane/src/proxy.rs`) records ids, names and numbers only, never a key or prompt text.

use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Level;
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
    /// trusts the public webpki roots). Default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then
    /// OTEL_EXPORTER_OTLP_ENDPOINT; with none of them nothing is exported.
    #[arg(long, env = "FLEX_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
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
    let export = match command {
        Command::Up(a) => a.otlp.export("flex-up", env_var),
        Command::Control(a) => a.otlp.export("flex-control", env_var),
        Command::Proxy(a) => a.otlp.export("flex-proxy", env_var),
        Command::Admin(_) | Command::Sim(_) => None,
    };
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
    if https {
        builder = builder.with_tls_config(
            tonic::transport::ClientTlsConfig::new()
                .trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        );
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
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
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
    use super::{Export, OtlpArgs};

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
        };
        assert_eq!(
            flag.export("flex-up", env(&std_vars)),
            Some(Export {
                endpoint: "http://flag:4317".into(),
                source: "--otlp-endpoint",
                service_name: "from-otel".into(),
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
        };
        let got = named.export("flex-proxy", env(&std_vars));
        assert_eq!(got.map(|e| e.service_name), Some("edge-eu".to_string()));
    }
}
