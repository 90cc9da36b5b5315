fn main() -> std::process::ExitCode {
    runtime::process::service_main::<conductor::Config>()
}
