//! `volume`: serve the volume service, or check its health.

fn main() -> std::process::ExitCode {
    runtime::process::service_main::<volume::Config>()
}
