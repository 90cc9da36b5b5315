//! Issue 11's "one trace per boot": a cloud from `cirrus up` exports its
//! spans over OTLP to a receiver in this test, and one `CreateServer` (a
//! real QEMU guest with an image, a port and a volume) yields ONE trace
//! whose spans come from all eight services it involves. The W3C
//! `traceparent` crosses the sidecars (gRPC metadata) and the queue
//! (message headers) for that to hold.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use tests::*;

/// The services one boot goes through.
const SERVICES: [&str; 8] = [
    "compute-api",
    "scheduler",
    "queue",
    "compute-agent",
    "conductor",
    "image",
    "network",
    "volume",
];

/// One span as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    trace: String,
    service: String,
    name: String,
    path: String,
}

/// An OTLP/gRPC trace receiver that keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Seen>>>,
}

fn string_attr(attrs: &[KeyValue], key: &str) -> String {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                seen.push(Seen {
                    trace: hex(&s.trace_id),
                    service: service.clone(),
                    path: string_attr(&s.attributes, "path"),
                    name: s.name,
                });
            }
        }
        self.spans.lock().unwrap().extend(seen);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Per trace: which services sent spans, and the span names (for failures).
fn by_trace(spans: &[Seen]) -> BTreeMap<String, (BTreeSet<String>, Vec<String>)> {
    let mut traces: BTreeMap<String, (BTreeSet<String>, Vec<String>)> = BTreeMap::new();
    for s in spans {
        let t = traces.entry(s.trace.clone()).or_default();
        t.0.insert(s.service.clone());
        let what = if s.path.is_empty() {
            format!("{}:{}", s.service, s.name)
        } else {
            format!("{}:{}", s.service, s.path)
        };
        t.1.push(what);
    }
    traces
}

#[tokio::test]
async fn one_create_server_is_one_trace_across_eight_services() {
    // The receiver, on a port of its own.
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    // `cirrus up` passes its environment (all but CIRRUS_*) to every child.
    let cloud = Cloud::up_on(
        "qemu",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Export within a fraction of a second instead of every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;

    cloud.admin_ok(&["network", "create", "net-t"]).await;
    cloud
        .admin_ok(&[
            "subnet",
            "create",
            "net-t-v4",
            "--network",
            "net-t",
            "--subnet-range",
            "10.47.0.0/24",
        ])
        .await;
    cloud
        .admin_ok(&["volume", "create", "data-t", "--size", "1", "--wait"])
        .await;

    // One create: the image (the tiny guest), a port on net-t, the volume.
    let created = json(
        &cloud,
        &[
            "server",
            "create",
            "t1",
            "--flavor",
            "m1.tiny",
            "--image",
            "cirrus-tiny",
            "--network",
            "net-t",
            "--boot-volume",
            "data-t",
            "--wait",
        ],
    )
    .await;
    assert_eq!(created["status"], "active", "{created}");

    // The CreateServer request's trace holds spans of all eight services
    // (the agent's spans end with the build, so they come last).
    let spans = receiver.spans.clone();
    let trace = eventually(
        Duration::from_secs(120),
        "one trace from CreateServer covering every service",
        || {
            let spans = spans.lock().unwrap().clone();
            async move {
                let roots: BTreeSet<String> = spans
                    .iter()
                    .filter(|s| s.service == "compute-api" && s.path.ends_with("/CreateServer"))
                    .map(|s| s.trace.clone())
                    .collect();
                let traces = by_trace(&spans);
                for t in &roots {
                    let (services, _) = &traces[t];
                    if SERVICES.iter().all(|s| services.contains(*s)) {
                        return Ok((t.clone(), traces[t].clone()));
                    }
                }
                let summary: Vec<String> = traces
                    .iter()
                    .map(|(t, (services, names))| {
                        let mark = if roots.contains(t) {
                            " (CreateServer)"
                        } else {
                            ""
                        };
                        format!("{t}{mark}: {services:?} {names:?}")
                    })
                    .collect();
                Err(format!(
                    "{} spans in {} traces, {} from CreateServer:\n{}",
                    spans.len(),
                    traces.len(),
                    roots.len(),
                    summary.join("\n")
                ))
            }
        },
    )
    .await;
    println!(
        "trace {}: {} spans from {:?}",
        trace.0,
        trace.1.1.len(),
        trace.1.0
    );

    cloud.admin_ok(&["server", "delete", "t1", "--wait"]).await;
    cloud.down().await;
    server.abort();
}
