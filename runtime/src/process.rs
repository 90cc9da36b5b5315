//! The start of every service binary's `main`: load and validate the config
//! (status 2 and one line when it is bad), start the Tokio runtime, run the
//! command, and turn its outcome into an exit status with one readable line.

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigError, load};

pub fn main<C, F, Fut, E>(
    name: &str,
    config_file: Option<&Path>,
    validate: fn(&C) -> Result<(), ConfigError>,
    body: F,
) -> ExitCode
where
    C: Default + Serialize + DeserializeOwned,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let config: C = match load(config_file).and_then(|c: C| validate(&c).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(body(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `#` shows an error's causes too (anyhow), on one line.
            eprintln!("{name}: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
