//! What `cirrus down` clears from this machine once every process has
//! stopped, so that nothing the cloud made outlives it: the guests the
//! compute agent defined in libvirt (the domains named `cirrus-<id>` whose
//! disks or console log lie in this cloud's state directory; guests of
//! other clouds are left alone), then everything the network agent made —
//! its namespaces with their dnsmasqs, the interfaces on its bridge, the
//! bridge and its state (`network_agent::teardown`, scoped by this cloud's
//! namespace prefix and bridge). Run again after a crash, it finds nothing
//! more to do.

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use super::site::TEST_URI;
use super::state::State;

const LIMIT: Duration = Duration::from_secs(30);

/// A bounded command's stdout, or why not.
async fn output(prog: &str, args: &[&str]) -> Result<String, String> {
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(LIMIT, c.output()).await {
        Ok(Ok(o)) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(Ok(o)) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{prog} {args:?} did not finish within {LIMIT:?}")),
    }
}

fn load<C: serde::de::DeserializeOwned>(path: &Path) -> Option<C> {
    // The file alone, without `CIRRUS_*` overrides (which name our own options).
    toml::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The libvirt domains of this cloud: `cirrus-*` domains whose XML names a
/// path in the compute agent's state directory.
pub async fn domains(uri: &str, agent_state: &Path) -> Vec<String> {
    let Ok(names) = output("virsh", &["-c", uri, "list", "--all", "--name"]).await else {
        return Vec::new();
    };
    let mut ours = Vec::new();
    let dir = agent_state.display().to_string();
    for name in names
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with("cirrus-"))
    {
        if let Ok(xml) = output("virsh", &["-c", uri, "dumpxml", name]).await
            && xml.contains(&dir)
        {
            ours.push(name.to_string());
        }
    }
    ours
}

/// Clears the host; returns one line per thing it could not clear.
pub async fn teardown(state: &State) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(c) = load::<compute_agent::Config>(&state.path("compute-agent.toml"))
        && c.libvirt_uri != TEST_URI
    {
        let uri = c.libvirt_uri.as_str();
        for d in domains(uri, &c.state_dir).await {
            // Destroy fails for a domain that is not running: fine.
            let _ = output("virsh", &["-c", uri, "destroy", &d]).await;
            let undefined = match output(
                "virsh",
                &[
                    "-c",
                    uri,
                    "undefine",
                    "--managed-save",
                    "--snapshots-metadata",
                    &d,
                ],
            )
            .await
            {
                Ok(_) => Ok(String::new()),
                Err(_) => output("virsh", &["-c", uri, "undefine", &d]).await,
            };
            if let Err(e) = undefined {
                problems.push(format!("libvirt domain {d} could not be removed: {e}"));
            }
        }
    }
    if let Some(c) = load::<network_agent::Config>(&state.path("network-agent.toml"))
        && let Err(e) = network_agent::teardown(&c).await
    {
        problems.push(format!(
            "the network agent's bridge {} could not be removed: {e:#}",
            c.bridge
        ));
    }
    problems
}
