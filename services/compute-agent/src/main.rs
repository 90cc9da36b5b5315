fn main() -> std::process::ExitCode {
    runtime::process::service_main::<compute_agent::Config>()
}
