//! Telemetry set-up for a service process: logs through `tracing` (filter with
//! `RUST_LOG`), spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set, and a Prometheus `/metrics` endpoint on its own port. How a trace
//! crosses services, sidecars and the queue: [`crate::trace`]. The batch
//! exporter honours the standard `OTEL_BSP_*` variables (tests set
//! `OTEL_BSP_SCHEDULE_DELAY` low to see spans soon).

use std::net::SocketAddr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Otlp(String),
    #[error("metrics endpoint on {0}: {1}")]
    Metrics(SocketAddr, String),
    #[error("tracing subscriber: {0}")]
    Subscriber(String),
}

/// Flushes exported spans when dropped at the end of `main`.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs logging, tracing export and (when `metrics_addr` is given) the
/// Prometheus endpoint. Call once, from `main`, inside the Tokio runtime.
pub fn init(
    service: &'static str,
    metrics_addr: Option<SocketAddr>,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal; `cirrus up` sends logs to files.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));

    let provider = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name(service).build())
                .build(),
        )
    } else {
        None
    };
    // W3C trace context for anything that asks the global propagator.
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;

    if let Some(addr) = metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| TelemetryError::Metrics(addr, e.to_string()))?;
        tracing::info!(%addr, "prometheus metrics at http://{addr}/metrics");
    }
    Ok(Telemetry { provider })
}
