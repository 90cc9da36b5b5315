//! The image records through gRPC, with the caller identities a sidecar
//! gives: a reader and a member of the owner project, a member of another
//! project, an administrator, and nobody.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use proto::image::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn create_get_and_validation() {
    let s = Server::start().await;
    let mut m = raw("cirros");
    m.min_disk = 1;
    m.min_ram = 64;
    m.tags = vec!["small".into(), "test".into(), "small".into()];
    m.properties = HashMap::from([
        ("os_type".to_string(), "linux".to_string()),
        ("architecture".to_string(), "x86_64".to_string()),
        ("hw_disk_bus".to_string(), "virtio".to_string()),
    ]);
    m.expected_size = Some(1024);
    m.expected_sha256 = "AB".repeat(32);
    let img = s.create(&owner(), m).await.unwrap();
    assert_eq!(status_of(&img), pb::Status::Queued);
    assert_eq!(img.owner, PROJECT_A);
    assert_eq!(img.visibility, pb::Visibility::Private as i32);
    assert_eq!(img.tags, vec!["small", "test"], "duplicate tags fold");
    assert_eq!(img.properties["hw_disk_bus"], "virtio");
    assert_eq!(
        img.expected_sha256,
        "ab".repeat(32),
        "checksums are lower-cased"
    );
    assert_eq!(img.size, None);

    let got = s.get(&reader(), &img.id).await.unwrap();
    assert_eq!(got, img);

    // Every malformed field is INVALID_ARGUMENT, and nothing is created.
    let bad: Vec<(&str, pb::CreateImageRequest)> = vec![
        (
            "no disk format",
            pb::CreateImageRequest {
                disk_format: 0,
                ..raw("x")
            },
        ),
        (
            "unknown disk format",
            pb::CreateImageRequest {
                disk_format: 99,
                ..raw("x")
            },
        ),
        (
            "no container",
            pb::CreateImageRequest {
                container_format: 0,
                ..raw("x")
            },
        ),
        (
            "bad visibility",
            pb::CreateImageRequest {
                visibility: 42,
                ..raw("x")
            },
        ),
        ("control chars", raw("a\nb")),
        ("long name", raw(&"n".repeat(256))),
        (
            "bad checksum",
            pb::CreateImageRequest {
                expected_sha256: "xyz".into(),
                ..raw("x")
            },
        ),
        (
            "bad property key",
            pb::CreateImageRequest {
                properties: HashMap::from([("bad key".to_string(), "v".to_string())]),
                ..raw("x")
            },
        ),
        (
            "kernel_id not an id",
            pb::CreateImageRequest {
                properties: HashMap::from([("kernel_id".to_string(), "vmlinuz".to_string())]),
                ..raw("x")
            },
        ),
        (
            "blank tag",
            pb::CreateImageRequest {
                tags: vec![" ".into()],
                ..raw("x")
            },
        ),
        (
            "huge min_ram",
            pb::CreateImageRequest {
                min_ram: u32::MAX,
                ..raw("x")
            },
        ),
    ];
    let messages = [
        "disk_format: is required",
        "disk_format: unknown value 99",
        "container_format: is required",
        "visibility: unknown value 42",
        "name: contains control characters",
        "name: is longer than 255 characters",
        "expected_sha256: must be 64 hex digits",
        "properties: property name \"bad key\" must be 1 to 255 of A-Z a-z 0-9 _ - . :",
        "properties: property kernel_id must be an image id",
        "tags: a tag must not be blank",
        "min_ram: is too large",
    ];
    assert_eq!(bad.len(), messages.len());
    for ((what, m), message) in bad.into_iter().zip(messages) {
        println!("{what}");
        assert_status(s.create(&owner(), m).await, Code::InvalidArgument, message);
    }
    assert_status(
        s.get(&owner(), "").await,
        Code::InvalidArgument,
        "id: is required",
    );
    assert_status(
        s.get(&owner(), "abc").await,
        Code::InvalidArgument,
        "id: is not a valid id: \"abc\"",
    );
    assert_code(
        s.get(&owner(), &uuid::Uuid::new_v4().to_string()).await,
        Code::NotFound,
    );
    let (list, _) = s.images.list(&admin(), filter()).await.unwrap();
    assert_eq!(list.len(), 1);
}

fn filter() -> image::model::ListFilter {
    image::model::ListFilter {
        name: None,
        status: None,
        visibility: None,
        owner: None,
        tags: vec![],
        properties: Default::default(),
        member_status: image::model::MemberStatus::Accepted,
        sort_key: image::model::SortKey::CreatedAt,
        ascending: false,
        marker: None,
        limit: 100,
    }
}

#[tokio::test]
async fn authorization_follows_roles_and_ownership() {
    let s = Server::start().await;
    // Nobody (no sidecar headers) is UNAUTHENTICATED everywhere.
    assert_code(s.create(&nobody(), raw("x")).await, Code::Unauthenticated);
    let img = s.create_raw(&owner(), "mine").await;
    assert_code(s.get(&nobody(), &img.id).await, Code::Unauthenticated);
    assert_code(
        s.client()
            .list_images(req(pb::ListImagesRequest::default(), &nobody()))
            .await,
        Code::Unauthenticated,
    );

    // A reader may look but not create or change.
    assert_code(s.create(&reader(), raw("x")).await, Code::PermissionDenied);
    s.get(&reader(), &img.id).await.unwrap();
    let rename = |who: &runtime::caller::Caller| {
        req(
            pb::UpdateImageRequest {
                id: img.id.clone(),
                name: Some("renamed".into()),
                ..Default::default()
            },
            who,
        )
    };
    assert_code(
        s.client().update_image(rename(&reader())).await,
        Code::PermissionDenied,
    );
    assert_code(
        s.client()
            .delete_image(req(
                pb::DeleteImageRequest { id: img.id.clone() },
                &reader(),
            ))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        s.upload(&reader(), &img.id, b"data", 2).await,
        Code::PermissionDenied,
    );

    // Another project does not even see a private image.
    assert_code(s.get(&other(), &img.id).await, Code::NotFound);
    assert_code(
        s.client().update_image(rename(&other())).await,
        Code::NotFound,
    );
    assert_code(
        s.upload(&other(), &img.id, b"data", 2).await,
        Code::NotFound,
    );
    assert_code(s.download(&other(), &img.id, 0, None).await, Code::NotFound);

    // The owner and the admin may change it.
    let renamed = s
        .client()
        .update_image(rename(&owner()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.name, "renamed");
    s.client().update_image(rename(&admin())).await.unwrap();

    // Only an admin publishes, at creation or later.
    let public = pb::CreateImageRequest {
        visibility: pb::Visibility::Public as i32,
        ..raw("public")
    };
    assert_code(
        s.create(&owner(), public.clone()).await,
        Code::PermissionDenied,
    );
    let publish = pb::UpdateImageRequest {
        id: img.id.clone(),
        visibility: pb::Visibility::Public as i32,
        ..Default::default()
    };
    assert_code(
        s.client()
            .update_image(req(publish.clone(), &owner()))
            .await,
        Code::PermissionDenied,
    );
    let p = s.create(&admin(), public).await.unwrap();
    assert_eq!(p.visibility, pb::Visibility::Public as i32);
    s.client()
        .update_image(req(publish, &admin()))
        .await
        .unwrap();
    // Public: everyone sees it, only the owner project or an admin changes it.
    s.get(&other(), &img.id).await.unwrap();
    assert_code(
        s.client().update_image(rename(&other())).await,
        Code::PermissionDenied,
    );

    // Deactivate / reactivate are admin-only.
    let r = pb::ImageRef { id: img.id.clone() };
    assert_code(
        s.client().deactivate_image(req(r.clone(), &owner())).await,
        Code::PermissionDenied,
    );
    // ...and only for an active image.
    assert_code(
        s.client().deactivate_image(req(r.clone(), &admin())).await,
        Code::FailedPrecondition,
    );

    // A project-less caller cannot create (there would be no owner).
    let mut unscoped = owner();
    unscoped.project_id = None;
    assert_code(s.create(&unscoped, raw("x")).await, Code::PermissionDenied);
    // A caller with no image role at all cannot read.
    let roleless = caller("eve", PROJECT_A, &[], false);
    assert_code(s.get(&roleless, &img.id).await, Code::PermissionDenied);
}

#[tokio::test]
async fn update_properties_tags_and_protected_delete() {
    let s = Server::start().await;
    let mut m = raw("base");
    m.properties = HashMap::from([
        ("os_type".to_string(), "linux".to_string()),
        ("hw_qemu_guest_agent".to_string(), "yes".to_string()),
    ]);
    m.protected = true;
    let img = s.create(&owner(), m).await.unwrap();
    let u = s
        .client()
        .update_image(req(
            pb::UpdateImageRequest {
                id: img.id.clone(),
                set_properties: HashMap::from([(
                    "architecture".to_string(),
                    "aarch64".to_string(),
                )]),
                remove_properties: vec!["hw_qemu_guest_agent".into()],
                tags: Some(pb::TagList {
                    tags: vec!["arm".into()],
                }),
                min_disk: Some(2),
                ..Default::default()
            },
            &owner(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        u.properties,
        HashMap::from([
            ("os_type".to_string(), "linux".to_string()),
            ("architecture".to_string(), "aarch64".to_string()),
        ])
    );
    assert_eq!(u.tags, vec!["arm"]);
    assert_eq!(u.min_disk, 2);
    assert_eq!(u.name, "base", "unset fields stay");
    assert!(u.updated_at.unwrap().seconds >= img.updated_at.unwrap().seconds);

    // Protected: even the owner and an admin get FAILED_PRECONDITION.
    let del =
        |who: &runtime::caller::Caller| req(pb::DeleteImageRequest { id: img.id.clone() }, who);
    assert_code(
        s.client().delete_image(del(&owner())).await,
        Code::FailedPrecondition,
    );
    assert_code(
        s.client().delete_image(del(&admin())).await,
        Code::FailedPrecondition,
    );
    s.get(&owner(), &img.id).await.unwrap();
    s.client()
        .update_image(req(
            pb::UpdateImageRequest {
                id: img.id.clone(),
                protected: Some(false),
                ..Default::default()
            },
            &owner(),
        ))
        .await
        .unwrap();
    s.client().delete_image(del(&owner())).await.unwrap();
    assert_code(s.get(&owner(), &img.id).await, Code::NotFound);
    assert_code(s.client().delete_image(del(&owner())).await, Code::NotFound);
}

async fn list(
    s: &Server,
    who: &runtime::caller::Caller,
    m: pb::ListImagesRequest,
) -> (Vec<String>, String) {
    let r = s
        .client()
        .list_images(req(m, who))
        .await
        .unwrap()
        .into_inner();
    (
        r.images.into_iter().map(|i| i.name).collect(),
        r.next_marker,
    )
}

#[tokio::test]
async fn list_filters_sorts_pages_and_respects_visibility() {
    let s = Server::start().await;
    for (name, tags, arch) in [
        ("a-ubuntu", vec!["lts"], "x86_64"),
        ("b-debian", vec!["lts", "stable"], "aarch64"),
        ("c-fedora", vec![], "x86_64"),
    ] {
        let mut m = raw(name);
        m.tags = tags.into_iter().map(String::from).collect();
        m.properties = HashMap::from([("architecture".to_string(), arch.to_string())]);
        s.create(&owner(), m).await.unwrap();
    }
    s.create(
        &other(),
        pb::CreateImageRequest {
            visibility: pb::Visibility::Community as i32,
            ..raw("d-community")
        },
    )
    .await
    .unwrap();
    s.create_raw(&other(), "e-private-b").await;
    s.create(
        &admin(),
        pb::CreateImageRequest {
            visibility: pb::Visibility::Public as i32,
            ..raw("f-public")
        },
    )
    .await
    .unwrap();

    let by_name = pb::ListImagesRequest {
        sort_key: pb::SortKey::Name as i32,
        ascending: true,
        ..Default::default()
    };
    // Default listing: own images and public ones; community only when asked.
    let (names, next) = list(&s, &owner(), by_name.clone()).await;
    assert_eq!(names, ["a-ubuntu", "b-debian", "c-fedora", "f-public"]);
    assert!(next.is_empty());
    let (names, _) = list(&s, &reader(), by_name.clone()).await;
    assert_eq!(names.len(), 4, "a reader of the project sees the same");
    let (names, _) = list(&s, &other(), by_name.clone()).await;
    assert_eq!(names, ["d-community", "e-private-b", "f-public"]);
    let (names, _) = list(
        &s,
        &owner(),
        pb::ListImagesRequest {
            visibility: pb::Visibility::Community as i32,
            ..by_name.clone()
        },
    )
    .await;
    assert_eq!(names, ["d-community"]);
    // The admin sees everything.
    let (names, _) = list(&s, &admin(), by_name.clone()).await;
    assert_eq!(names.len(), 6);
    // A community image can be read by anyone who knows its id.
    let (_, _) = list(&s, &owner(), by_name.clone()).await;

    // Filters.
    let f = |m: pb::ListImagesRequest| pb::ListImagesRequest { ..m };
    let (names, _) = list(
        &s,
        &owner(),
        f(pb::ListImagesRequest {
            tags: vec!["lts".into()],
            ..by_name.clone()
        }),
    )
    .await;
    assert_eq!(names, ["a-ubuntu", "b-debian"]);
    let (names, _) = list(
        &s,
        &owner(),
        pb::ListImagesRequest {
            tags: vec!["lts".into(), "stable".into()],
            ..by_name.clone()
        },
    )
    .await;
    assert_eq!(names, ["b-debian"]);
    let (names, _) = list(
        &s,
        &owner(),
        pb::ListImagesRequest {
            properties: HashMap::from([("architecture".to_string(), "x86_64".to_string())]),
            ..by_name.clone()
        },
    )
    .await;
    assert_eq!(names, ["a-ubuntu", "c-fedora"]);
    let (names, _) = list(
        &s,
        &owner(),
        pb::ListImagesRequest {
            name: Some("c-fedora".into()),
            ..by_name.clone()
        },
    )
    .await;
    assert_eq!(names, ["c-fedora"]);
    let (names, _) = list(
        &s,
        &admin(),
        pb::ListImagesRequest {
            owner: Some(PROJECT_B.into()),
            ..by_name.clone()
        },
    )
    .await;
    assert_eq!(names, ["d-community", "e-private-b"]);
    let (names, _) = list(
        &s,
        &owner(),
        pb::ListImagesRequest {
            status: pb::Status::Active as i32,
            ..by_name.clone()
        },
    )
    .await;
    assert!(names.is_empty());

    // Descending by name, pages of 2 with markers, nothing lost or repeated.
    let mut seen = Vec::new();
    let mut marker = String::new();
    for _ in 0..10 {
        let (names, next) = list(
            &s,
            &admin(),
            pb::ListImagesRequest {
                sort_key: pb::SortKey::Name as i32,
                ascending: false,
                limit: 2,
                marker: marker.clone(),
                ..Default::default()
            },
        )
        .await;
        assert!(names.len() <= 2);
        seen.extend(names);
        if next.is_empty() {
            break;
        }
        marker = next;
    }
    assert_eq!(
        seen,
        [
            "f-public",
            "e-private-b",
            "d-community",
            "c-fedora",
            "b-debian",
            "a-ubuntu"
        ]
    );
    // Default sort: newest first.
    let (names, _) = list(&s, &owner(), pb::ListImagesRequest::default()).await;
    assert_eq!(names, ["f-public", "c-fedora", "b-debian", "a-ubuntu"]);

    // Bad list arguments.
    for m in [
        pb::ListImagesRequest {
            limit: 5000,
            ..Default::default()
        },
        pb::ListImagesRequest {
            marker: "nope".into(),
            ..Default::default()
        },
        pb::ListImagesRequest {
            marker: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        },
        pb::ListImagesRequest {
            sort_key: 77,
            ..Default::default()
        },
        pb::ListImagesRequest {
            owner: Some("x y".into()),
            ..Default::default()
        },
    ] {
        assert_code(
            s.client().list_images(req(m, &owner())).await,
            Code::InvalidArgument,
        );
    }
}

#[tokio::test]
async fn members_share_an_image_and_the_member_accepts_or_rejects() {
    let s = Server::start().await;
    let private = s.create_raw(&owner(), "private").await;
    let img = s
        .create(
            &owner(),
            pb::CreateImageRequest {
                visibility: pb::Visibility::Shared as i32,
                ..raw("shared")
            },
        )
        .await
        .unwrap();
    let add = |image: &str, member: &str, who: &runtime::caller::Caller| {
        req(
            pb::AddMemberRequest {
                image_id: image.into(),
                member_id: member.into(),
            },
            who,
        )
    };
    // Only a shared image has members; only its owner adds them.
    assert_code(
        s.client()
            .add_member(add(&private.id, PROJECT_B, &owner()))
            .await,
        Code::FailedPrecondition,
    );
    assert_code(
        s.client()
            .add_member(add(&img.id, PROJECT_B, &reader()))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        s.client()
            .add_member(add(&img.id, PROJECT_B, &other()))
            .await,
        Code::NotFound,
    );
    assert_code(
        s.client()
            .add_member(add(&img.id, PROJECT_A, &owner()))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        s.client()
            .add_member(add(&img.id, "bad id!", &owner()))
            .await,
        Code::InvalidArgument,
    );
    let m = s
        .client()
        .add_member(add(&img.id, PROJECT_B, &owner()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.status, pb::MemberStatus::Pending as i32);
    assert_code(
        s.client()
            .add_member(add(&img.id, PROJECT_B, &owner()))
            .await,
        Code::AlreadyExists,
    );

    // Pending: the member may see it by id, but it is not in its default list.
    s.get(&other(), &img.id).await.unwrap();
    let (names, _) = list(&s, &other(), pb::ListImagesRequest::default()).await;
    assert!(names.is_empty(), "{names:?}");
    let (names, _) = list(
        &s,
        &other(),
        pb::ListImagesRequest {
            member_status: pb::MemberStatus::Pending as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(names, ["shared"]);

    let set = |status: pb::MemberStatus, who: &runtime::caller::Caller| {
        req(
            pb::UpdateMemberRequest {
                image_id: img.id.clone(),
                member_id: PROJECT_B.into(),
                status: status as i32,
            },
            who,
        )
    };
    // Only the member project accepts: not the owner, not a third project's admin-less user.
    assert_code(
        s.client()
            .update_member(set(pb::MemberStatus::Accepted, &owner()))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        s.client()
            .update_member(set(pb::MemberStatus::Unspecified, &other()))
            .await,
        Code::InvalidArgument,
    );
    let m = s
        .client()
        .update_member(set(pb::MemberStatus::Accepted, &other()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.status, pb::MemberStatus::Accepted as i32);
    let (names, _) = list(&s, &other(), pb::ListImagesRequest::default()).await;
    assert_eq!(names, ["shared"]);
    // A member may not change the image.
    assert_code(
        s.client()
            .update_image(req(
                pb::UpdateImageRequest {
                    id: img.id.clone(),
                    name: Some("stolen".into()),
                    ..Default::default()
                },
                &other(),
            ))
            .await,
        Code::PermissionDenied,
    );
    // Members listed: the owner sees all, the member itself.
    let lm = |who: &runtime::caller::Caller| {
        req(
            pb::ListMembersRequest {
                image_id: img.id.clone(),
            },
            who,
        )
    };
    assert_eq!(
        s.client()
            .list_members(lm(&owner()))
            .await
            .unwrap()
            .into_inner()
            .members
            .len(),
        1
    );
    assert_eq!(
        s.client()
            .list_members(lm(&other()))
            .await
            .unwrap()
            .into_inner()
            .members
            .len(),
        1
    );

    // Rejected: out of the list again, still readable by id.
    s.client()
        .update_member(set(pb::MemberStatus::Rejected, &other()))
        .await
        .unwrap();
    let (names, _) = list(&s, &other(), pb::ListImagesRequest::default()).await;
    assert!(names.is_empty());

    // Removed: gone for the member.
    s.client()
        .remove_member(req(
            pb::RemoveMemberRequest {
                image_id: img.id.clone(),
                member_id: PROJECT_B.into(),
            },
            &owner(),
        ))
        .await
        .unwrap();
    assert_code(s.get(&other(), &img.id).await, Code::NotFound);
    assert_code(
        s.client()
            .update_member(set(pb::MemberStatus::Accepted, &other()))
            .await,
        Code::NotFound,
    );
}

#[tokio::test]
async fn image_count_quota() {
    let s = Server::start_with(|c| c.quota_images = 2).await;
    s.create_raw(&owner(), "one").await;
    s.create_raw(&owner(), "two").await;
    assert_status(
        s.create(&owner(), raw("three")).await,
        Code::ResourceExhausted,
        "the project has 2 images, its quota is 2",
    );
    // Per project: another project still has room.
    s.create_raw(&other(), "b-one").await;

    // An admin raises project A's limit; only an admin may.
    let set = |who: &runtime::caller::Caller| {
        req(
            pb::SetQuotaRequest {
                project_id: PROJECT_A.into(),
                max_bytes: 1 << 30,
                max_images: 3,
            },
            who,
        )
    };
    assert_code(
        s.client().set_quota(set(&owner())).await,
        Code::PermissionDenied,
    );
    let q = s
        .client()
        .set_quota(set(&admin()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((q.max_images, q.used_images), (3, 2));
    s.create_raw(&owner(), "three").await;
    let q = s
        .client()
        .get_quota(req(pb::GetQuotaRequest::default(), &reader()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((q.project_id.as_str(), q.used_images), (PROJECT_A, 3));
    assert_code(
        s.client()
            .get_quota(req(
                pb::GetQuotaRequest {
                    project_id: PROJECT_A.into(),
                },
                &other(),
            ))
            .await,
        Code::PermissionDenied,
    );
    // A declared size beyond the byte quota is refused up front.
    assert_code(
        s.create(
            &other(),
            pb::CreateImageRequest {
                expected_size: Some(u64::MAX / 4),
                ..raw("huge")
            },
        )
        .await,
        Code::ResourceExhausted,
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let s = Server::start().await;
    let r = HealthClient::new(s.channel.clone())
        .check(HealthCheckRequest {
            service: "image.v1.Images".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, 1, "SERVING");
    runtime::serve::healthcheck(s.addr).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn malformed_member_ids_and_owner_filters_are_invalid_argument() {
    let s = Server::start().await;
    let img = s
        .create(
            &owner(),
            pb::CreateImageRequest {
                visibility: pb::Visibility::Shared as i32,
                ..raw("shared")
            },
        )
        .await
        .unwrap();
    let mut c = s.client();
    assert_status(
        c.add_member(req(
            pb::AddMemberRequest {
                image_id: img.id.clone(),
                member_id: "zz".into(),
            },
            &owner(),
        ))
        .await,
        Code::InvalidArgument,
        "member_id: is not a valid id: \"zz\"",
    );
    // Nothing was written.
    let members = c
        .list_members(req(
            pb::ListMembersRequest {
                image_id: img.id.clone(),
            },
            &owner(),
        ))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert!(members.is_empty(), "{members:?}");
    assert_status(
        c.list_images(req(
            pb::ListImagesRequest {
                owner: Some("zz".into()),
                ..Default::default()
            },
            &owner(),
        ))
        .await,
        Code::InvalidArgument,
        "owner: is not a valid id: \"zz\"",
    );
    // A well-formed owner in any UUID spelling finds the images.
    let dashed = uuid::Uuid::parse_str(PROJECT_A).unwrap().to_string();
    let found = c
        .list_images(req(
            pb::ListImagesRequest {
                owner: Some(dashed),
                ..Default::default()
            },
            &owner(),
        ))
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(found.len(), 1);
}

#[tokio::test]
async fn a_database_failure_reads_exactly_internal_error() {
    let s = Server::start().await;
    let img = s.create_raw(&owner(), "doomed").await;
    // Break the schema under the running service.
    let db = runtime::db::connect(&s.db.url).await.unwrap();
    db.batch_execute("ALTER TABLE image.images RENAME TO images_gone")
        .await
        .unwrap();
    assert_status(
        s.get(&owner(), &img.id).await,
        Code::Internal,
        "internal error",
    );
    assert_status(
        s.create(&owner(), raw("another")).await,
        Code::Internal,
        "internal error",
    );
}

#[tokio::test]
async fn an_undecodable_request_is_invalid_argument() {
    use common::raw::RawCall;
    let s = Server::start().await;
    // Garbage bytes, and a string field holding invalid UTF-8 (field 1, `id`).
    for (payload, message) in [
        (
            &b"\xff\xff\xff\xff\xff\xff"[..],
            "the message does not decode: failed to decode Protobuf message: invalid varint",
        ),
        (
            &b"\x0a\x02\xff\xfe"[..],
            "the message does not decode: failed to decode Protobuf message: \
             GetImageRequest.id: invalid string value: data is not UTF-8 encoded",
        ),
    ] {
        let mut call = RawCall::open(s.addr, "/image.v1.Images/GetImage", &owner()).await;
        call.send_message(payload, true);
        let st = call.status().await;
        assert_eq!(
            (st.code(), st.message()),
            (Code::InvalidArgument, message),
            "{payload:?}"
        );
    }
    // The same connection-level client still gets real answers.
    let img = s.create_raw(&owner(), "fine").await;
    s.get(&owner(), &img.id).await.unwrap();
}
