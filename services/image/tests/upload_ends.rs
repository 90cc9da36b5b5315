//! What ends an upload (issue 12, item 1): only a stream that ends cleanly,
//! END_STREAM after its last message with no error from the transport, may
//! finish an upload. A client that cancels, resets its stream with any
//! reason, or lets its deadline pass leaves the image QUEUED with no bytes
//! kept, and a re-upload then works. Compute agents boot these bytes: a
//! truncated image must never become ACTIVE.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::raw::RawCall;
use common::*;
use prost::Message;
use proto::image::v1 as pb;
use runtime::testing::{assert_status, wait_for};
use tonic::Code;

const STREAM_FAILED: &str = "the upload stream ended without finishing \
     (cancelled, reset or past its deadline): the image is queued again";

/// Waits (bounded) until the image has left SAVING and returns it.
async fn settled(s: &Server, id: &str) -> pb::Image {
    wait_for("the upload to end", Duration::from_secs(20), || async {
        let i = s.get(&owner(), id).await.map_err(|e| e.to_string())?;
        if status_of(&i) == pb::Status::Saving {
            Err(format!("{i:?}"))
        } else {
            Ok(i)
        }
    })
    .await
}

/// Waits (bounded) until the server is saving `id` and holds a partial file.
async fn saving(s: &Server, id: &str) {
    wait_for("a partial upload", Duration::from_secs(20), || async {
        let i = s.get(&owner(), id).await.map_err(|e| e.to_string())?;
        let files = s.store_files();
        let partial = files
            .iter()
            .any(|f| f.parent().is_some_and(|p| p.ends_with("tmp")));
        if status_of(&i) == pb::Status::Saving && partial {
            Ok(())
        } else {
            Err(format!("{:?}, files {files:?}", status_of(&i)))
        }
    })
    .await
}

/// The image is QUEUED, the store holds nothing, and a whole upload works.
async fn queued_and_reusable(s: &Server, id: &str) {
    let i = settled(s, id).await;
    assert_eq!(status_of(&i), pb::Status::Queued, "{i:?}");
    assert_eq!((i.size, i.sha256.as_str()), (None, ""), "{i:?}");
    wait_for(
        "the partial bytes to go",
        Duration::from_secs(20),
        || async {
            // Nothing of this image, and no partial file of any upload.
            let files = s.store_files();
            let left: Vec<_> = files
                .iter()
                .filter(|f| f.ends_with(id) || f.parent().is_some_and(|p| p.ends_with("tmp")))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    let data = pattern(300_000, 99);
    let done = s.upload(&owner(), id, &data, 64 * 1024).await.unwrap();
    assert_eq!(status_of(&done), pb::Status::Active);
    assert_eq!(done.sha256, sha256_hex(&data));
    assert_eq!(s.download(&owner(), id, 0, None).await.unwrap(), data);
}

fn chunk(id: &str, seed: u8) -> pb::UploadRequest {
    pb::UploadRequest {
        image_id: id.into(),
        data: pattern(64 * 1024, seed).into(),
    }
}

#[tokio::test]
async fn a_client_that_cancels_its_stream_midway_leaves_the_image_queued() {
    let s = Server::start().await;
    let img = s.create_raw(&owner(), "cancelled").await;
    let (tx, call) = open_upload(s.client(), &owner(), 4);
    tx.send(chunk(&img.id, 1)).await.unwrap();
    tx.send(chunk("", 2)).await.unwrap();
    saving(&s, &img.id).await;
    // Dropping the call is how a tonic (or grpcio) client cancels: the
    // stream is reset with CANCEL, never ended with END_STREAM.
    call.abort();
    queued_and_reusable(&s, &img.id).await;
    drop(tx);
}

#[tokio::test]
async fn a_reset_stream_never_finishes_an_upload_whatever_its_reason() {
    let s = Server::start().await;
    for (n, reason) in [
        h2::Reason::CANCEL,
        h2::Reason::NO_ERROR,
        h2::Reason::INTERNAL_ERROR,
    ]
    .into_iter()
    .enumerate()
    {
        let img = s.create_raw(&owner(), &format!("reset-{n}")).await;
        let mut call = RawCall::open(s.addr, "/image.v1.Images/Upload", &owner()).await;
        call.send_message(&chunk(&img.id, 3).encode_to_vec(), false);
        call.send_message(&chunk("", 4).encode_to_vec(), false);
        saving(&s, &img.id).await;
        // Whole messages only: the server cannot tell from the bytes that
        // anything is missing; only the reset says so.
        call.reset(reason);
        queued_and_reusable(&s, &img.id).await;
    }
}

#[tokio::test]
async fn a_reset_with_a_declared_size_also_leaves_the_image_queued() {
    let s = Server::start().await;
    let mut m = raw("declared");
    m.expected_size = Some(10 * 64 * 1024);
    let img = s.create(&owner(), m).await.unwrap();
    let mut call = RawCall::open(s.addr, "/image.v1.Images/Upload", &owner()).await;
    call.send_message(&chunk(&img.id, 5).encode_to_vec(), false);
    saving(&s, &img.id).await;
    call.reset(h2::Reason::NO_ERROR);
    let i = settled(&s, &img.id).await;
    // Not KILLED: nothing is known about the bytes, only that the transfer
    // failed; the owner may try again.
    assert_eq!(status_of(&i), pb::Status::Queued, "{i:?}");
    let data = pattern(10 * 64 * 1024, 6);
    s.upload(&owner(), &img.id, &data, 64 * 1024).await.unwrap();
}

#[tokio::test]
async fn a_client_whose_deadline_expires_midway_leaves_the_image_queued() {
    let s = Server::start().await;
    let img = s.create_raw(&owner(), "deadline").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(4);
    tx.send(chunk(&img.id, 7)).await.unwrap();
    tx.send(chunk("", 8)).await.unwrap();
    let mut r = req(tokio_stream::wrappers::ReceiverStream::new(rx), &owner());
    r.set_timeout(Duration::from_millis(800));
    let call = tokio::time::timeout(Duration::from_secs(20), s.client().upload(r))
        .await
        .expect("the deadline ends the call");
    let st = call.unwrap_err();
    assert!(
        matches!(st.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{st:?}"
    );
    // The client, told its call is over, closes its stream as if all was sent.
    tx.send(chunk("", 9)).await.ok();
    drop(tx);
    queued_and_reusable(&s, &img.id).await;
}

#[tokio::test]
async fn the_upload_finishes_only_when_its_request_confirms_a_clean_end() {
    let s = Server::start().await;
    let data = || {
        futures_util::stream::iter(
            [pattern(1000, 1), pattern(1000, 2)].map(|b| Ok(prost::bytes::Bytes::from(b))),
        )
    };
    let id = |i: &pb::Image| uuid::Uuid::parse_str(&i.id).unwrap();
    let caller = owner();

    // The body ended with a transport error (what the adapter's body
    // watcher reports): not confirmed, nothing kept.
    let img = s.create_raw(&owner(), "unconfirmed").await;
    let (attendance, attendant) = image::service::attendance();
    let r = attendant
        .attend(
            s.images
                .upload(caller.clone(), id(&img), data(), attendance),
            || false,
        )
        .await;
    assert_status(r.map_err(tonic::Status::from), Code::Aborted, STREAM_FAILED);
    queued_and_reusable(&s, &img.id).await;

    // The request went away while the data was still coming: stopped at once.
    let img = s.create_raw(&owner(), "abandoned").await;
    let (attendance, attendant) = image::service::attendance();
    let endless = futures_util::StreamExt::chain(data(), futures_util::stream::pending());
    let upload = tokio::spawn({
        let images = s.images.clone();
        let i = id(&img);
        async move { images.upload(caller.clone(), i, endless, attendance).await }
    });
    saving(&s, &img.id).await;
    drop(attendant);
    let r = tokio::time::timeout(Duration::from_secs(20), upload)
        .await
        .expect("the upload stopped when its request went away")
        .unwrap();
    assert_status(r.map_err(tonic::Status::from), Code::Aborted, STREAM_FAILED);
    queued_and_reusable(&s, &img.id).await;

    // Confirmed: active, with every byte.
    let img = s.create_raw(&owner(), "confirmed").await;
    let (attendance, attendant) = image::service::attendance();
    let done = attendant
        .attend(
            s.images.upload(owner(), id(&img), data(), attendance),
            || true,
        )
        .await
        .unwrap();
    assert_eq!(done.status, image::model::Status::Active);
    assert_eq!(done.size, Some(2000));
}

// ------------------------------------------- through a real sidecar pair

/// A client → outbound sidecar → mTLS → inbound sidecar → image upload,
/// ended by `end` after two chunks; the image must come back QUEUED, and a
/// whole upload through the same pair must then work.
async fn through_the_pair(
    end: impl AsyncFnOnce(
        tokio::task::JoinHandle<Result<tonic::Response<pb::Image>, tonic::Status>>,
        tokio::sync::mpsc::Sender<pb::UploadRequest>,
    ),
) {
    use common::mesh::{Mesh, auth};
    let s = Server::start().await;
    let mesh = Mesh::start(s.addr).await;
    let img = mesh
        .client()
        .create_image(auth(raw("via-mesh"), &mesh.token))
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(4);
    let mut client = mesh.client();
    let token = mesh.token.clone();
    let call = tokio::spawn(async move {
        client
            .upload(auth(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                &token,
            ))
            .await
    });
    tx.send(chunk(&img.id, 11)).await.unwrap();
    tx.send(chunk("", 12)).await.unwrap();
    wait_for(
        "a partial upload behind the mesh",
        Duration::from_secs(20),
        || async {
            let i = s.get(&admin(), &img.id).await.map_err(|e| e.to_string())?;
            let partial = s
                .store_files()
                .iter()
                .any(|f| f.parent().is_some_and(|p| p.ends_with("tmp")));
            if status_of(&i) == pb::Status::Saving && partial {
                Ok(())
            } else {
                Err(format!("{i:?}"))
            }
        },
    )
    .await;
    end(call, tx).await;
    let i = wait_for("the upload to end", Duration::from_secs(20), || async {
        let i = s.get(&admin(), &img.id).await.map_err(|e| e.to_string())?;
        if status_of(&i) == pb::Status::Saving {
            Err(format!("{i:?}"))
        } else {
            Ok(i)
        }
    })
    .await;
    assert_eq!(status_of(&i), pb::Status::Queued, "{i:?}");
    wait_for("no partial bytes", Duration::from_secs(20), || async {
        let files = s.store_files();
        if files.is_empty() {
            Ok(())
        } else {
            Err(format!("{files:?}"))
        }
    })
    .await;
    // A whole upload through the same pair: active, every byte.
    let data = pattern(300_000, 13);
    let msgs = upload_messages(&img.id, &data, 64 * 1024);
    let done = mesh
        .client()
        .upload(auth(tokio_stream::iter(msgs), &mesh.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&done), pb::Status::Active);
    assert_eq!(done.sha256, sha256_hex(&data));
}

#[tokio::test]
async fn through_the_sidecar_pair_a_cancelled_upload_leaves_the_image_queued() {
    through_the_pair(async |call, tx| {
        call.abort();
        let _ = call.await;
        drop(tx);
    })
    .await;
}

#[tokio::test]
async fn through_the_sidecar_pair_a_passed_deadline_leaves_the_image_queued() {
    use common::mesh::{Mesh, auth};
    let s = Server::start().await;
    let mesh = Mesh::start(s.addr).await;
    let img = mesh
        .client()
        .create_image(auth(raw("deadline-via-mesh"), &mesh.token))
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(4);
    tx.send(chunk(&img.id, 14)).await.unwrap();
    tx.send(chunk("", 15)).await.unwrap();
    let mut r = auth(tokio_stream::wrappers::ReceiverStream::new(rx), &mesh.token);
    r.set_timeout(Duration::from_millis(1500));
    let st = tokio::time::timeout(Duration::from_secs(30), mesh.client().upload(r))
        .await
        .expect("the deadline ends the call")
        .unwrap_err();
    assert!(
        matches!(st.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{st:?}"
    );
    // The client, told its call is over, ends its stream as if all was sent.
    drop(tx);
    let i = wait_for("the upload to end", Duration::from_secs(20), || async {
        let i = s.get(&admin(), &img.id).await.map_err(|e| e.to_string())?;
        if status_of(&i) == pb::Status::Saving {
            Err(format!("{i:?}"))
        } else {
            Ok(i)
        }
    })
    .await;
    assert_eq!(status_of(&i), pb::Status::Queued, "{i:?}");
    assert!(s.store_files().is_empty(), "{:?}", s.store_files());
}
