//! The volume API against a real server: real Postgres, real `qemu-img`,
//! real files. One scenario per test; exact client messages are pinned.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::*;
use proto::volume::v1 as pb;
use runtime::testing::req;
use tonic::Code;

#[tokio::test]
async fn empty_volumes_are_sparse_files_of_their_size_and_go_with_their_volume() {
    let s = Server::start().await;
    let raw = s.create_empty(&member_a(), "raw-one", 1).await;
    assert_eq!(raw.format, pb::VolumeFormat::Raw as i32);
    assert_eq!(raw.project_id, PROJECT_A);
    assert_eq!(raw.user_id, "alice-id");
    let info = qemu_info(&s.volume_file(&raw.id));
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], GIB);
    assert!(
        info["actual-size"].as_u64().unwrap() < 1024 * 1024,
        "sparse: {info}"
    );

    let q = s
        .create(
            &member_a(),
            pb::CreateVolumeRequest {
                size_gb: 2,
                format: pb::VolumeFormat::Qcow2 as i32,
                wait: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(status(&q), pb::VolumeStatus::Available);
    let info = qemu_info(&s.volume_file(&q.id));
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 2 * GIB);
    assert_eq!(s.store_files().len(), 2);

    for v in [&raw, &q] {
        s.delete(&member_a(), &v.id).await.unwrap();
        assert_status(
            s.get(&member_a(), &v.id).await,
            Code::NotFound,
            &format!("volume {} not found", v.id),
        );
    }
    assert_eq!(s.store_files(), Vec::<String>::new());
}

#[tokio::test]
async fn create_answers_creating_at_once_and_the_volume_becomes_available() {
    let s = Server::start().await;
    let v = s
        .create(
            &member_a(),
            pb::CreateVolumeRequest {
                size_gb: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(status(&v), pb::VolumeStatus::Creating);
    let v = s.settled(&member_a(), &v.id).await;
    assert_eq!(status(&v), pb::VolumeStatus::Available);
    assert!(s.volume_file(&v.id).exists());
}

#[tokio::test]
async fn bad_input_is_refused_and_writes_nothing() {
    let s = Server::start().await;
    let create = |m: pb::CreateVolumeRequest| {
        let s = &s;
        async move { s.create(&member_a(), m).await }
    };
    assert_status(
        create(pb::CreateVolumeRequest::default()).await,
        Code::InvalidArgument,
        "size_gb: is required for an empty volume",
    );
    assert_status(
        create(pb::CreateVolumeRequest {
            size_gb: 1 << 40,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "size_gb: must be at most 16384 GiB",
    );
    assert_status(
        create(pb::CreateVolumeRequest {
            size_gb: 1,
            name: "0a0a0a0a-0a0a-4a0a-8a0a-0a0a0a0a0a0a".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "name: must not look like an id (a UUID)",
    );
    assert_status(
        create(pb::CreateVolumeRequest {
            size_gb: 1,
            format: 9,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "format: unknown format 9",
    );
    let id = uuid::Uuid::new_v4();
    assert_status(
        create(pb::CreateVolumeRequest {
            image_id: id.to_string(),
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "image_id: give an image or a snapshot, not both",
    );
    assert_status(
        create(pb::CreateVolumeRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        &format!("snapshot {id} not found"),
    );
    assert_status(
        create(pb::CreateVolumeRequest {
            snapshot_id: "nope".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "snapshot_id: is not a valid id: \"nope\"",
    );
    // No image service configured for this server.
    assert_status(
        create(pb::CreateVolumeRequest {
            image_id: id.to_string(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "this volume service has no image service configured",
    );
    assert_status(
        s.get(&member_a(), "").await,
        Code::InvalidArgument,
        "id: is required",
    );
    let list = s
        .client()
        .list_volumes(req(pb::ListVolumesRequest::default(), &admin()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.volumes.is_empty(), "{list:?}");
    assert_eq!(s.store_files(), Vec::<String>::new());
}

#[tokio::test]
async fn quotas_are_checked_in_the_transaction_of_the_create() {
    let s = Server::start().await;
    let set = pb::SetQuotaRequest {
        project_id: PROJECT_A.into(),
        max_volumes: 3,
        max_gigabytes: 4,
        max_snapshots: 1,
    };
    assert_status(
        s.client().set_quota(req(set.clone(), &member_a())).await,
        Code::PermissionDenied,
        "only an administrator may do this",
    );
    s.client().set_quota(req(set, &admin())).await.unwrap();

    let big = s.create_empty(&member_a(), "big", 3).await;
    assert_status(
        s.create(
            &member_a(),
            pb::CreateVolumeRequest {
                size_gb: 2,
                ..Default::default()
            },
        )
        .await,
        Code::ResourceExhausted,
        "2 GiB more would exceed the project's quota of 4 GiB (3 used)",
    );
    // Eight racing creates of 1 GiB for the one GiB and two volumes left:
    // exactly one fits the gigabytes.
    let mut calls = Vec::new();
    for i in 0..8 {
        let c = s.client();
        calls.push(tokio::spawn(async move {
            c.clone()
                .create_volume(req(
                    pb::CreateVolumeRequest {
                        size_gb: 1,
                        name: format!("race-{i}"),
                        wait: true,
                        ..Default::default()
                    },
                    &member_a(),
                ))
                .await
        }));
    }
    let mut won = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
    }
    assert_eq!(won, 1);
    let q = s
        .client()
        .get_quota(req(pb::GetQuotaRequest::default(), &reader_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (q.used_volumes, q.used_gigabytes, q.used_snapshots),
        (2, 4, 0)
    );
    assert_status(
        s.client()
            .get_quota(req(
                pb::GetQuotaRequest {
                    project_id: PROJECT_A.into(),
                },
                &member_b(),
            ))
            .await,
        Code::PermissionDenied,
        "only an administrator may read another project's quota",
    );

    // Snapshots count as snapshots and as gigabytes.
    s.client()
        .set_quota(req(
            pb::SetQuotaRequest {
                project_id: PROJECT_A.into(),
                max_volumes: 3,
                max_gigabytes: 100,
                max_snapshots: 1,
            },
            &admin(),
        ))
        .await
        .unwrap();
    s.snapshot(&member_a(), &big.id, false).await.unwrap();
    assert_status(
        s.snapshot(&member_a(), &big.id, false).await,
        Code::ResourceExhausted,
        "the project has 1 snapshots, its quota is 1",
    );
    s.create_empty(&member_a(), "third", 1).await;
    assert_status(
        s.create(
            &member_a(),
            pb::CreateVolumeRequest {
                size_gb: 1,
                ..Default::default()
            },
        )
        .await,
        Code::ResourceExhausted,
        "the project has 3 volumes, its quota is 3",
    );
    // The other project has its own (default) quota.
    s.create_empty(&member_b(), "b", 1).await;
}

#[tokio::test]
async fn extend_grows_an_available_volume_and_nothing_else() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "grow", 1).await;
    let grown = s
        .client()
        .extend_volume(req(
            pb::ExtendVolumeRequest {
                id: v.id.clone(),
                new_size_gb: 3,
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&grown), pb::VolumeStatus::Available);
    assert_eq!(grown.size_gb, 3);
    assert_eq!(qemu_info(&s.volume_file(&v.id))["virtual-size"], 3 * GIB);
    let extend = |size: u64| {
        let mut c = s.client();
        let id = v.id.clone();
        async move {
            c.extend_volume(req(
                pb::ExtendVolumeRequest {
                    id,
                    new_size_gb: size,
                },
                &member_a(),
            ))
            .await
        }
    };
    assert_status(
        extend(2).await,
        Code::InvalidArgument,
        "new_size_gb: must be larger than the volume's current size (3 GiB)",
    );
    assert_status(
        extend(0).await,
        Code::InvalidArgument,
        "new_size_gb: is required",
    );
    assert_status(
        s.client()
            .extend_volume(req(
                pb::ExtendVolumeRequest {
                    id: v.id.clone(),
                    new_size_gb: 4,
                },
                &reader_a(),
            ))
            .await,
        Code::PermissionDenied,
        "the caller's roles do not allow changing volumes",
    );
    let a = s.attach(&member_a(), &v.id, None).await.unwrap();
    assert_status(
        extend(4).await,
        Code::FailedPrecondition,
        &format!(
            "volume {} is reserved; only an available volume can be extended",
            v.id
        ),
    );
    complete(&s, &a.id, true).await;
    assert_status(
        extend(4).await,
        Code::FailedPrecondition,
        &format!(
            "volume {} is in-use and this store cannot grow an attached volume; detach it first",
            v.id
        ),
    );
    assert_eq!(qemu_info(&s.volume_file(&v.id))["virtual-size"], 3 * GIB);
}

/// Connects (if `connect`) and completes an attachment.
async fn complete(s: &Server, id: &str, connect: bool) -> pb::Attachment {
    if connect {
        s.client()
            .update_attachment(req(
                pb::UpdateAttachmentRequest {
                    id: id.into(),
                    connector: Some(local_connector()),
                },
                &member_a(),
            ))
            .await
            .unwrap();
    }
    s.client()
        .complete_attachment(req(
            pb::CompleteAttachmentRequest {
                id: id.into(),
                mountpoint: "vdb".into(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn attachments_walk_cinders_status_machine() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "disk", 1).await;
    let attach_status = |a: &pb::Attachment| pb::AttachmentStatus::try_from(a.status).unwrap();

    // A connector the store cannot serve refuses the attachment whole.
    assert_status(
        s.attach(
            &member_a(),
            &v.id,
            Some(pb::HostConnector {
                host: "far-away".into(),
                transports: vec![pb::Transport::Nbd as i32],
            }),
        )
        .await,
        Code::FailedPrecondition,
        "this volume store offers only local_file connections (a host sharing the store); \
         nbd exports are not offered yet",
    );
    assert_status(
        s.attach(
            &member_a(),
            &v.id,
            Some(pb::HostConnector {
                host: "h 1".into(),
                transports: vec![pb::Transport::LocalFile as i32],
            }),
        )
        .await,
        Code::InvalidArgument,
        "connector.host: must be a host name (letters, digits, - _ .)",
    );
    assert_eq!(
        status(&s.get(&member_a(), &v.id).await.unwrap()),
        pb::VolumeStatus::Available
    );

    // available -> reserved
    let a = s.attach(&member_a(), &v.id, None).await.unwrap();
    assert_eq!(attach_status(&a), pb::AttachmentStatus::Reserved);
    let got = s.get(&member_a(), &v.id).await.unwrap();
    assert_eq!(status(&got), pb::VolumeStatus::Reserved);
    assert_eq!(got.attachment_id, a.id);
    let complete_req = || {
        let mut c = s.client();
        let id = a.id.clone();
        async move {
            c.complete_attachment(req(
                pb::CompleteAttachmentRequest {
                    id,
                    mountpoint: "vdb".into(),
                },
                &member_a(),
            ))
            .await
        }
    };
    assert_status(
        complete_req().await,
        Code::FailedPrecondition,
        &format!(
            "attachment {} is reserved; only an attaching attachment (one with a connector) can be completed",
            a.id
        ),
    );

    // reserved -> attaching, with connection info
    let a2 = s
        .client()
        .update_attachment(req(
            pb::UpdateAttachmentRequest {
                id: a.id.clone(),
                connector: Some(local_connector()),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(attach_status(&a2), pb::AttachmentStatus::Attaching);
    let info = a2.connection_info.unwrap();
    assert_eq!(info.transport, pb::Transport::LocalFile as i32);
    assert_eq!(info.format, pb::VolumeFormat::Raw as i32);
    match info.target {
        Some(pb::connection_info::Target::LocalFile(f)) => {
            assert_eq!(
                std::path::Path::new(&f.path),
                s.volume_file(&v.id).canonicalize().unwrap()
            );
        }
        other => panic!("expected a local file, got {other:?}"),
    }
    assert_eq!(
        status(&s.get(&member_a(), &v.id).await.unwrap()),
        pb::VolumeStatus::Attaching
    );

    // attaching -> in-use
    let done = complete_req().await.unwrap().into_inner();
    assert_eq!(attach_status(&done), pb::AttachmentStatus::Attached);
    assert_eq!(done.mountpoint, "vdb");
    assert_eq!(
        status(&s.get(&member_a(), &v.id).await.unwrap()),
        pb::VolumeStatus::InUse
    );

    // Refusals while in use.
    assert_status(
        s.attach(&member_a(), &v.id, None).await,
        Code::FailedPrecondition,
        &format!(
            "volume {} is in-use; only an available volume can be attached",
            v.id
        ),
    );
    assert_status(
        s.delete(&member_a(), &v.id).await,
        Code::FailedPrecondition,
        &format!("volume {} is attached; detach it first", v.id),
    );
    let listed = s
        .client()
        .list_attachments(req(
            pb::ListAttachmentsRequest {
                volume_id: v.id.clone(),
                ..Default::default()
            },
            &reader_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.attachments.len(), 1);

    // in-use -> detaching -> available
    s.client()
        .delete_attachment(req(
            pb::DeleteAttachmentRequest { id: a.id.clone() },
            &member_a(),
        ))
        .await
        .unwrap();
    assert_eq!(
        status(&s.get(&member_a(), &v.id).await.unwrap()),
        pb::VolumeStatus::Available
    );
    assert_status(
        s.client()
            .get_attachment(req(
                pb::GetAttachmentRequest { id: a.id.clone() },
                &member_a(),
            ))
            .await,
        Code::NotFound,
        &format!("attachment {} not found", a.id),
    );

    // With a connector at once: available -> attaching; a reserved
    // attachment can be deleted too.
    let a3 = s
        .attach(&member_a(), &v.id, Some(local_connector()))
        .await
        .unwrap();
    assert_eq!(attach_status(&a3), pb::AttachmentStatus::Attaching);
    assert_eq!(
        status(&s.get(&member_a(), &v.id).await.unwrap()),
        pb::VolumeStatus::Attaching
    );
    s.client()
        .delete_attachment(req(
            pb::DeleteAttachmentRequest { id: a3.id.clone() },
            &member_a(),
        ))
        .await
        .unwrap();
    s.delete(&member_a(), &v.id).await.unwrap();
    assert_eq!(s.store_files(), Vec::<String>::new());
}

#[tokio::test]
async fn of_two_concurrent_attaches_exactly_one_wins() {
    let s = Server::start().await;
    for round in 0..10 {
        let v = s.create_empty(&member_a(), &format!("v{round}"), 1).await;
        let (c1, c2) = (s.client(), s.client());
        let m = |server: &str| pb::CreateAttachmentRequest {
            volume_id: v.id.clone(),
            server_id: server.into(),
            connector: None,
        };
        let (r1, r2) = tokio::join!(
            async {
                c1.clone()
                    .create_attachment(req(m("s1"), &member_a()))
                    .await
            },
            async {
                c2.clone()
                    .create_attachment(req(m("s2"), &member_a()))
                    .await
            },
        );
        let (won, lost) = match (r1, r2) {
            (Ok(a), Err(e)) | (Err(e), Ok(a)) => (a.into_inner(), e),
            other => panic!("round {round}: expected one winner, got {other:?}"),
        };
        assert_eq!(lost.code(), Code::FailedPrecondition, "{lost:?}");
        assert_eq!(
            lost.message(),
            format!(
                "volume {} is reserved; only an available volume can be attached",
                v.id
            )
        );
        let got = s.get(&member_a(), &v.id).await.unwrap();
        assert_eq!(got.attachment_id, won.id);
        assert_eq!(status(&got), pb::VolumeStatus::Reserved);
    }
}

#[tokio::test]
async fn snapshot_and_restore_round_trip_through_qcow2() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "data", 1).await;
    let first = pattern(4 * MIB, 1);
    write_into(&s.volume_file(&v.id), &first);

    let snap = s.snapshot(&member_a(), &v.id, false).await.unwrap();
    assert_eq!(snap_status(&snap), pb::SnapshotStatus::Available);
    assert_eq!(snap.size_gb, 1);
    assert_eq!(qemu_info(&s.snapshot_file(&snap.id))["format"], "qcow2");

    // The volume changes afterwards; the snapshot does not.
    write_into(&s.volume_file(&v.id), &pattern(4 * MIB, 2));
    let restored = s
        .create(
            &member_a(),
            pb::CreateVolumeRequest {
                snapshot_id: snap.id.clone(),
                format: pb::VolumeFormat::Qcow2 as i32,
                wait: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        status(&restored),
        pb::VolumeStatus::Available,
        "{restored:?}"
    );
    assert_eq!(restored.size_gb, 1);
    assert_eq!(restored.source_snapshot_id, snap.id);
    assert_holds(&s.volume_file(&restored.id), &first, GIB);
    // A bigger restore keeps the bytes and zero-fills the rest.
    let bigger = s
        .create(
            &member_a(),
            pb::CreateVolumeRequest {
                snapshot_id: snap.id.clone(),
                size_gb: 2,
                wait: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_holds(&s.volume_file(&bigger.id), &first, 2 * GIB);

    assert_status(
        s.delete(&member_a(), &v.id).await,
        Code::FailedPrecondition,
        &format!("volume {} has 1 snapshot(s); delete them first", v.id),
    );
    // In use: only with force.
    let a = s
        .attach(&member_a(), &v.id, Some(local_connector()))
        .await
        .unwrap();
    complete(&s, &a.id, false).await;
    assert_status(
        s.snapshot(&member_a(), &v.id, false).await,
        Code::FailedPrecondition,
        &format!(
            "volume {} is in-use; set force to snapshot an attached volume",
            v.id
        ),
    );
    let forced = s.snapshot(&member_a(), &v.id, true).await.unwrap();
    assert_eq!(snap_status(&forced), pb::SnapshotStatus::Available);

    let listed = s
        .client()
        .list_snapshots(req(
            pb::ListSnapshotsRequest {
                volume_id: v.id.clone(),
                ..Default::default()
            },
            &reader_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: HashSet<String> = listed.snapshots.into_iter().map(|s| s.id).collect();
    assert_eq!(ids, HashSet::from([snap.id.clone(), forced.id.clone()]));

    for id in [&snap.id, &forced.id] {
        s.client()
            .delete_snapshot(req(
                pb::DeleteSnapshotRequest { id: id.clone() },
                &member_a(),
            ))
            .await
            .unwrap();
        assert!(!s.snapshot_file(id).exists());
    }
    assert_status(
        s.create(
            &member_a(),
            pb::CreateVolumeRequest {
                snapshot_id: snap.id.clone(),
                ..Default::default()
            },
        )
        .await,
        Code::NotFound,
        &format!("snapshot {} not found", snap.id),
    );
}

#[tokio::test]
async fn a_restore_smaller_than_its_snapshot_is_refused() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "two", 2).await;
    let snap = s.snapshot(&member_a(), &v.id, false).await.unwrap();
    assert_status(
        s.create(
            &member_a(),
            pb::CreateVolumeRequest {
                snapshot_id: snap.id.clone(),
                size_gb: 1,
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "size_gb: must be at least 2 GiB, the size of the source",
    );
}

#[tokio::test]
async fn another_projects_member_cannot_see_attach_or_delete() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "private", 1).await;
    let snap = s.snapshot(&member_a(), &v.id, false).await.unwrap();
    let nf = format!("volume {} not found", v.id);
    let b = member_b();
    assert_status(s.get(&b, &v.id).await, Code::NotFound, &nf);
    assert_status(s.attach(&b, &v.id, None).await, Code::NotFound, &nf);
    assert_status(s.delete(&b, &v.id).await, Code::NotFound, &nf);
    assert_status(s.snapshot(&b, &v.id, false).await, Code::NotFound, &nf);
    assert_status(
        s.client()
            .extend_volume(req(
                pb::ExtendVolumeRequest {
                    id: v.id.clone(),
                    new_size_gb: 2,
                },
                &b,
            ))
            .await,
        Code::NotFound,
        &nf,
    );
    assert_status(
        s.client()
            .get_snapshot(req(
                pb::GetSnapshotRequest {
                    id: snap.id.clone(),
                },
                &b,
            ))
            .await,
        Code::NotFound,
        &format!("snapshot {} not found", snap.id),
    );
    assert_status(
        s.create(
            &b,
            pb::CreateVolumeRequest {
                snapshot_id: snap.id.clone(),
                ..Default::default()
            },
        )
        .await,
        Code::NotFound,
        &format!("snapshot {} not found", snap.id),
    );
    let listed = s
        .client()
        .list_volumes(req(pb::ListVolumesRequest::default(), &b))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.volumes.is_empty());
    assert_status(
        s.client()
            .list_volumes(req(
                pb::ListVolumesRequest {
                    project_id: PROJECT_A.into(),
                    ..Default::default()
                },
                &b,
            ))
            .await,
        Code::PermissionDenied,
        "only an administrator may list another project's volumes",
    );

    // The attachment of A's volume is A's too.
    let a = s.attach(&member_a(), &v.id, None).await.unwrap();
    assert_status(
        s.client()
            .delete_attachment(req(pb::DeleteAttachmentRequest { id: a.id.clone() }, &b))
            .await,
        Code::NotFound,
        &format!("attachment {} not found", a.id),
    );

    // A reader of A sees, and may not change.
    assert_eq!(s.get(&reader_a(), &v.id).await.unwrap().id, v.id);
    let denied = "the caller's roles do not allow changing volumes";
    assert_status(
        s.create(
            &reader_a(),
            pb::CreateVolumeRequest {
                size_gb: 1,
                ..Default::default()
            },
        )
        .await,
        Code::PermissionDenied,
        denied,
    );
    assert_status(
        s.delete(&reader_a(), &v.id).await,
        Code::PermissionDenied,
        denied,
    );
    assert_status(
        s.client()
            .delete_attachment(req(
                pb::DeleteAttachmentRequest { id: a.id.clone() },
                &reader_a(),
            ))
            .await,
        Code::PermissionDenied,
        denied,
    );
    // An administrator sees and changes everything.
    assert_eq!(s.get(&admin(), &v.id).await.unwrap().id, v.id);
    s.client()
        .delete_attachment(req(
            pb::DeleteAttachmentRequest { id: a.id.clone() },
            &admin(),
        ))
        .await
        .unwrap();
    // Nobody at all: the sidecar was bypassed.
    assert_status(
        s.get(&nobody(), &v.id).await,
        Code::Unauthenticated,
        "authentication failed",
    );
    assert_eq!(s.get(&member_a(), &v.id).await.unwrap().id, v.id);
}

#[tokio::test]
async fn list_filters_and_pages_newest_first() {
    let s = Server::start().await;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(s.create_empty(&member_a(), &format!("v{i}"), 1).await.id);
    }
    s.create_empty(&member_b(), "b's", 1).await;
    let mut seen = Vec::new();
    let mut marker = String::new();
    loop {
        let page = s
            .client()
            .list_volumes(req(
                pb::ListVolumesRequest {
                    limit: 2,
                    marker: marker.clone(),
                    ..Default::default()
                },
                &member_a(),
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.volumes.len() <= 2);
        seen.extend(page.volumes.into_iter().map(|v| v.id));
        if page.next_marker.is_empty() {
            break;
        }
        marker = page.next_marker;
    }
    made.reverse();
    assert_eq!(seen, made);
    let named = s
        .client()
        .list_volumes(req(
            pb::ListVolumesRequest {
                name: Some("v3".into()),
                status: pb::VolumeStatus::Available as i32,
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(named.volumes.len(), 1);
    let all = s
        .client()
        .list_volumes(req(pb::ListVolumesRequest::default(), &admin()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.volumes.len(), 6);
    assert_status(
        s.client()
            .list_volumes(req(
                pb::ListVolumesRequest {
                    limit: 5000,
                    ..Default::default()
                },
                &member_a(),
            ))
            .await,
        Code::InvalidArgument,
        "limit: must be at most 1000",
    );
}

#[tokio::test]
async fn update_changes_name_description_metadata_and_bootable() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "before", 1).await;
    assert!(!v.bootable);
    let u = s
        .client()
        .update_volume(req(
            pb::UpdateVolumeRequest {
                id: v.id.clone(),
                name: Some("after".into()),
                description: Some("a disk".into()),
                bootable: Some(true),
                set_metadata: [("tier".to_string(), "gold".to_string())].into(),
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (u.name.as_str(), u.description.as_str(), u.bootable),
        ("after", "a disk", true)
    );
    assert_eq!(u.metadata.get("tier").map(String::as_str), Some("gold"));
    let u = s
        .client()
        .update_volume(req(
            pb::UpdateVolumeRequest {
                id: v.id.clone(),
                remove_metadata: vec!["tier".into()],
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(u.metadata.is_empty());
    assert_eq!(u.name, "after");
}

#[tokio::test]
async fn a_database_failure_reads_exactly_internal_error() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "v", 1).await;
    s.sql("ALTER TABLE volumes RENAME TO volumes_gone").await;
    assert_status(
        s.get(&member_a(), &v.id).await,
        Code::Internal,
        "internal error",
    );
    assert_status(
        s.create(
            &member_a(),
            pb::CreateVolumeRequest {
                size_gb: 1,
                ..Default::default()
            },
        )
        .await,
        Code::Internal,
        "internal error",
    );
    s.sql("ALTER TABLE volumes_gone RENAME TO volumes").await;
    assert_eq!(s.get(&member_a(), &v.id).await.unwrap().id, v.id);
}

#[tokio::test]
async fn a_restart_heals_what_a_crash_left() {
    let s = Server::start().await;
    let kept = s.create_empty(&member_a(), "kept", 1).await;
    let creating = s.create_empty(&member_a(), "was-creating", 1).await;
    let deleting = s.create_empty(&member_a(), "was-deleting", 1).await;
    let detaching = s.create_empty(&member_a(), "was-detaching", 1).await;
    let extending = s.create_empty(&member_a(), "was-extending", 1).await;
    let snap_src = s.create_empty(&member_a(), "snap-source", 1).await;
    let snap = s.snapshot(&member_a(), &snap_src.id, false).await.unwrap();
    let a = s
        .attach(&member_a(), &detaching.id, Some(local_connector()))
        .await
        .unwrap();
    complete(&s, &a.id, false).await;
    let (db, dir, image, config) = s.stop().await;

    // What a SIGKILL at the worst moments leaves behind: statuses mid-way,
    // a partial temporary file, a stray file of no volume.
    let c = runtime::db::connect(&db.url).await.unwrap();
    c.batch_execute(&format!(
        "SET search_path = volume;
         UPDATE volumes SET status = 'creating' WHERE id = '{}';
         UPDATE volumes SET status = 'deleting' WHERE id = '{}';
         UPDATE volumes SET status = 'detaching' WHERE id = '{}';
         UPDATE attachments SET status = 'detaching' WHERE id = '{}';
         UPDATE volumes SET status = 'extending' WHERE id = '{}';
         UPDATE snapshots SET status = 'creating' WHERE id = '{}';
         UPDATE volumes SET snapshots_copying = 1 WHERE id = '{}';",
        creating.id, deleting.id, detaching.id, a.id, extending.id, snap.id, snap_src.id
    ))
    .await
    .unwrap();
    let store = config.store.dir.clone();
    std::fs::write(
        store
            .join("tmp")
            .join(format!("{}.x.part", uuid::Uuid::new_v4())),
        b"half",
    )
    .unwrap();
    std::fs::write(
        store.join("volumes").join(uuid::Uuid::new_v4().to_string()),
        b"stray",
    )
    .unwrap();

    let s = Server::serve(db, dir, image, config).await;
    let got = |id: String| {
        let s = &s;
        async move { s.get(&member_a(), &id).await }
    };
    let v = got(creating.id.clone()).await.unwrap();
    assert_eq!(status(&v), pb::VolumeStatus::Error);
    assert_eq!(
        v.status_reason,
        "interrupted by a restart of the volume service"
    );
    assert!(!s.volume_file(&creating.id).exists());
    assert_code(got(deleting.id.clone()).await, Code::NotFound);
    assert_eq!(
        status(&got(detaching.id.clone()).await.unwrap()),
        pb::VolumeStatus::Available
    );
    assert_eq!(
        status(&got(extending.id.clone()).await.unwrap()),
        pb::VolumeStatus::Error
    );
    let sn = s
        .client()
        .get_snapshot(req(
            pb::GetSnapshotRequest {
                id: snap.id.clone(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap_status(&sn), pb::SnapshotStatus::Error);

    let mut want = vec![
        format!("volumes/{}", kept.id),
        format!("volumes/{}", detaching.id),
        format!("volumes/{}", extending.id),
        format!("volumes/{}", snap_src.id),
    ];
    want.sort();
    assert_eq!(s.store_files(), want);

    // Error volumes and snapshots can be deleted; the source extends again.
    s.client()
        .delete_snapshot(req(
            pb::DeleteSnapshotRequest {
                id: snap.id.clone(),
            },
            &member_a(),
        ))
        .await
        .unwrap();
    s.delete(&member_a(), &creating.id).await.unwrap();
    s.delete(&member_a(), &extending.id).await.unwrap();
    s.client()
        .extend_volume(req(
            pb::ExtendVolumeRequest {
                id: snap_src.id.clone(),
                new_size_gb: 2,
            },
            &member_a(),
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_file_that_cannot_be_removed_leaves_error_deleting_and_a_retry_finishes() {
    let s = Server::start().await;
    let v = s.create_empty(&member_a(), "stuck", 1).await;
    // A directory in the file's place: the store's remove fails, as a
    // failing disk would.
    let file = s.volume_file(&v.id);
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    std::fs::write(file.join("busy"), b"x").unwrap();
    assert_status(
        s.delete(&member_a(), &v.id).await,
        Code::Internal,
        "internal error",
    );
    let got = s.get(&member_a(), &v.id).await.unwrap();
    assert_eq!(status(&got), pb::VolumeStatus::ErrorDeleting);
    assert_eq!(got.status_reason, "the operation failed (internal error)");
    // Once the disk is fixed, deleting again finishes the job.
    std::fs::remove_dir_all(&file).unwrap();
    s.delete(&member_a(), &v.id).await.unwrap();
    assert_code(s.get(&member_a(), &v.id).await, Code::NotFound);

    let v = s.create_empty(&member_a(), "with-snap", 1).await;
    let snap = s.snapshot(&member_a(), &v.id, false).await.unwrap();
    let sfile = s.snapshot_file(&snap.id);
    std::fs::remove_file(&sfile).unwrap();
    std::fs::create_dir(&sfile).unwrap();
    std::fs::write(sfile.join("busy"), b"x").unwrap();
    let del = |id: String| {
        let mut c = s.client();
        async move {
            c.delete_snapshot(req(pb::DeleteSnapshotRequest { id }, &member_a()))
                .await
        }
    };
    assert_status(del(snap.id.clone()).await, Code::Internal, "internal error");
    let got = s
        .client()
        .get_snapshot(req(
            pb::GetSnapshotRequest {
                id: snap.id.clone(),
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap_status(&got), pb::SnapshotStatus::ErrorDeleting);
    std::fs::remove_dir_all(&sfile).unwrap();
    del(snap.id.clone()).await.unwrap();
    s.delete(&member_a(), &v.id).await.unwrap();
    assert_eq!(s.store_files(), Vec::<String>::new());
}

#[tokio::test]
async fn waiting_callers_never_starve_the_tasks_of_database_connections() {
    // Twice as many waiting creates, snapshots and extends as connections.
    let s = Server::start_with(false, |c| c.database.pool_size = 2).await;
    let v = s.create_empty(&member_a(), "base", 1).await;
    let mut calls = Vec::new();
    for i in 0..4 {
        let c = s.client();
        calls.push(tokio::spawn(async move {
            c.clone()
                .create_volume(req(
                    pb::CreateVolumeRequest {
                        size_gb: 1,
                        name: format!("w{i}"),
                        wait: true,
                        ..Default::default()
                    },
                    &member_a(),
                ))
                .await
                .map(drop)
        }));
    }
    let c = s.client();
    let id = v.id.clone();
    calls.push(tokio::spawn(async move {
        c.clone()
            .create_snapshot(req(
                pb::CreateSnapshotRequest {
                    volume_id: id,
                    wait: true,
                    ..Default::default()
                },
                &member_a(),
            ))
            .await
            .map(drop)
    }));
    for c in calls {
        c.await.unwrap().unwrap();
    }
    s.client()
        .extend_volume(req(
            pb::ExtendVolumeRequest {
                id: v.id.clone(),
                new_size_gb: 2,
            },
            &member_a(),
        ))
        .await
        .unwrap();
}
