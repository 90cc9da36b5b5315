fn main() -> std::process::ExitCode {
    runtime::process::service_main::<scheduler::Config>()
}
