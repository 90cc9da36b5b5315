//! `conductor.v1.Agent/AttachConsole`: the interactive side of a guest's
//! serial port (the seeds' console proxy), for compute-api only.
//!
//! Each guest's serial port is a QEMU chardev on a Unix socket in its
//! server directory (`console.sock`) that also logs everything the guest
//! writes to `console.log` (libvirt's `<log file=...>`, written by
//! virtlogd), so `console-log` keeps working whether or not a console is
//! attached. A session connects to the socket and pipes bytes both ways
//! until either side closes. QEMU serves one client at a time: a second
//! session on the same server is refused (FAILED_PRECONDITION) while the
//! first lasts.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use proto::conductor::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::Agent;
use crate::libvirt::Power;

type Output =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AgentConsoleOutput, Status>> + Send>>;

/// The agent's gRPC service (served on its own listener, behind its sidecar).
#[derive(Clone)]
pub struct ConsoleService {
    agent: Agent,
    open: Arc<Mutex<HashSet<Uuid>>>,
}

impl ConsoleService {
    pub fn new(agent: Agent) -> Self {
        Self {
            agent,
            open: Arc::default(),
        }
    }

    pub fn server(self) -> pb::agent_server::AgentServer<Self> {
        pb::agent_server::AgentServer::new(self)
    }
}

/// Releases a server's console when its session ends.
struct Held {
    open: Arc<Mutex<HashSet<Uuid>>>,
    id: Uuid,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for ConsoleService {
    type AttachConsoleStream = Output;

    async fn attach_console(
        &self,
        r: Request<Streaming<pb::AgentConsoleInput>>,
    ) -> Result<Response<Output>, Status> {
        // The sidecar sets x-cirrus-peer from the verified certificate (and
        // its policy admits only compute-api); without a mesh the caller's
        // own claim is all there is (a development set-up on loopback).
        let peer = runtime::caller::Caller::from_metadata(r.metadata()).peer;
        let want = format!(
            "spiffe://{}/svc/compute-api",
            self.agent.config().trust_domain
        );
        if peer.as_deref() != Some(want.as_str()) {
            return Err(Status::permission_denied(format!(
                "only {want} may attach to a console (the caller is {})",
                peer.as_deref().unwrap_or("unnamed")
            )));
        }
        let mut input = r.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the first message must name the server"))?;
        let id = Uuid::parse_str(&first.server_id)
            .map_err(|_| Status::invalid_argument("server_id must be a UUID"))?;
        let dir = self.agent.server_dir(id);
        let lv = self.agent.libvirt().clone();
        let power = tokio::task::spawn_blocking(move || lv.power(id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("libvirt: {e}")))?;
        if power == Power::NoState || !dir.is_dir() {
            return Err(Status::not_found(format!(
                "server {id} is not on host {}",
                self.agent.config().host
            )));
        }
        if !matches!(power, Power::Running | Power::Paused) {
            return Err(Status::failed_precondition(format!(
                "server {id} has no running domain (it is {})",
                power.as_str()
            )));
        }
        let path = crate::saga::console_socket_path(&dir);
        let held = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if !open.insert(id) {
                return Err(Status::failed_precondition(format!(
                    "the console of server {id} is in use (one session at a time)"
                )));
            }
            Held {
                open: self.open.clone(),
                id,
            }
        };
        let sock = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
            Status::failed_precondition(format!(
                "server {id} offers no interactive serial port ({}: {e})",
                path.display()
            ))
        })?;
        tracing::info!(server = %id, "console attached");
        let (mut from_guest, mut to_guest) = sock.into_split();
        if !first.data.is_empty() {
            to_guest
                .write_all(&first.data)
                .await
                .map_err(|e| Status::unavailable(format!("the serial port: {e}")))?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let _held = held;
            let mut buf = vec![0u8; 4096];
            loop {
                tokio::select! {
                    n = from_guest.read(&mut buf) => match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let out = pb::AgentConsoleOutput { data: buf[..n].to_vec() };
                            if tx.send(Ok(out)).await.is_err() {
                                break;
                            }
                        }
                    },
                    m = input.message() => match m {
                        Ok(Some(m)) => {
                            if to_guest.write_all(&m.data).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    () = tx.closed() => break,
                }
            }
            tracing::info!(server = %id, "console detached");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
