//! The `scheduler.v1` adapter: validates the request and maps the answer.

use proto::scheduler::v1 as pb;
use runtime::types::parse_id;
use tonic::{Request, Response, Status};

use crate::service::Scheduler;

#[derive(Clone)]
pub struct Api {
    pub scheduler: Scheduler,
}

#[tonic::async_trait]
impl pb::scheduler_server::Scheduler for Api {
    async fn select_destinations(
        &self,
        r: Request<pb::SelectDestinationsRequest>,
    ) -> Result<Response<pb::Destinations>, Status> {
        let q = r.into_inner();
        let id = parse_id("server_id", &q.server_id)?;
        if q.ignore_hosts.len() > 1000 {
            return Err(runtime::Error::invalid("ignore_hosts", "at most 1000").into());
        }
        if q.token.len() > 16 * 1024 {
            return Err(runtime::Error::invalid("token", "at most 16384 bytes").into());
        }
        let d = self
            .scheduler
            .select(id, &q.ignore_hosts, q.dry_run, q.token)
            .await?;
        Ok(Response::new(pb::Destinations {
            host: d.host,
            alternates: d.alternates,
            considered: d.considered,
            passed: d.passed,
        }))
    }
}
