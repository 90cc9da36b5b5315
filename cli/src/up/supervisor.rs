//! `cirrus up` supervises its children: a child that exits unexpectedly is
//! restarted after a backoff that doubles with each recent exit, and both
//! the exit and the restart are logged (to `cirrus up`'s output and to the
//! child's own log). Only a child that keeps failing — [`MAX_EXITS`] exits
//! within [`WINDOW`] — stops the cloud, with the tail of its log. The state
//! of every process is written to `status.json` for `cirrus status`.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use super::state::{State, tail, terminate};
use super::users::Account;

/// This many exits within [`WINDOW`] and the child is given up on.
pub const MAX_EXITS: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(60);
/// The first restart waits this long; each further recent exit doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// How long to wait before restarting a child that exited `recent` times within the window.
pub fn backoff(recent: usize) -> Duration {
    let doublings = recent.saturating_sub(1).min(16) as u32;
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// What `cirrus status` shows of one process.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ProcStatus {
    pub name: String,
    pub pid: Option<u32>,
    /// `running`, or `restarting` while it waits out its backoff.
    pub state: String,
    pub restarts: u32,
    /// How it ended last, e.g. `signal: 9 (SIGKILL)`.
    pub last_exit: String,
    pub log: PathBuf,
    /// What to know about it (the compute agent's hypervisor, for one).
    #[serde(default)]
    pub note: String,
}

/// How to start one child, again and again.
struct Launch {
    bin: PathBuf,
    args: Vec<String>,
    config: PathBuf,
    log: PathBuf,
    /// Who it runs as; `None`: as `cirrus up`.
    account: Option<Account>,
}

impl Launch {
    /// A child with its config file, its log, and none of our `CIRRUS_*`
    /// environment (which would override the file).
    fn command(&self) -> anyhow::Result<Command> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CIRRUS_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        if let Some(a) = &self.account {
            // Its own user and group only (std drops root's other groups).
            cmd.uid(a.uid).gid(a.gid);
        }
        Ok(cmd)
    }
}

struct Proc {
    name: String,
    launch: Launch,
    child: Option<Child>,
    /// When to start it again, while it waits out its backoff.
    restart_at: Option<Instant>,
    exits: VecDeque<Instant>,
    restarts: u32,
    last_exit: String,
    note: String,
}

/// The children of one `cirrus up`, in start order.
pub struct Supervisor {
    procs: Vec<Proc>,
    status_file: PathBuf,
}

/// A one-shot command with the same config file, log and environment as a
/// supervised child (identity's `bootstrap`).
pub fn oneshot(
    bin: &Path,
    config: &Path,
    log: &Path,
    args: &[&str],
    account: Option<&Account>,
) -> anyhow::Result<Command> {
    Launch {
        bin: bin.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        config: config.into(),
        log: log.into(),
        account: account.cloned(),
    }
    .command()
}

impl Supervisor {
    pub fn new(state: &State) -> Self {
        Self {
            procs: Vec::new(),
            status_file: state.path("status.json"),
        }
    }

    /// Starts `bin --config <config> serve` as `account` (`None`: as
    /// `cirrus up`), logging to `log`.
    pub fn start(
        &mut self,
        name: &str,
        bin: &Path,
        config: &Path,
        log: &Path,
        account: Option<&Account>,
    ) -> anyhow::Result<()> {
        let launch = Launch {
            bin: bin.into(),
            args: vec!["serve".into()],
            config: config.into(),
            log: log.into(),
            account: account.cloned(),
        };
        let child = launch
            .command()?
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.procs.push(Proc {
            name: name.into(),
            launch,
            child: Some(child),
            restart_at: None,
            exits: VecDeque::new(),
            restarts: 0,
            last_exit: String::new(),
            note: String::new(),
        });
        self.write_status();
        Ok(())
    }

    /// Sets what `cirrus status` says about `name`.
    pub fn set_note(&mut self, name: &str, note: &str) {
        if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
            p.note = note.into();
        }
        self.write_status();
    }

    /// While the cloud starts, any exit is a failure to start.
    pub fn check_starting(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(child) = &mut p.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited ({status}) while starting:\n{}",
                    p.name,
                    tail(&p.launch.log, 15)
                );
            }
        }
        Ok(())
    }

    /// One round: notices exits, restarts what has waited out its backoff;
    /// an error when a child keeps failing (the cloud then stops).
    pub fn tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut changed = false;
        for p in &mut self.procs {
            if let Some(child) = &mut p.child
                && let Some(status) = child.try_wait()?
            {
                p.child = None;
                p.last_exit = status.to_string();
                p.exits.push_back(now);
                while p.exits.front().is_some_and(|t| now - *t > WINDOW) {
                    p.exits.pop_front();
                }
                changed = true;
                if p.exits.len() >= MAX_EXITS {
                    eprintln!(
                        "--- the end of {} ---\n{}\n---",
                        p.launch.log.display(),
                        tail(&p.launch.log, 20)
                    );
                    bail!(
                        "{} keeps failing ({} exits within {} s, the last {status}); stopping the cloud",
                        p.name,
                        p.exits.len(),
                        WINDOW.as_secs(),
                    );
                }
                let wait = backoff(p.exits.len());
                println!(
                    "{} exited unexpectedly ({status}); restarting it in {:.1} s",
                    p.name,
                    wait.as_secs_f64()
                );
                p.restart_at = Some(now + wait);
            }
            if p.restart_at.is_some_and(|t| now >= t) {
                p.restart_at = None;
                p.restarts += 1;
                if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(&p.launch.log) {
                    let _ = writeln!(
                        log,
                        "--- cirrus up: restart {} after {} ---",
                        p.restarts, p.last_exit
                    );
                }
                match p.launch.command().and_then(|mut c| Ok(c.spawn()?)) {
                    Ok(child) => {
                        let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
                        println!("{} restarted (pid {pid})", p.name);
                        p.child = Some(child);
                    }
                    Err(e) => {
                        // Counted as one more exit: a binary that cannot start keeps failing.
                        println!("{} could not be restarted: {e:#}", p.name);
                        p.last_exit = format!("could not start: {e}");
                        p.exits.push_back(now);
                        p.restart_at = Some(now + backoff(p.exits.len()));
                    }
                }
                changed = true;
            }
        }
        if changed {
            self.write_status();
        }
        Ok(())
    }

    fn write_status(&self) {
        let list: Vec<ProcStatus> = self
            .procs
            .iter()
            .map(|p| ProcStatus {
                name: p.name.clone(),
                pid: p.child.as_ref().and_then(Child::id),
                state: if p.child.is_some() {
                    "running"
                } else {
                    "restarting"
                }
                .into(),
                restarts: p.restarts,
                last_exit: p.last_exit.clone(),
                log: p.launch.log.clone(),
                note: p.note.clone(),
            })
            .collect();
        let tmp = self.status_file.with_extension("tmp");
        let written = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.status_file));
        if let Err(e) = written {
            eprintln!("cannot write {}: {e}", self.status_file.display());
        }
    }

    /// Stops every child in reverse start order (sidecars before their
    /// services, identity last), killing what does not stop within 15 s.
    pub async fn stop_all(&mut self) {
        for p in self.procs.iter().rev() {
            if let Some(pid) = p.child.as_ref().and_then(Child::id) {
                terminate(pid).await;
            }
        }
        for p in self.procs.iter_mut().rev() {
            if let Some(child) = &mut p.child
                && tokio::time::timeout(Duration::from_secs(15), child.wait())
                    .await
                    .is_err()
            {
                eprintln!("{} did not stop within 15 s; killing it", p.name);
                let _ = child.kill().await;
            }
        }
        let _ = std::fs::remove_file(&self.status_file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_bound() {
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        // Giving up comes well inside the window: the waits before it add up to less.
        let before: Duration = (1..MAX_EXITS).map(backoff).sum();
        assert!(before < WINDOW);
    }
}
