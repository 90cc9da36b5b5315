//! `network-agent`: run the per-host network agent, or check its health.

fn main() -> std::process::ExitCode {
    runtime::process::service_main::<network_agent::Config>()
}
