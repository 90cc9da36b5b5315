//! The cloud's PKI: a cluster CA made once, and a short-lived certificate per
//! workload (and for the operator), renewed while `cirrus up` runs; the
//! sidecars pick renewed files up without a restart.

use super::services::SERVICES;
use super::state::State;

/// How long workload certificates live; they are renewed at a third left.
const CERT_HOURS: i64 = 24;

/// Makes the CA once, and a certificate for every workload that lacks a fresh
/// one; agents' certificates name `host` (`.../svc/<agent>/host/<host>`).
pub fn ensure(state: &State, host: &str) -> anyhow::Result<()> {
    let dir = state.pki();
    if !dir.join("ca.crt").is_file() {
        certs::Authority::create("Cirrus cluster CA", time::Duration::days(3650))?.save(&dir)?;
    }
    renew(state, host)
}

/// Re-issues certificates with less than a third of their life left.
pub fn renew(state: &State, host: &str) -> anyhow::Result<()> {
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
            certs::write_pair(&dir, &file, &pair)?;
        }
    }
    Ok(())
}
