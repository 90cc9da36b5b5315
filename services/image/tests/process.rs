//! The real `image` binary: memory stays bounded while 1 GiB streams in and
//! out, and a SIGKILL in the middle of an upload is healed at the next start.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use proto::image::v1 as pb;
use runtime::db::TestDatabase;

const MIB: usize = 1024 * 1024;
const GIB: u64 = 1024 * 1024 * 1024;
/// The limit the issue sets on the service's resident memory.
const RSS_LIMIT_KIB: u64 = 100 * 1024;

/// Chunk `i` of a generated image: cheap to make, different per chunk.
fn chunk(i: usize) -> Vec<u8> {
    let mut c = vec![(i % 251) as u8 ^ 0x5a; MIB];
    c[..8].copy_from_slice(&(i as u64).to_le_bytes());
    c
}

#[tokio::test]
async fn one_gib_streams_in_and_out_with_rss_under_100_mib() {
    let db = TestDatabase::create().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(&db.url, &dir.path().join("store")).await;
    let (hwm_idle, _) = p.memory_kib();

    let img = p
        .client()
        .create_image(req(
            pb::CreateImageRequest {
                expected_size: Some(GIB),
                ..raw("big")
            },
            &owner(),
        ))
        .await
        .unwrap()
        .into_inner();
    let chunks = (GIB as usize) / MIB;
    let id = img.id.clone();
    // Generated lazily: the test process holds only a few chunks either.
    let stream = futures_util::stream::iter(0..chunks).map(move |i| pb::UploadRequest {
        image_id: if i == 0 { id.clone() } else { String::new() },
        data: chunk(i).into(),
    });
    let done = tokio::time::timeout(
        Duration::from_secs(900),
        p.client().upload(req(stream, &owner())),
    )
    .await
    .expect("1 GiB uploaded within 15 minutes")
    .unwrap()
    .into_inner();
    assert_eq!(status_of(&done), pb::Status::Active);
    assert_eq!(done.size, Some(GIB));
    let (hwm_upload, _) = p.memory_kib();

    // Download it all, checking every chunk boundary's marker.
    let mut s = p
        .client()
        .download(req(
            pb::DownloadRequest {
                image_id: img.id.clone(),
                ..Default::default()
            },
            &owner(),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got = 0u64;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(60), s.message())
        .await
        .expect("a chunk within 60 s")
        .unwrap()
    {
        if got.is_multiple_of(MIB as u64) && m.data.len() >= 8 {
            let i = (got / MIB as u64) as usize;
            assert_eq!(&m.data[..8], &chunk(i)[..8], "chunk {i}");
        }
        got += m.data.len() as u64;
    }
    assert_eq!(got, GIB);
    let (hwm, rss) = p.memory_kib();
    println!(
        "image service memory: idle peak {hwm_idle} KiB, after 1 GiB upload peak {hwm_upload} KiB, \
         after 1 GiB download peak {hwm} KiB, now {rss} KiB"
    );
    assert!(
        hwm < RSS_LIMIT_KIB,
        "peak RSS {hwm} KiB is over {RSS_LIMIT_KIB} KiB"
    );
    p.kill().await;
}

#[tokio::test]
async fn a_crash_during_an_upload_is_healed_at_start_up() {
    let db = TestDatabase::create().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let p = Process::start(&db.url, &store).await;
    let kept = p
        .client()
        .create_image(req(raw("kept"), &owner()))
        .await
        .unwrap()
        .into_inner();
    let data = pattern(3 * MIB, 30);
    p.client()
        .upload(req(
            tokio_stream::iter(upload_messages(&kept.id, &data, MIB)),
            &owner(),
        ))
        .await
        .unwrap();
    let img = p
        .client()
        .create_image(req(raw("interrupted"), &owner()))
        .await
        .unwrap()
        .into_inner();

    // An upload that is half-way when the service is killed.
    let (tx, call) = open_upload(p.client(), &owner(), 2);
    for i in 0..8 {
        tx.send(pb::UploadRequest {
            image_id: if i == 0 {
                img.id.clone()
            } else {
                String::new()
            },
            data: pattern(MIB, i).into(),
        })
        .await
        .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let i = p
            .client()
            .get_image(req(pb::GetImageRequest { id: img.id.clone() }, &owner()))
            .await
            .unwrap()
            .into_inner();
        let partial = std::fs::read_dir(store.join("tmp")).unwrap().count();
        if status_of(&i) == pb::Status::Saving && partial > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upload never got under way"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.kill().await;
    let r = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err(), "the upload cannot have succeeded: {r:?}");
    drop(tx);
    // Left behind: the record SAVING and a partial file.
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 1);

    let p = Process::start(&db.url, &store).await;
    let healed = p
        .client()
        .get_image(req(pb::GetImageRequest { id: img.id.clone() }, &owner()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&healed), pb::Status::Queued);
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0);
    let files: Vec<_> = std::fs::read_dir(store.join("images")).unwrap().collect();
    assert_eq!(files.len(), 1, "only the active image's bytes stay");
    // The kept image is intact, and the healed one takes its data now.
    let mut s = p
        .client()
        .download(req(
            pb::DownloadRequest {
                image_id: kept.id.clone(),
                ..Default::default()
            },
            &owner(),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        back.extend_from_slice(&m.data);
    }
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
    p.client()
        .upload(req(
            tokio_stream::iter(upload_messages(&img.id, &data, MIB)),
            &owner(),
        ))
        .await
        .unwrap();
    p.kill().await;
}
