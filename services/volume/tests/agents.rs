//! Compute agents attaching their guests' volumes: with the user's token
//! passed along (the sidecar then sets the user *and* the agent's verified
//! peer), or on the agent's certificate alone (`x-cirrus-peer` only). An
//! agent touches only attachments on its own host. The tests play the
//! sidecar (`tests/mesh.rs` has the real one); one scenario each.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use proto::volume::v1 as pb;
use runtime::caller::Caller;
use runtime::testing::{req, workload};
use tonic::Code;

fn agent_id(host: &str) -> String {
    format!("spiffe://cirrus.local/svc/compute-agent/host/{host}")
}

/// The agent of `host` on its certificate alone.
fn agent(host: &str) -> Caller {
    workload(&agent_id(host))
}

/// The agent of `host` passing `user`'s token along.
fn agent_with(host: &str, user: Caller) -> Caller {
    Caller {
        peer: Some(agent_id(host)),
        ..user
    }
}

fn connector(host: &str) -> pb::HostConnector {
    pb::HostConnector {
        host: host.into(),
        transports: vec![pb::Transport::LocalFile as i32],
    }
}

fn attach_status(a: &pb::Attachment) -> pb::AttachmentStatus {
    pb::AttachmentStatus::try_from(a.status).unwrap()
}

async fn create(
    s: &Server,
    who: &Caller,
    volume_id: &str,
    server: &str,
    conn: Option<pb::HostConnector>,
) -> Result<pb::Attachment, tonic::Status> {
    s.client()
        .create_attachment(req(
            pb::CreateAttachmentRequest {
                volume_id: volume_id.into(),
                server_id: server.into(),
                connector: conn,
            },
            who,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn complete(s: &Server, who: &Caller, id: &str) -> Result<pb::Attachment, tonic::Status> {
    s.client()
        .complete_attachment(req(
            pb::CompleteAttachmentRequest {
                id: id.into(),
                mountpoint: "vdb".into(),
            },
            who,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn delete(s: &Server, who: &Caller, id: &str) -> Result<(), tonic::Status> {
    s.client()
        .delete_attachment(req(pb::DeleteAttachmentRequest { id: id.into() }, who))
        .await
        .map(drop)
}

async fn get(s: &Server, who: &Caller, id: &str) -> Result<pb::Attachment, tonic::Status> {
    s.client()
        .get_attachment(req(pb::GetAttachmentRequest { id: id.into() }, who))
        .await
        .map(|r| r.into_inner())
}

async fn list(s: &Server, who: &Caller, server: &str) -> Vec<pb::Attachment> {
    s.client()
        .list_attachments(req(
            pb::ListAttachmentsRequest {
                server_id: server.into(),
                ..Default::default()
            },
            who,
        ))
        .await
        .unwrap()
        .into_inner()
        .attachments
}

async fn volume_status(s: &Server, id: &str) -> pb::VolumeStatus {
    status(&s.get(&member_a(), id).await.unwrap())
}

#[tokio::test]
async fn an_agent_with_the_users_token_attaches_on_its_own_host_only() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "disk", 1).await;
    let h1 = agent_with("h1", member_a());
    let h2 = agent_with("h2", member_a());

    // Refused before anything is written: no connector, another host's.
    assert_status(
        create(&s, &h1, &v.id, "srv", None).await,
        Code::InvalidArgument,
        "connector: is required from a compute agent (host h1)",
    );
    assert_status(
        create(&s, &h2, &v.id, "srv", Some(connector("h1"))).await,
        Code::PermissionDenied,
        "the compute agent of host h2 may connect volumes only to its own host, not to h1",
    );
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Available);

    let a = create(&s, &h1, &v.id, "srv", Some(connector("h1")))
        .await
        .unwrap();
    assert_eq!(attach_status(&a), pb::AttachmentStatus::Attaching);
    let info = a.connection_info.clone().unwrap();
    match info.target {
        Some(pb::connection_info::Target::LocalFile(f)) => assert_eq!(
            std::path::Path::new(&f.path),
            s.volume_file(&v.id).canonicalize().unwrap()
        ),
        other => panic!("expected a local file, got {other:?}"),
    }

    // The agent of h2, even with the owner's token, touches nothing on h1.
    let not_h2 = format!("attachment {} is not on host h2", a.id);
    assert_status(
        complete(&s, &h2, &a.id).await,
        Code::PermissionDenied,
        &not_h2,
    );
    assert_status(
        delete(&s, &h2, &a.id).await,
        Code::PermissionDenied,
        &not_h2,
    );
    // Another project's token through h1: the user rules still apply.
    assert_status(
        complete(&s, &agent_with("h1", member_b()), &a.id).await,
        Code::NotFound,
        &format!("attachment {} not found", a.id),
    );
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Attaching);

    let done = complete(&s, &h1, &a.id).await.unwrap();
    assert_eq!(attach_status(&done), pb::AttachmentStatus::Attached);
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::InUse);
    // A completion repeated after a lost answer changes nothing.
    assert_eq!(complete(&s, &h1, &a.id).await.unwrap().id, a.id);
    delete(&s, &h1, &a.id).await.unwrap();
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Available);
}

#[tokio::test]
async fn without_a_token_an_agent_acts_on_attachments_of_its_own_host() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "disk", 1).await;
    let (h1, h2) = (agent("h1"), agent("h2"));

    // Not an agent, not a user: nothing.
    assert_status(
        create(
            &s,
            &workload("spiffe://cirrus.local/svc/network-agent/host/h1"),
            &v.id,
            "srv",
            Some(connector("h1")),
        )
        .await,
        Code::Unauthenticated,
        "authentication failed",
    );
    assert_status(
        create(&s, &h2, &v.id, "srv", Some(connector("h1"))).await,
        Code::PermissionDenied,
        "the compute agent of host h2 may connect volumes only to its own host, not to h1",
    );

    let a = create(&s, &h1, &v.id, "srv", Some(connector("h1")))
        .await
        .unwrap();
    assert_eq!(a.project_id, PROJECT_A);
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Attaching);
    assert_eq!(get(&s, &h1, &a.id).await.unwrap().id, a.id);
    assert_eq!(list(&s, &h1, "srv").await.len(), 1);

    // h2 sees none of it and may change none of it.
    let not_h2 = format!("attachment {} is not on host h2", a.id);
    assert_status(get(&s, &h2, &a.id).await, Code::PermissionDenied, &not_h2);
    assert!(list(&s, &h2, "srv").await.is_empty());
    assert_status(
        complete(&s, &h2, &a.id).await,
        Code::PermissionDenied,
        &not_h2,
    );
    assert_status(
        delete(&s, &h2, &a.id).await,
        Code::PermissionDenied,
        &not_h2,
    );
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Attaching);

    complete(&s, &h1, &a.id).await.unwrap();
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::InUse);
    // The user's token has expired by the time the server is deleted: the
    // agent detaches on its certificate.
    delete(&s, &h1, &a.id).await.unwrap();
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Available);

    // A reservation a user made (no host yet): the agent connects it with
    // the user's token; on its certificate alone it may not.
    let r = s.attach(&member_a(), &v.id, None).await.unwrap();
    let update = |who: Caller| {
        let mut c = s.client();
        let id = r.id.clone();
        async move {
            c.update_attachment(req(
                pb::UpdateAttachmentRequest {
                    id,
                    connector: Some(connector("h1")),
                },
                &who,
            ))
            .await
        }
    };
    assert_status(
        update(h1.clone()).await,
        Code::PermissionDenied,
        &format!("attachment {} is not on host h1", r.id),
    );
    let connected = update(agent_with("h1", member_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(attach_status(&connected), pb::AttachmentStatus::Attaching);
    // Now it is on h1: the agent alone may finish it.
    complete(&s, &h1, &r.id).await.unwrap();
    delete(&s, &h1, &r.id).await.unwrap();
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Available);
}

/// An agent killed (or its call cancelled) while CreateAttachment runs:
/// the work runs in a task of its own, so the call leaves the whole
/// attachment — never a volume half-reserved — and the agent heals by
/// sending the same request again (it answers the same attachment) or by
/// listing what is on its host and deleting it.
#[tokio::test]
async fn a_cancelled_create_attachment_leaves_nothing_stuck() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "disk", 1).await;

    // Hold the volume's row so the create blocks inside the service.
    let lock = runtime::db::connect(&s.db.url).await.unwrap();
    lock.batch_execute(&format!(
        "BEGIN; SET LOCAL search_path = volume; \
         SELECT 1 FROM volumes WHERE id = '{}' FOR UPDATE",
        v.id
    ))
    .await
    .unwrap();
    let client = s.client();
    let vid = v.id.clone();
    let call = tokio::spawn(async move {
        let mut c = client;
        c.create_attachment(req(
            pb::CreateAttachmentRequest {
                volume_id: vid,
                server_id: "srv".into(),
                connector: Some(connector("h1")),
            },
            &agent("h1"),
        ))
        .await
    });
    let watch = runtime::db::connect(&s.db.url).await.unwrap();
    wait_for(
        "the create to wait on the row lock",
        Duration::from_secs(30),
        || async {
            let n: i64 = watch
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if n > 0 {
                Ok(())
            } else {
                Err(format!("{n} waiting"))
            }
        },
    )
    .await;
    // The agent goes away mid-call (the stream is reset), then the lock goes.
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    lock.batch_execute("COMMIT").await.unwrap();

    // The service finished the work for the caller that left.
    let seen = wait_for(
        "the attachment to be made",
        Duration::from_secs(30),
        || async {
            let l = list(&s, &agent("h1"), "srv").await;
            match l.as_slice() {
                [a] => Ok(a.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Attaching);
    // The same request again: the same attachment, not a refusal.
    let again = create(&s, &agent("h1"), &v.id, "srv", Some(connector("h1")))
        .await
        .unwrap();
    assert_eq!(again.id, seen.id);
    // Another server (or host) still cannot take the volume.
    assert_status(
        create(&s, &agent("h1"), &v.id, "other-srv", Some(connector("h1"))).await,
        Code::FailedPrecondition,
        &format!(
            "volume {} is attaching; only an available volume can be attached",
            v.id
        ),
    );
    // Or the agent gives up on it: what it lists on its host, it deletes.
    delete(&s, &agent("h1"), &seen.id).await.unwrap();
    assert_eq!(volume_status(&s, &v.id).await, pb::VolumeStatus::Available);
    assert!(list(&s, &agent("h1"), "srv").await.is_empty());
}
