fn main() -> std::process::ExitCode {
    runtime::process::service_main::<compute_api::Config>()
}
