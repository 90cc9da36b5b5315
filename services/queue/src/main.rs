//! `queue`: serve the queue service, or check its health.

fn main() -> std::process::ExitCode {
    runtime::process::service_main::<queue::Config>()
}
