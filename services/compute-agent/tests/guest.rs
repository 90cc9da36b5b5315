//! Real guests: the build table's steps on `qemu:///system` (TCG here) with
//! the tiny test guest, its three images fetched from the real image service
//! through the real mesh (the agent's sidecar, mTLS, image's sidecar checking
//! the user's token). The guest boots by direct kernel boot from the cached
//! aki/ari on its own qcow2 overlay, reads its `config-2` ISO, and prints its
//! hostname and uuid on the serial console, which libvirt writes to the log
//! the agent tails. Unwinding leaves no domain, overlay, config drive or log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use compute_agent::clients::Services;
use compute_agent::images::ImageCache;
use compute_agent::libvirt::Libvirt;
use compute_agent::saga::{self, BUILD, Ctx, Env, Step};
use proto::conductor::v1 as pb;
use uuid::Uuid;

/// TCG boots the tiny guest in about 6 s when idle; generous for a loaded CI.
const BOOT: Duration = Duration::from_secs(240);

fn env(mesh: &common::Mesh, state: &std::path::Path) -> Env {
    Env {
        services: Services::new(
            Some(mesh.outbound),
            &format!("spiffe://cirrus.local/svc/compute-agent/host/{}", mesh.host),
        )
        .unwrap(),
        cache: ImageCache::new(state.join("images"), 1 << 30),
        availability_zone: "nova".into(),
        vif_plug_timeout: Duration::from_secs(60),
        kernel_cmdline: "console=ttyS0 quiet panic=-1".into(),
    }
}

fn spec(host: &str, id: Uuid, name: &str, image: &str) -> pb::BuildSpec {
    pb::BuildSpec {
        server_id: id.to_string(),
        name: name.into(),
        project_id: "p".into(),
        host: host.into(),
        attempt: 1,
        vcpus: 1,
        ram_mb: 256,
        disk_gb: 1,
        image_id: image.into(),
        user_data: b"hello from the guest test\n".to_vec(),
        vm_state: "building".into(),
        ..Default::default()
    }
}

async fn open_libvirt() -> Libvirt {
    tokio::task::spawn_blocking(|| Libvirt::open("qemu:///system", "auto").unwrap())
        .await
        .unwrap()
}

/// Runs every step of the build table, in order, as the agent does.
async fn build(c: &Ctx<'_>) -> Vec<Step> {
    let mut done = Vec::new();
    for row in &BUILD {
        done.push(row.step);
        if let Err(e) = row.step.run(c).await {
            let _ = saga::unwind(&done, c).await;
            panic!("step {} failed: {}", row.name, e.message);
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tcg_guest_boots_from_the_image_service_and_reads_its_config_drive() {
    let files = common::guest_files();
    let mesh = common::Mesh::start().await;
    let image = mesh.upload_tiny_guest(&files).await;
    let state = tempfile::tempdir().unwrap();
    let env = env(&mesh, state.path());
    let lv = open_libvirt().await;
    assert!(
        ["qemu", "kvm"].contains(&lv.domain_type()),
        "{}",
        lv.domain_type()
    );

    let id = Uuid::new_v4();
    let name = format!("guest-{}", &id.to_string()[..8]);
    let spec = spec(&mesh.host, id, &name, &image);
    let dir = saga::server_dir(state.path(), id);
    let ctx = Ctx {
        host: &mesh.host,
        id,
        spec: &spec,
        journal: std::sync::Mutex::new(saga::load_journal(&dir)),
        dir: dir.clone(),
        libvirt: &lv,
        env: &env,
        token: Some(&mesh.token),
    };
    let done = build(&ctx).await;

    // The base, kernel and ramdisk are in the cache by checksum; the overlay
    // stands on the base.
    let j = ctx.journal();
    let base = j.base.clone().expect("a base");
    assert!(base.starts_with(state.path().join("images")), "{base:?}");
    assert!(j.kernel.is_some() && j.ramdisk.is_some(), "{j:?}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(saga::disk_path(&dir))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"], base.display().to_string());

    let log = saga::console_log_path(&dir);
    let wanted = [
        format!("CIRRUS-GUEST hostname={name}"),
        format!("CIRRUS-GUEST uuid={id}"),
        "CIRRUS-GUEST disks=vda,vdb".to_string(),
    ];
    let console = common::wait_console(&log, &wanted, BOOT).await;
    let power = {
        let lv = lv.clone();
        tokio::task::spawn_blocking(move || lv.power(id).unwrap())
            .await
            .unwrap()
    };
    assert_eq!(power, compute_agent::libvirt::Power::Running, "{console}");

    // Delete: every undo, then the directory.
    saga::unwind(&done, &ctx).await.unwrap();
    saga::remove_server_dir(&dir).await.unwrap();
    let exists = {
        let lv = lv.clone();
        tokio::task::spawn_blocking(move || lv.exists(id).unwrap())
            .await
            .unwrap()
    };
    assert!(!exists, "the domain outlived its server");
    assert!(!dir.exists(), "the server directory outlived its server");
    // The cache keeps the bases for the next build.
    assert!(base.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guest_builds_of_one_image_share_one_cached_base() {
    let files = common::guest_files();
    let mesh = common::Mesh::start().await;
    let image = mesh.upload_tiny_guest(&files).await;
    let state = tempfile::tempdir().unwrap();
    let env = env(&mesh, state.path());
    let lv = open_libvirt().await;
    let ids = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    let specs: Vec<_> = ids
        .iter()
        .map(|id| spec(&mesh.host, *id, "same", &image))
        .collect();
    let ctxs: Vec<Ctx> = ids
        .iter()
        .zip(&specs)
        .map(|(id, spec)| {
            let dir = saga::server_dir(state.path(), *id);
            Ctx {
                host: &mesh.host,
                id: *id,
                spec,
                journal: std::sync::Mutex::new(saga::load_journal(&dir)),
                dir,
                libvirt: &lv,
                env: &env,
                token: Some(&mesh.token),
            }
        })
        .collect();
    let runs = ctxs.iter().map(|c| Step::Image.run(c));
    for r in futures_util::future::join_all(runs).await {
        r.unwrap();
    }
    let bases: Vec<_> = ctxs.iter().map(|c| c.journal().base.unwrap()).collect();
    assert!(bases.iter().all(|b| b == &bases[0]), "{bases:?}");
    let mut cached: Vec<String> = std::fs::read_dir(state.path().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    cached.sort();
    // Kernel, ramdisk, root: one file each, no partial download left.
    assert_eq!(cached.len(), 3, "{cached:?}");
    assert!(cached.iter().all(|n| n.len() == 64), "{cached:?}");
    for c in &ctxs {
        Step::Image.undo(c).await.unwrap();
        assert!(!saga::disk_path(&c.dir).exists());
    }

    // Without the user's token the image service refuses the agent, clearly.
    let id = Uuid::new_v4();
    let spec = spec(&mesh.host, id, "anon", &image);
    let dir = saga::server_dir(state.path(), id);
    let ctx = Ctx {
        host: &mesh.host,
        id,
        spec: &spec,
        journal: std::sync::Mutex::new(saga::load_journal(&dir)),
        dir,
        libvirt: &lv,
        env: &env,
        token: None,
    };
    let e = Step::Image.run(&ctx).await.unwrap_err();
    assert!(
        e.message.contains("the cast carried no user token"),
        "{}",
        e.message
    );
}

/// The ports step on the real network service and this host's real network
/// agent: the port made for the server is bound here, the guest's NIC is an
/// OVS interface on the agent's bridge carrying the port id, the guest
/// starts paused and resumes once the port is ACTIVE, and DHCP gives it the
/// port's fixed IP. Unwinding deletes the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tcg_guest_on_an_ovs_port_gets_its_fixed_ip_by_dhcp() {
    use proto::network::v1 as npb;
    let files = common::guest_files();
    let mesh = common::Mesh::start_with(true).await;
    let _net_host = common::NetworkHost::start(&mesh.host, mesh.network_url.as_ref().unwrap());
    let image = mesh.upload_tiny_guest(&files).await;
    let mut net = mesh.networks();
    let network = net
        .create_network(common::auth(
            npb::CreateNetworkRequest {
                name: format!("n-{}", common::uniq()),
                ..Default::default()
            },
            &mesh.token,
        ))
        .await
        .expect("create network")
        .into_inner();
    net.create_subnet(common::auth(
        npb::CreateSubnetRequest {
            network_id: network.id.clone(),
            cidr: "10.77.0.0/24".into(),
            ..Default::default()
        },
        &mesh.token,
    ))
    .await
    .expect("create subnet");

    let state = tempfile::tempdir().unwrap();
    let env = env(&mesh, state.path());
    let lv = open_libvirt().await;
    let id = Uuid::new_v4();
    let name = format!("net-{}", &id.to_string()[..8]);
    let mut spec = spec(&mesh.host, id, &name, &image);
    spec.networks = vec![pb::Network {
        network_id: network.id.clone(),
        ..Default::default()
    }];
    let dir = saga::server_dir(state.path(), id);
    let ctx = Ctx {
        host: &mesh.host,
        id,
        spec: &spec,
        journal: std::sync::Mutex::new(saga::load_journal(&dir)),
        dir: dir.clone(),
        libvirt: &lv,
        env: &env,
        token: Some(&mesh.token),
    };
    // The network agent must be up before a port can be bound to this host.
    let mut done = Vec::new();
    for row in &BUILD {
        done.push(row.step);
        let mut r = row.step.run(&ctx).await;
        if row.step == Step::Ports {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while let Err(e) = &r {
                if tokio::time::Instant::now() > deadline || !e.message.contains("network agent") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                r = row.step.run(&ctx).await;
            }
        }
        if let Err(e) = r {
            let _ = saga::unwind(&done, &ctx).await;
            panic!("step {} failed: {}", row.name, e.message);
        }
    }
    let ports = ctx.journal().ports;
    assert_eq!(ports.len(), 1, "{ports:?}");
    let port = &ports[0];
    assert!(port.created && port.bound, "{port:?}");
    assert_eq!(port.bridge, _net_host.bridge);
    let ip = port.fixed_ips[0].clone();
    let log = saga::console_log_path(&dir);
    let wanted = [
        format!("CIRRUS-GUEST hostname={name}"),
        format!("CIRRUS-GUEST uuid={id}"),
        format!("CIRRUS-GUEST ip={ip}/"),
    ];
    common::wait_console(&log, &wanted, BOOT).await;

    saga::unwind(&done, &ctx).await.unwrap();
    saga::remove_server_dir(&dir).await.unwrap();
    let left = net
        .list_ports(common::auth(
            npb::ListPortsRequest {
                device_id: id.to_string(),
                ..Default::default()
            },
            &mesh.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .ports;
    assert!(left.is_empty(), "ports outlived their server: {left:?}");
}
