//! `image`: serve the image service, or check its health (`image healthcheck`).

fn main() -> std::process::ExitCode {
    runtime::process::service_main::<image::Config>()
}
