//! The cloud's PKI: a cluster CA made once, and a short-lived certificate per
//! workload (and for the operator), renewed while `cirrus up` runs; the
//! sidecars pick renewed files up without a restart.

use std::collections::HashMap;

use super::services::SERVICES;
use super::state::State;
use super::users::Account;

/// Who reads each workload's key: its sidecar's user (absent: `cirrus up`'s).
pub type Owners = HashMap<String, Account>;

/// How long workload certificates live; they are renewed at a third left.
const CERT_HOURS: i64 = 24;

/// Makes the CA once, and a certificate for every workload that lacks a fresh
/// one; agents' certificates name `host` (`.../svc/<agent>/host/<host>`).
pub fn ensure(state: &State, host: &str, owners: &Owners) -> anyhow::Result<()> {
    let dir = state.pki();
    if !dir.join("ca.crt").is_file() {
        certs::Authority::create("Cirrus cluster CA", time::Duration::days(3650))?.save(&dir)?;
    }
    renew(state, host, owners)?;
    // Keys of an earlier run (or one run as root only) go to their owners.
    for (name, a) in owners {
        let key = dir.join(format!("{name}.key"));
        if key.is_file() {
            std::os::unix::fs::chown(&key, Some(a.uid), Some(a.gid))?;
        }
    }
    Ok(())
}

/// Re-issues certificates with less than a third of their life left.
pub fn renew(state: &State, host: &str, owners: &Owners) -> anyhow::Result<()> {
    let dir = state.pki();
    let validity = time::Duration::hours(CERT_HOURS);
    let mut ca = None;
    let workloads = SERVICES.iter().map(|s| {
        let id = certs::service_id(s.name, s.agent.then_some(host));
        (
            s.name.to_string(),
            id,
            vec![s.name.to_string(), "localhost".into()],
        )
    });
    let operator = (
        "user-admin".to_string(),
        certs::user_id("admin"),
        Vec::new(),
    );
    for (file, id, names) in workloads.chain([operator]) {
        if certs::needs_renewal(&dir.join(format!("{file}.crt")), validity) {
            let ca = match &mut ca {
                Some(c) => c,
                None => ca.insert(certs::Authority::load(&dir)?),
            };
            let pair = ca.issue(&id?, &names, validity)?;
            match owners.get(&file) {
                // Written aside, given to its owner, then moved into place:
                // the sidecar re-reading it never finds a key it cannot open.
                Some(a) => {
                    let aside = dir.join(".new");
                    let (crt, key) = certs::write_pair(&aside, &file, &pair)?;
                    std::os::unix::fs::chown(&key, Some(a.uid), Some(a.gid))?;
                    std::fs::rename(&key, dir.join(format!("{file}.key")))?;
                    std::fs::rename(&crt, dir.join(format!("{file}.crt")))?;
                }
                None => {
                    certs::write_pair(&dir, &file, &pair)?;
                }
            }
        }
    }
    Ok(())
}
