//! Volumes made from images: the bytes come from a real image server (the
//! `image` crate, in process, called as the volume service would call it
//! through its sidecar) and go through the real `qemu-img convert`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use proto::image::v1 as ipb;
use proto::volume::v1 as pb;
use runtime::testing::req;
use tonic::Code;

fn from_image(image_id: &str, format: pb::VolumeFormat) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        image_id: image_id.into(),
        format: format as i32,
        wait: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_volume_from_a_raw_image_has_the_images_bytes() {
    let s = Server::with_image().await;
    let data = pattern(8 * MIB + 12345, 7);
    let img = s
        .image
        .as_ref()
        .unwrap()
        .upload(&member_a(), ipb::DiskFormat::Raw, &data)
        .await;
    for format in [pb::VolumeFormat::Raw, pb::VolumeFormat::Qcow2] {
        let v = s
            .create(&member_a(), from_image(&img.id, format))
            .await
            .unwrap();
        assert_eq!(status(&v), pb::VolumeStatus::Available, "{v:?}");
        assert_eq!(v.size_gb, 1, "the image's size, rounded up to GiB");
        assert!(v.bootable, "a volume made from an image is bootable");
        assert_eq!(v.source_image_id, img.id);
        let file = s.volume_file(&v.id);
        assert_eq!(
            qemu_info(&file)["format"],
            format
                .as_str_name()
                .trim_start_matches("VOLUME_FORMAT_")
                .to_lowercase()
        );
        assert_holds(&file, &data, GIB);
    }
    // Nothing staged is left behind.
    assert!(
        s.store_files().iter().all(|f| f.starts_with("volumes/")),
        "{:?}",
        s.store_files()
    );
}

#[tokio::test]
async fn a_volume_from_a_qcow2_image_has_the_guest_visible_bytes() {
    let s = Server::with_image().await;
    let data = pattern(6 * MIB, 9);
    let img = s
        .image
        .as_ref()
        .unwrap()
        .upload(&member_a(), ipb::DiskFormat::Qcow2, &qcow2_of(&data))
        .await;
    let v = s
        .create(
            &member_a(),
            pb::CreateVolumeRequest {
                size_gb: 2,
                ..from_image(&img.id, pb::VolumeFormat::Raw)
            },
        )
        .await
        .unwrap();
    assert_eq!(status(&v), pb::VolumeStatus::Available, "{v:?}");
    assert_eq!(v.size_gb, 2);
    assert_holds(&s.volume_file(&v.id), &data, 2 * GIB);
}

#[tokio::test]
async fn unusable_images_are_refused_and_nothing_is_written() {
    let s = Server::with_image().await;
    let images = s.image.as_ref().unwrap();
    let mut iso = vec![0u8; 64 * 1024];
    iso[32769..32774].copy_from_slice(b"CD001");
    let iso = images.upload(&member_a(), ipb::DiskFormat::Iso, &iso).await;
    assert_status(
        s.create(&member_a(), from_image(&iso.id, pb::VolumeFormat::Raw))
            .await,
        Code::FailedPrecondition,
        &format!(
            "image {} has disk format iso; only raw and qcow2 images can become volumes",
            iso.id
        ),
    );
    let unknown = uuid::Uuid::new_v4();
    assert_status(
        s.create(
            &member_a(),
            from_image(&unknown.to_string(), pb::VolumeFormat::Raw),
        )
        .await,
        Code::NotFound,
        &format!("image {unknown} not found"),
    );
    // Another project's private image is, to this caller, missing.
    let theirs = images
        .upload(&member_b(), ipb::DiskFormat::Raw, &pattern(MIB, 3))
        .await;
    assert_status(
        s.create(&member_a(), from_image(&theirs.id, pb::VolumeFormat::Raw))
            .await,
        Code::NotFound,
        &format!("image {} not found", theirs.id),
    );
    // An image without bytes yet.
    let queued = images
        .client()
        .create_image(req(
            ipb::CreateImageRequest {
                name: "empty".into(),
                disk_format: ipb::DiskFormat::Raw as i32,
                container_format: ipb::ContainerFormat::Bare as i32,
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_status(
        s.create(&member_a(), from_image(&queued.id, pb::VolumeFormat::Raw))
            .await,
        Code::FailedPrecondition,
        &format!("image {} is not active: it has no bytes to copy", queued.id),
    );
    // A volume smaller than the image.
    let two_gib = {
        // A qcow2 of 2 GiB virtual size, a few KiB of file.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "2G"]);
        std::fs::read(&p).unwrap()
    };
    let sparse = images
        .upload(&member_a(), ipb::DiskFormat::Qcow2, &two_gib)
        .await;
    let v = s
        .create(
            &member_a(),
            pb::CreateVolumeRequest {
                size_gb: 1,
                ..from_image(&sparse.id, pb::VolumeFormat::Raw)
            },
        )
        .await
        .unwrap();
    // Only the bytes tell the virtual size: the volume is ERROR, with why.
    assert_eq!(status(&v), pb::VolumeStatus::Error, "{v:?}");
    assert_eq!(
        v.status_reason,
        format!(
            "the image's virtual size ({} bytes) is larger than the volume ({} bytes)",
            2 * GIB,
            GIB
        )
    );
    let list = s
        .client()
        .list_volumes(req(pb::ListVolumesRequest::default(), &member_a()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.volumes.len(), 1, "only the error volume: {list:?}");
    assert_eq!(s.store_files(), Vec::<String>::new());
    s.delete(&member_a(), &v.id).await.unwrap();
}

#[tokio::test]
async fn a_client_that_drops_its_call_never_leaves_a_volume_creating() {
    let s = Server::with_image().await;
    let data = pattern(32 * MIB, 5);
    let img = s
        .image
        .as_ref()
        .unwrap()
        .upload(&member_a(), ipb::DiskFormat::Raw, &data)
        .await;
    let client = s.client();
    let call = tokio::spawn(async move {
        client
            .clone()
            .create_volume(req(from_image(&img.id, pb::VolumeFormat::Raw), &member_a()))
            .await
    });
    // Wait until the volume exists, then go away mid-call.
    let id = wait_for("the volume record", Duration::from_secs(30), || async {
        let l = s
            .client()
            .list_volumes(req(pb::ListVolumesRequest::default(), &member_a()))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        l.volumes
            .first()
            .map(|v| v.id.clone())
            .ok_or_else(|| "none yet".to_string())
    })
    .await;
    call.abort();
    let _ = call.await;
    let v = s.settled(&member_a(), &id).await;
    assert_eq!(status(&v), pb::VolumeStatus::Available, "{v:?}");
    assert_holds(&s.volume_file(&id), &data, GIB);
}

/// Boot from volume: what the compute agent needs of a volume made from an
/// image — the bootable flag, and in the attachment's connection info the
/// file's absolute path and its format, which a disk definition names
/// (`<source file=…/>`, `<driver type=…/>`). qemu-img, told that format,
/// reads the image's bytes at that path.
#[tokio::test]
async fn a_volume_from_an_image_is_bootable_and_its_connection_info_names_file_and_format() {
    let s = Server::with_image().await;
    let images = s.image.as_ref().unwrap();
    let data = pattern(3 * MIB + 777, 11);
    let raw = images
        .upload(&member_a(), ipb::DiskFormat::Raw, &data)
        .await;
    let qcow2 = images
        .upload(&member_a(), ipb::DiskFormat::Qcow2, &qcow2_of(&data))
        .await;
    let agent = runtime::caller::Caller {
        peer: Some("spiffe://cirrus.local/svc/compute-agent/host/h1".into()),
        ..member_a()
    };
    for (img, format, name) in [
        (&raw, pb::VolumeFormat::Raw, "raw"),
        (&raw, pb::VolumeFormat::Qcow2, "qcow2"),
        (&qcow2, pb::VolumeFormat::Raw, "raw"),
        (&qcow2, pb::VolumeFormat::Qcow2, "qcow2"),
    ] {
        let v = s
            .create(&member_a(), from_image(&img.id, format))
            .await
            .unwrap();
        assert_eq!(status(&v), pb::VolumeStatus::Available, "{v:?}");
        assert!(v.bootable, "{v:?}");
        let a = s
            .client()
            .create_attachment(req(
                pb::CreateAttachmentRequest {
                    volume_id: v.id.clone(),
                    server_id: format!("boot-{}", v.id),
                    connector: Some(pb::HostConnector {
                        host: "h1".into(),
                        transports: vec![pb::Transport::LocalFile as i32],
                    }),
                },
                &agent,
            ))
            .await
            .unwrap()
            .into_inner();
        let info = a.connection_info.unwrap();
        assert_eq!(info.transport, pb::Transport::LocalFile as i32);
        assert_eq!(info.format, format as i32);
        let path = match info.target {
            Some(pb::connection_info::Target::LocalFile(f)) => std::path::PathBuf::from(f.path),
            other => panic!("expected a local file, got {other:?}"),
        };
        assert!(path.is_absolute(), "{path:?}");
        assert_eq!(qemu_info(&path)["format"], name);
        assert_holds(&path, &data, GIB);
    }
    // The bootable volumes, as a boot-from-volume picker lists them.
    let listed = s
        .client()
        .list_volumes(req(
            pb::ListVolumesRequest {
                bootable: Some(true),
                ..Default::default()
            },
            &member_a(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.volumes.len(), 4);
    // A caller may say otherwise; an empty volume is not bootable.
    let mut m = from_image(&raw.id, pb::VolumeFormat::Raw);
    m.bootable = Some(false);
    assert!(!s.create(&member_a(), m).await.unwrap().bootable);
    assert!(!s.create_empty(&member_a(), "data", 1).await.bootable);
}
