//! `sidecar`: run the mesh proxy beside a service (`serve`, the default), or
//! check one (`healthcheck`: an mTLS handshake with the internal listener).

fn main() -> std::process::ExitCode {
    runtime::process::service_main::<sidecar::Config>()
}
