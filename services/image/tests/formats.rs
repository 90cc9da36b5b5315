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

/// Every disk format `qemu-img` makes, and the name the refusal gives it.
const QEMU_FORMATS: [(&str, &[&str], &str); 8] = [
    ("qed", &[], "QED"),
    ("vmdk", &[], "VMDK"),
    ("vpc", &[], "VHD"),
    ("vhdx", &[], "VHDX"),
    ("vdi", &[], "VDI"),
    ("parallels", &[], "Parallels"),
    ("qcow", &[], "qcow (version 1)"),
    (
        "luks",
        &[
            "--object",
            "secret,id=sec0,data=not-a-real-secret",
            "-o",
            "key-secret=sec0,iter-time=10",
        ],
        "LUKS",
    ),
];

#[tokio::test]
async fn every_format_qemu_probes_is_refused_whatever_the_declaration() {
    let s = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    for (fmt, extra, name) in QEMU_FORMATS {
        let f = dir.path().join(format!("disk.{fmt}"));
        let mut args = vec!["create", "-q"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-f", fmt, f.to_str().unwrap(), "16M"]);
        qemu_img(&args);
        assert_eq!(info(&f)["format"], fmt, "the fixture is a real {fmt}");
        for (disk, container) in [
            (pb::DiskFormat::Raw, pb::ContainerFormat::Bare),
            (pb::DiskFormat::Aki, pb::ContainerFormat::Bare),
            (pb::DiskFormat::Qcow2, pb::ContainerFormat::Bare),
            (pb::DiskFormat::Iso, pb::ContainerFormat::Bare),
            (pb::DiskFormat::Raw, pb::ContainerFormat::Ovf),
        ] {
            let (img, r) = upload_file(&s, create(disk, container, fmt), &f).await;
            assert_killed(&s, &img, r, name).await;
        }
    }
    // A VMDK text descriptor (its extent a separate flat file) is a VMDK too.
    let desc = dir.path().join("flat.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        desc.to_str().unwrap(),
        "16M",
    ]);
    assert!(
        std::fs::read_to_string(&desc)
            .unwrap()
            .contains("createType")
    );
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Raw, pb::ContainerFormat::Bare, "descriptor"),
        &desc,
    )
    .await;
    assert_killed(&s, &img, r, "VMDK").await;
}

/// Writes an ISO 9660 primary volume descriptor signature at sector 16.
fn add_iso_descriptor(data: &mut Vec<u8>) {
    if data.len() < 64 * 1024 {
        data.resize(64 * 1024, 0);
    }
    data[32768] = 1;
    data[32769..32774].copy_from_slice(b"CD001");
    data[32774] = 1;
}

/// Makes the first 512 bytes a valid ustar header (checksum included).
fn add_tar_header(data: &mut [u8]) {
    data[257..265].copy_from_slice(b"ustar\x0000");
    data[148..156].copy_from_slice(b"        ");
    let sum: u32 = data[..512].iter().map(|b| u32::from(*b)).sum();
    data[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

#[tokio::test]
async fn polyglot_files_are_refused_whichever_format_is_declared() {
    let s = Server::start().await;
    let dir = tempfile::tempdir().unwrap();

    // A qcow2 naming a host file as its backing file, which also carries an
    // ISO 9660 descriptor (in the unused rest of its header cluster). QEMU
    // still reads it as that qcow2; declared `iso` it must not pass.
    let q = dir.path().join("backed.qcow2");
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
    let mut poly = std::fs::read(&q).unwrap();
    add_iso_descriptor(&mut poly);
    let p = dir.path().join("poly-iso.qcow2");
    std::fs::write(&p, &poly).unwrap();
    assert_eq!(info(&p)["format"], "qcow2");
    assert_eq!(info(&p)["backing-filename"], "/etc/shadow");
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Iso, pb::ContainerFormat::Bare, "poly-iso"),
        &p,
    )
    .await;
    assert_killed(&s, &img, r, "also reads as qcow2, besides the declared iso").await;
    let (img, r) = upload_file(
        &s,
        create(
            pb::DiskFormat::Qcow2,
            pb::ContainerFormat::Bare,
            "poly-qcow2",
        ),
        &p,
    )
    .await;
    assert_killed(&s, &img, r, "also reads as ISO 9660").await;

    // A real ISO (genisoimage) whose empty system area now starts with a
    // qcow2 header: qemu-img probes it as qcow2.
    let content = dir.path().join("cd");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("hello.txt"), b"hello").unwrap();
    let iso = dir.path().join("cd.iso");
    run(
        "genisoimage",
        &[
            "-quiet",
            "-o",
            iso.to_str().unwrap(),
            content.to_str().unwrap(),
        ],
    );
    let (_, r) = upload_file(
        &s,
        create(pb::DiskFormat::Iso, pb::ContainerFormat::Bare, "plain-iso"),
        &iso,
    )
    .await;
    assert_eq!(
        status_of(&r.unwrap()),
        pb::Status::Active,
        "a real ISO passes"
    );
    let clean = dir.path().join("clean.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", clean.to_str().unwrap(), "1M"]);
    let header = std::fs::read(&clean).unwrap();
    let mut iso_poly = std::fs::read(&iso).unwrap();
    iso_poly[..4096].copy_from_slice(&header[..4096]);
    let ip = dir.path().join("poly.iso");
    std::fs::write(&ip, &iso_poly).unwrap();
    assert_eq!(info(&ip)["format"], "qcow2", "QEMU would probe it as qcow2");
    for (disk, why) in [
        (pb::DiskFormat::Iso, "also reads as qcow2"),
        (
            pb::DiskFormat::Raw,
            "reads as qcow2 and ISO 9660, not as the declared raw",
        ),
        (pb::DiskFormat::Qcow2, "also reads as ISO 9660"),
    ] {
        let (img, r) =
            upload_file(&s, create(disk, pb::ContainerFormat::Bare, "iso-poly"), &ip).await;
        assert_killed(&s, &img, r, why).await;
    }

    // A qcow2 whose first block is also a valid tar header, declared as an
    // OVF package (a tar): refused.
    let mut tar_poly = header.clone();
    add_tar_header(&mut tar_poly);
    let tp = dir.path().join("poly.ova");
    std::fs::write(&tp, &tar_poly).unwrap();
    assert_eq!(info(&tp)["format"], "qcow2");
    let (img, r) = upload_file(
        &s,
        create(pb::DiskFormat::Qcow2, pb::ContainerFormat::Ovf, "tar-poly"),
        &tp,
    )
    .await;
    assert_killed(
        &s,
        &img,
        r,
        "also reads as qcow2, besides the declared OVF package",
    )
    .await;

    // A real OVA holding a qcow2 disk is fine: the disk is inside, not at the start.
    std::fs::copy(&clean, dir.path().join("disk.qcow2")).unwrap();
    let ova = dir.path().join("real.ova");
    run(
        "tar",
        &[
            "-C",
            dir.path().to_str().unwrap(),
            "-cf",
            ova.to_str().unwrap(),
            "disk.qcow2",
        ],
    );
    let (_, r) = upload_file(
        &s,
        create(pb::DiskFormat::Qcow2, pb::ContainerFormat::Ovf, "real-ova"),
        &ova,
    )
    .await;
    assert_eq!(status_of(&r.unwrap()), pb::Status::Active);
}
