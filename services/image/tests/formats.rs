//! Upload validation against real files made by `qemu-img` (qemu-utils) and
//! `tar`: the bytes must be what the disk format says, and a qcow2 that
//! names a backing file or an external data file is refused, since QEMU
//! would read that host file for the guest.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use proto::image::v1 as pb;
use tonic::Code;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is required for this test (apt-get install qemu-utils tar): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// What qemu-img itself reports of a file, to prove the fixture is what we think.
fn info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        "-U",
        path.to_str().unwrap(),
    ]))
    .unwrap()
}

fn create(
    format: pb::DiskFormat,
    container: pb::ContainerFormat,
    name: &str,
) -> pb::CreateImageRequest {
    pb::CreateImageRequest {
        name: name.into(),
        disk_format: format as i32,
        container_format: container as i32,
        ..Default::default()
    }
}

async fn upload_file(
    s: &Server,
    m: pb::CreateImageRequest,
    path: &Path,
) -> (pb::Image, Result<pb::Image, tonic::Status>) {
    let img = s.create(&owner(), m).await.unwrap();
    let data = std::fs::read(path).unwrap();
    let r = s.upload(&owner(), &img.id, &data, 64 * 1024).await;
    (img, r)
}

async fn assert_killed(
    s: &Server,
    img: &pb::Image,
    r: Result<pb::Image, tonic::Status>,
    why: &str,
) {
    let st = r.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message()
            .starts_with("data: refused, the image is killed: "),
        "{st:?}"
    );
    assert!(st.message().contains(why), "expected {why:?} in {st:?}");
    let after = s.get(&owner(), &img.id).await.unwrap();
    assert_eq!(status_of(&after), pb::Status::Killed);
    assert!(
        s.store_files().iter().all(|f| !f.ends_with(&img.id)),
        "{:?}",
        s.store_files()
    );
    assert!(
        std::fs::read_dir(s.store_dir().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[tokio::test]
async fn real_qcow2_images_are_accepted_and_round_trip() {
    let s = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A raw disk with content, converted by qemu-img to qcow2 (v3 and v2).
    let raw_path = dir.path().join("disk.raw");
    let mut raw = pattern(3 * 1024 * 1024, 20);
    raw.resize(8 * 1024 * 1024, 0);
    std::fs::write(&raw_path, &raw).unwrap();
    for compat in ["1.1", "0.10"] {
        let q = dir.path().join(format!("disk-{compat}.qcow2"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            raw_path.to_str().unwrap(),
            q.to_str().unwrap(),
        ]);
        assert_eq!(info(&q)["format"], "qcow2");
        let (img, r) = upload_file(
            &s,
            create(pb::DiskFormat::Qcow2, pb::ContainerFormat::Bare, compat),
            &q,
        )
        .await;
        let done = r.unwrap();
        assert_eq!(status_of(&done), pb::Status::Active);
        // The bytes come back identical, and qemu-img reads them as the same disk.
        let back = s.download(&owner(), &img.id, 0, None).await.unwrap();
        assert_eq!(sha256_hex(&back), sha256_hex(&std::fs::read(&q).unwrap()));
        let copy = dir.path().join(format!("back-{compat}.qcow2"));
        std::fs::write(&copy, &back).unwrap();
        qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            copy.to_str().unwrap(),
            raw_path.to_str().unwrap(),
        ]);
    }
    // An empty, freshly created qcow2 too.
    let empty = dir.path().join("empty.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", empty.to_str().unwrap(), "1G"]);
    let (_, r) = upload_file(
        &s,
        create(pb::DiskFormat::Qcow2, pb::ContainerFormat::Bare, "empty"),
        &empty,
    )
    .await;
    r.unwrap();
}

#[tokio::test]
async fn qcow2_naming_a_backing_file_is_rejected() {
    let s = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("evil.qcow2");
    // A backing file the attacker hopes the host will read for them.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        q.to_str().unwrap(),
        "1G",
    ]);
    assert_eq!(info(&q)["backing-filename"], "/etc/shadow");
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Qcow2, pb::ContainerFormat::Bare, "backing"),
        &q,
    )
    .await;
    assert_killed(&s, &img, r, "backing file").await;

    // The same file declared raw is refused as well: it is not raw.
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Raw, pb::ContainerFormat::Bare, "as-raw"),
        &q,
    )
    .await;
    assert_killed(&s, &img, r, "qcow2").await;
}

#[tokio::test]
async fn qcow2_with_an_external_data_file_is_rejected() {
    let s = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("evil.qcow2");
    let data = dir.path().join("host-data.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={},data_file_raw=on", data.display()),
        q.to_str().unwrap(),
        "64M",
    ]);
    let i = info(&q);
    assert!(i.to_string().contains("data-file"), "{i}");
    let (img, r) = upload_file(
        &s,
        create(
            pb::DiskFormat::Qcow2,
            pb::ContainerFormat::Bare,
            "data-file",
        ),
        &q,
    )
    .await;
    assert_killed(&s, &img, r, "external data file").await;
    // Declared as a kernel or ramdisk: still refused.
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Aki, pb::ContainerFormat::Bare, "as-aki"),
        &q,
    )
    .await;
    assert_killed(&s, &img, r, "qcow2").await;
}

#[tokio::test]
async fn bytes_must_match_the_declared_format() {
    let s = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, pattern(100_000, 21)).unwrap();

    // Not a qcow2, not an ISO.
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Qcow2, pb::ContainerFormat::Bare, "q"),
        &junk,
    )
    .await;
    assert_killed(&s, &img, r, "not a qcow2").await;
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Iso, pb::ContainerFormat::Bare, "i"),
        &junk,
    )
    .await;
    assert_killed(&s, &img, r, "ISO 9660").await;
    // Too short to hold a qcow2 header.
    let short = dir.path().join("short.bin");
    std::fs::write(&short, b"QFI\xfb\0\0\0\x03").unwrap();
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Qcow2, pb::ContainerFormat::Bare, "s"),
        &short,
    )
    .await;
    assert_killed(&s, &img, r, "too short").await;

    // Raw, kernel and ramdisk take any bytes that are not another image format.
    for f in [
        pb::DiskFormat::Raw,
        pb::DiskFormat::Aki,
        pb::DiskFormat::Ari,
    ] {
        let (_, r) = upload_file(&s, create(f, pb::ContainerFormat::Bare, "plain"), &junk).await;
        assert_eq!(status_of(&r.unwrap()), pb::Status::Active);
    }

    // An ISO 9660 image: the primary volume descriptor at sector 16.
    let mut iso = vec![0u8; 64 * 1024];
    iso[32768] = 1;
    iso[32769..32774].copy_from_slice(b"CD001");
    iso[32774] = 1;
    let iso_path = dir.path().join("cd.iso");
    std::fs::write(&iso_path, &iso).unwrap();
    let (_, r) = upload_file(
        &s,
        create(pb::DiskFormat::Iso, pb::ContainerFormat::Bare, "cd"),
        &iso_path,
    )
    .await;
    r.unwrap();

    // An OVF package is a tar archive (made by the real tar).
    std::fs::write(dir.path().join("disk.ovf"), b"<Envelope/>").unwrap();
    let ova = dir.path().join("pkg.ova");
    run(
        "tar",
        &[
            "-C",
            dir.path().to_str().unwrap(),
            "-cf",
            ova.to_str().unwrap(),
            "disk.ovf",
        ],
    );
    let (_, r) = upload_file(
        &s,
        create(pb::DiskFormat::Raw, pb::ContainerFormat::Ovf, "ova"),
        &ova,
    )
    .await;
    r.unwrap();
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Raw, pb::ContainerFormat::Ovf, "not-ova"),
        &junk,
    )
    .await;
    assert_killed(&s, &img, r, "tar").await;
}
