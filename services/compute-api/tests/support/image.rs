//! The image service for compute tests (shared by compute-api's and
//! conductor's tests): a real image server on the test database (schema
//! `image`), and uploads made as the sidecar would present the caller.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;

use proto::image::v1 as ipb;
use runtime::caller::Caller;
use runtime::config::{DatabaseConfig, ServerConfig};
use runtime::testing::{Served, admin, req, wait_for};

/// The size of the tiny image every test boots.
pub const TINY_IMAGE_BYTES: usize = 4096;

/// Starts the image service and uploads a public raw image of 4 KiB
/// (architecture x86_64) as an administrator; the server and the image id.
pub async fn start_image(db_url: &str, store: &Path) -> (Served, String) {
    let cfg = image::Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
        },
        database: DatabaseConfig {
            url: db_url.into(),
            schema: "image".into(),
            pool_size: 4,
        },
        store_dir: store.to_path_buf(),
        ..Default::default()
    };
    let served = Served::spawn(|l, s| image::run(cfg, l, s)).await;
    let addr = served.addr;
    wait_for(
        "the image service",
        std::time::Duration::from_secs(20),
        || async move { runtime::serve::healthcheck(addr).await },
    )
    .await;
    let id = upload_image(
        &served,
        &admin(),
        ipb::CreateImageRequest {
            name: "tiny".into(),
            visibility: ipb::Visibility::Public as i32,
            properties: HashMap::from([("architecture".to_string(), "x86_64".to_string())]),
            ..Default::default()
        },
        Some(vec![0u8; TINY_IMAGE_BYTES]),
    )
    .await;
    (served, id)
}

/// Creates an image as `who` (raw, bare unless `create` says otherwise)
/// and, with `data`, uploads it (it is then active); its id.
pub async fn upload_image(
    image: &Served,
    who: &Caller,
    create: ipb::CreateImageRequest,
    data: Option<Vec<u8>>,
) -> String {
    let mut c = ipb::images_client::ImagesClient::new(image.channel.clone());
    let create = ipb::CreateImageRequest {
        disk_format: if create.disk_format == 0 {
            ipb::DiskFormat::Raw as i32
        } else {
            create.disk_format
        },
        container_format: if create.container_format == 0 {
            ipb::ContainerFormat::Bare as i32
        } else {
            create.container_format
        },
        ..create
    };
    let img = c
        .create_image(req(create, who))
        .await
        .expect("create image")
        .into_inner();
    if let Some(data) = data {
        c.upload(req(
            tokio_stream::iter([ipb::UploadRequest {
                image_id: img.id.clone(),
                data: data.into(),
            }]),
            who,
        ))
        .await
        .expect("upload image");
    }
    img.id
}
