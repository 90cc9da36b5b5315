//! Upload and download: the life cycle, checks of size and checksum,
//! quotas enforced while the bytes stream, a client that drops its stream,
//! and start-up recovery after a crash.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use proto::image::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn upload_then_download_round_trips_with_sha256() {
    let s = Server::start().await;
    let data = pattern(5 * 1024 * 1024 + 123, 1);
    let sum = sha256_hex(&data);
    let img = s
        .create(
            &owner(),
            pb::CreateImageRequest {
                expected_size: Some(data.len() as u64),
                expected_sha256: sum.clone(),
                ..raw("disk")
            },
        )
        .await
        .unwrap();
    let done = s
        .upload(&owner(), &img.id, &data, 256 * 1024 + 7)
        .await
        .unwrap();
    assert_eq!(status_of(&done), pb::Status::Active);
    assert_eq!(done.size, Some(data.len() as u64));
    assert_eq!(done.sha256, sum);
    assert_eq!(s.get(&reader(), &img.id).await.unwrap(), done);

    // The whole image, by the owner, a reader, and (public) nobody else.
    let back = s.download(&reader(), &img.id, 0, None).await.unwrap();
    assert_eq!(sha256_hex(&back), sum);
    assert_code(s.download(&other(), &img.id, 0, None).await, Code::NotFound);

    // Ranges.
    let part = s
        .download(&owner(), &img.id, 1_000_000, Some(3_000_000))
        .await
        .unwrap();
    assert_eq!(part, &data[1_000_000..4_000_000]);
    let tail = s
        .download(&owner(), &img.id, data.len() as u64 - 10, Some(1000))
        .await
        .unwrap();
    assert_eq!(tail, &data[data.len() - 10..]);
    let empty = s
        .download(&owner(), &img.id, data.len() as u64, None)
        .await
        .unwrap();
    assert!(empty.is_empty());
    assert_code(
        s.download(&owner(), &img.id, data.len() as u64 + 1, None)
            .await,
        Code::OutOfRange,
    );

    // Data goes in once: an active image refuses a second upload.
    assert_code(
        s.upload(&owner(), &img.id, b"again", 5).await,
        Code::FailedPrecondition,
    );
    // One file in the store, nothing temporary.
    assert_eq!(s.store_files().len(), 1);

    // Deactivated: only an admin downloads; reactivated: everyone again.
    let r = pb::ImageRef { id: img.id.clone() };
    let d = s
        .client()
        .deactivate_image(req(r.clone(), &admin()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&d), pb::Status::Deactivated);
    assert_code(
        s.download(&owner(), &img.id, 0, Some(10)).await,
        Code::FailedPrecondition,
    );
    assert_eq!(
        s.download(&admin(), &img.id, 0, Some(10)).await.unwrap(),
        &data[..10]
    );
    assert_code(
        s.client().reactivate_image(req(r.clone(), &owner())).await,
        Code::PermissionDenied,
    );
    let a = s
        .client()
        .reactivate_image(req(r, &admin()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&a), pb::Status::Active);
    assert_eq!(
        s.download(&owner(), &img.id, 0, Some(10)).await.unwrap(),
        &data[..10]
    );

    // Delete: the bytes go too.
    s.client()
        .delete_image(req(pb::DeleteImageRequest { id: img.id.clone() }, &owner()))
        .await
        .unwrap();
    assert!(s.store_files().is_empty(), "{:?}", s.store_files());
    assert_code(s.download(&owner(), &img.id, 0, None).await, Code::NotFound);
}

#[tokio::test]
async fn without_declarations_any_size_is_accepted_and_queued_images_have_no_data() {
    let s = Server::start().await;
    let img = s.create_raw(&owner(), "free").await;
    assert_code(
        s.download(&owner(), &img.id, 0, None).await,
        Code::FailedPrecondition,
    );
    let data = pattern(100_000, 2);
    let done = s.upload(&owner(), &img.id, &data, 4096).await.unwrap();
    assert_eq!(done.size, Some(100_000));
    assert_eq!(done.sha256, sha256_hex(&data));
    // An empty upload message stream is refused clearly.
    let other_img = s.create_raw(&owner(), "empty").await;
    assert_status(
        s.client()
            .upload(req(
                tokio_stream::iter(Vec::<pb::UploadRequest>::new()),
                &owner(),
            ))
            .await,
        Code::InvalidArgument,
        "image_id: an upload needs at least one message, naming the image",
    );
    // A first message without an image id.
    assert_code(
        s.client()
            .upload(req(
                tokio_stream::iter(vec![pb::UploadRequest::default()]),
                &owner(),
            ))
            .await,
        Code::InvalidArgument,
    );
    // Messages that change image half-way abort the upload; the image is queued again.
    let mut msgs = upload_messages(&other_img.id, &data, 1000);
    msgs[3].image_id = img.id.clone();
    assert_code(
        s.client()
            .upload(req(tokio_stream::iter(msgs), &owner()))
            .await,
        Code::Aborted,
    );
    let again = s.get(&owner(), &other_img.id).await.unwrap();
    assert_eq!(status_of(&again), pb::Status::Queued);
    // A zero-byte raw image is allowed (Glance allows it too).
    let done = s.upload(&owner(), &other_img.id, b"", 1).await.unwrap();
    assert_eq!(done.size, Some(0));
}

#[tokio::test]
async fn wrong_size_or_checksum_kills_the_image_and_removes_the_bytes() {
    let s = Server::start().await;
    let data = pattern(300_000, 3);
    let cases = [
        ("short", Some(data.len() as u64 + 1), String::new()),
        ("long", Some(data.len() as u64 - 1), String::new()),
        ("checksum", None, "00".repeat(32)),
    ];
    for (what, size, sum) in cases {
        let img = s
            .create(
                &owner(),
                pb::CreateImageRequest {
                    expected_size: size,
                    expected_sha256: sum,
                    ..raw(what)
                },
            )
            .await
            .unwrap();
        let st = s
            .upload(&owner(), &img.id, &data, 10_000)
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{what}: {st:?}");
        assert!(
            st.message()
                .starts_with("data: refused, the image is killed: "),
            "{what}: {st:?}"
        );
        let after = s.get(&owner(), &img.id).await.unwrap();
        assert_eq!(status_of(&after), pb::Status::Killed, "{what}");
        assert_eq!(after.size, None);
        assert!(s.store_files().is_empty(), "{what}: {:?}", s.store_files());
        // Killed is final for data.
        assert_code(
            s.upload(&owner(), &img.id, &data, 10_000).await,
            Code::FailedPrecondition,
        );
        assert_code(
            s.download(&owner(), &img.id, 0, None).await,
            Code::FailedPrecondition,
        );
    }
}

#[tokio::test]
async fn byte_quota_is_enforced_while_the_upload_streams() {
    let s = Server::start_with(|c| c.quota_bytes = 1_000_000).await;
    let first = s.create_raw(&owner(), "first").await;
    s.upload(&owner(), &first.id, &pattern(600_000, 4), 50_000)
        .await
        .unwrap();
    let second = s.create_raw(&owner(), "second").await;
    assert_status(
        s.upload(&owner(), &second.id, &pattern(600_000, 5), 50_000)
            .await,
        Code::ResourceExhausted,
        "the upload exceeds the project's quota of 1000000 bytes (600000 stored)",
    );
    // Not killed: the bytes were fine, there was no room. Queued, bytes gone.
    assert_eq!(
        status_of(&s.get(&owner(), &second.id).await.unwrap()),
        pb::Status::Queued
    );
    assert_eq!(s.store_files().len(), 1);
    // Another project is not charged.
    let b = s.create_raw(&other(), "b").await;
    s.upload(&other(), &b.id, &pattern(600_000, 6), 50_000)
        .await
        .unwrap();
    // After a delete there is room again.
    s.client()
        .delete_image(req(
            pb::DeleteImageRequest {
                id: first.id.clone(),
            },
            &owner(),
        ))
        .await
        .unwrap();
    s.upload(&owner(), &second.id, &pattern(600_000, 5), 50_000)
        .await
        .unwrap();
    let q = s
        .client()
        .get_quota(req(pb::GetQuotaRequest::default(), &owner()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (q.used_bytes, q.used_images, q.max_bytes),
        (600_000, 1, 1_000_000)
    );
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dropped_upload_stream_leaves_the_image_queued_and_no_bytes() {
    let s = Server::start().await;
    let img = s.create_raw(&owner(), "dropped").await;
    // The client talks through a relay that the test cuts, as a client
    // process that dies takes its connection with it.
    let relay = Relay::start(s.addr).await;
    let (tx, call) = open_upload(
        proto::image::v1::images_client::ImagesClient::new(relay.channel()),
        &owner(),
        4,
    );
    tx.send(pb::UploadRequest {
        image_id: img.id.clone(),
        data: pattern(512 * 1024, 7).into(),
    })
    .await
    .unwrap();
    for i in 0..4 {
        tx.send(pb::UploadRequest {
            image_id: String::new(),
            data: pattern(512 * 1024, i).into(),
        })
        .await
        .unwrap();
    }
    // The server is saving, with a partial file in tmp/.
    eventually("the image to be saving", async || {
        status_of(&s.get(&owner(), &img.id).await.unwrap()) == pb::Status::Saving
    })
    .await;
    eventually("a partial file", async || !s.store_files().is_empty()).await;
    // The client goes away in the middle, its stream unfinished.
    relay.cut();
    let r = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err(), "{r:?}");
    eventually("the image to be queued again", async || {
        status_of(&s.get(&owner(), &img.id).await.unwrap()) == pb::Status::Queued
    })
    .await;
    eventually("the partial bytes to go", async || {
        s.store_files().is_empty()
    })
    .await;
    // And it can be uploaded afresh.
    let data = pattern(100_000, 8);
    let done = s.upload(&owner(), &img.id, &data, 10_000).await.unwrap();
    assert_eq!(done.sha256, sha256_hex(&data));
    drop(tx);
}

#[tokio::test]
async fn an_idle_upload_is_abandoned() {
    let s = Server::start_with(|c| c.upload_idle_timeout_secs = 1).await;
    let img = s.create_raw(&owner(), "idle").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(4);
    tx.send(pb::UploadRequest {
        image_id: img.id.clone(),
        data: pattern(1000, 9).into(),
    })
    .await
    .unwrap();
    // The client holds the stream open and sends nothing more.
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        s.client().upload(req(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &owner(),
        )),
    )
    .await
    .expect("the server gave up within 20 s");
    assert_status(r, Code::Aborted, "no upload data for 1 s");
    drop(tx);
    assert_eq!(
        status_of(&s.get(&owner(), &img.id).await.unwrap()),
        pb::Status::Queued
    );
    assert!(s.store_files().is_empty());
}

#[tokio::test]
async fn deleting_an_image_while_it_uploads_leaves_nothing() {
    let s = Server::start().await;
    let img = s.create_raw(&owner(), "racing").await;
    let (tx, call) = open_upload(s.client(), &owner(), 4);
    tx.send(pb::UploadRequest {
        image_id: img.id.clone(),
        data: pattern(100_000, 10).into(),
    })
    .await
    .unwrap();
    eventually("saving", async || {
        status_of(&s.get(&owner(), &img.id).await.unwrap()) == pb::Status::Saving
    })
    .await;
    s.client()
        .delete_image(req(pb::DeleteImageRequest { id: img.id.clone() }, &owner()))
        .await
        .unwrap();
    drop(tx); // the client finishes its stream normally
    let r = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap()
        .unwrap();
    assert_code(r, Code::NotFound);
    assert!(s.store_files().is_empty(), "{:?}", s.store_files());
}

#[tokio::test]
async fn start_up_heals_what_a_crash_left() {
    let s = Server::start().await;
    let kept = s.create_raw(&owner(), "kept").await;
    let data = pattern(200_000, 11);
    s.upload(&owner(), &kept.id, &data, 50_000).await.unwrap();
    let interrupted = s.create_raw(&owner(), "interrupted").await;
    let (db, store, config) = s.stop().await;

    // What a crash in the middle of an upload leaves: the record SAVING,
    // a partial temporary file, and even a renamed file whose record never
    // became active; and the file of an image whose record was deleted.
    let client = runtime::db::connect(&db.url).await.unwrap();
    client
        .execute(
            "UPDATE image.images SET status = 'saving' WHERE id = $1",
            &[&uuid::Uuid::parse_str(&interrupted.id).unwrap()],
        )
        .await
        .unwrap();
    let dir = config.store_dir.clone();
    std::fs::write(
        dir.join("tmp").join(format!("{}.abc.part", interrupted.id)),
        b"half",
    )
    .unwrap();
    std::fs::write(
        dir.join("images").join(&interrupted.id),
        b"whole but unrecorded",
    )
    .unwrap();
    std::fs::write(
        dir.join("images").join(uuid::Uuid::new_v4().to_string()),
        b"deleted",
    )
    .unwrap();

    let s = Server::serve(db, store, config).await;
    let healed = s.get(&owner(), &interrupted.id).await.unwrap();
    assert_eq!(status_of(&healed), pb::Status::Queued);
    let files = s.store_files();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with(&kept.id));
    assert_eq!(
        sha256_hex(&s.download(&owner(), &kept.id, 0, None).await.unwrap()),
        sha256_hex(&data)
    );
    // The healed image takes an upload again.
    s.upload(&owner(), &interrupted.id, &data, 50_000)
        .await
        .unwrap();
    // Recovery is idempotent.
    assert_eq!(
        s.images.recover().await.unwrap(),
        image::Recovered::default()
    );
}
