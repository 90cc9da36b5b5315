//! `identity`: serve the identity service, bootstrap it, or check its health.

fn main() -> std::process::ExitCode {
    runtime::process::service_main::<identity::Config>()
}
