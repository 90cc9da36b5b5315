//! `network`: serve the network service, or check its health.

fn main() -> std::process::ExitCode {
    runtime::process::service_main::<network::Config>()
}
