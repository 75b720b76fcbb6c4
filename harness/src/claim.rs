//! Claims: a run is trained by exactly one of the processes sharing a results directory.
//!
//! A claim is `<run id>.claim`, created exclusively (`O_EXCL`), naming the host and pid that
//! holds it. While the run trains, a heartbeat thread touches the file's modification time; a
//! claim whose heartbeat is older than the timeout belongs to a process that died (`kill -9`,
//! a lost node) and is taken over. Take-overs are serialised by a lock on `.claims.lock`, and
//! re-check the heartbeat under it, so two processes never take over the same claim. A claim
//! is released (its file removed) when the run ends, ok or not.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// How long a claim lives without a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClaimPolicy {
    /// A claim whose heartbeat is older than this is stale and taken over.
    pub stale_after: Duration,
}

impl Default for ClaimPolicy {
    fn default() -> Self {
        // Generous: a heartbeat lost to a slow shared filesystem must not cost a second run.
        Self {
            stale_after: Duration::from_secs(600),
        }
    }
}

impl ClaimPolicy {
    /// The heartbeat interval: a quarter of the timeout, at most 30 s.
    pub fn heartbeat(&self) -> Duration {
        (self.stale_after / 4)
            .min(Duration::from_secs(30))
            .max(Duration::from_millis(50))
    }
}

/// The outcome of trying to claim a run.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// This process holds the run now.
    Claimed(Claim),
    /// This process took the run over from a stale claim, described here.
    TookOver(Claim, String),
    /// Another live process holds it (its claim's contents).
    Held(String),
}

/// A held claim; dropping it releases the run.
#[derive(Debug)]
pub struct Claim {
    path: PathBuf,
    file: Arc<File>,
    stop: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
}

/// The claim file of a run.
pub fn claim_path(runs_dir: &Path, run_id: &str) -> PathBuf {
    runs_dir.join(format!("{run_id}.claim"))
}

/// This host's name, for claim files.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Who holds a live claim on `run_id`, if anyone (a stale claim is reported as such).
pub fn holder(runs_dir: &Path, run_id: &str, policy: ClaimPolicy) -> Option<String> {
    let path = claim_path(runs_dir, run_id);
    let age = heartbeat_age(&path).ok()??;
    let who = read_holder(&path);
    Some(if age > policy.stale_after {
        format!("stale claim, no heartbeat for {}s: {who}", age.as_secs())
    } else {
        who
    })
}

/// Tries to claim `run_id` in `runs_dir`.
pub fn try_claim(
    runs_dir: &Path,
    run_id: &str,
    policy: ClaimPolicy,
) -> std::io::Result<ClaimOutcome> {
    let path = claim_path(runs_dir, run_id);
    if let Some(file) = create_exclusive(&path, run_id)? {
        return Ok(ClaimOutcome::Claimed(Claim::hold(path, file, policy)));
    }
    let Some(age) = heartbeat_age(&path)? else {
        // Released between our attempt and the look: try once more.
        return Ok(match create_exclusive(&path, run_id)? {
            Some(file) => ClaimOutcome::Claimed(Claim::hold(path, file, policy)),
            None => ClaimOutcome::Held(read_holder(&path)),
        });
    };
    if age <= policy.stale_after {
        return Ok(ClaimOutcome::Held(read_holder(&path)));
    }
    // Stale: take it over under the directory's lock, after checking again.
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(runs_dir.join(".claims.lock"))?;
    lock.lock()?;
    let outcome = match heartbeat_age(&path)? {
        Some(age) if age > policy.stale_after => {
            let previous = format!(
                "{} (no heartbeat for {}s)",
                read_holder(&path),
                age.as_secs()
            );
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match create_exclusive(&path, run_id)? {
                Some(file) => ClaimOutcome::TookOver(Claim::hold(path, file, policy), previous),
                // A fresh claimer (which takes no lock) got there first.
                None => ClaimOutcome::Held(read_holder(&path)),
            }
        }
        Some(_) => ClaimOutcome::Held(read_holder(&path)),
        None => match create_exclusive(&path, run_id)? {
            Some(file) => ClaimOutcome::Claimed(Claim::hold(path, file, policy)),
            None => ClaimOutcome::Held(read_holder(&path)),
        },
    };
    lock.unlock()?;
    Ok(outcome)
}

/// The claim file, created now, or None when one exists.
fn create_exclusive(path: &Path, run_id: &str) -> std::io::Result<Option<File>> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(mut f) => {
            writeln!(
                f,
                "{{\"run_id\": \"{run_id}\", \"host\": \"{}\", \"pid\": {}, \"claimed_at\": {}}}",
                host_name(),
                std::process::id(),
                now_secs()
            )?;
            f.sync_all()?;
            Ok(Some(f))
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e),
    }
}

/// Time since the claim's last heartbeat, or None when there is no claim.
fn heartbeat_age(path: &Path) -> std::io::Result<Option<Duration>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(
            SystemTime::now()
                .duration_since(m.modified()?)
                .unwrap_or_default(),
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_holder(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "a claim just released".into())
}

impl Claim {
    fn hold(path: PathBuf, file: File, policy: ClaimPolicy) -> Self {
        let file = Arc::new(file);
        let stop = Arc::new(AtomicBool::new(false));
        let beat = policy.heartbeat();
        let heartbeat = {
            let (file, stop) = (file.clone(), stop.clone());
            std::thread::spawn(move || {
                let tick = Duration::from_millis(20).min(beat);
                let mut since = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    since += tick;
                    if since >= beat {
                        // Through our own handle: once taken over, our file is unlinked and
                        // touching it cannot refresh the new holder's claim.
                        let _ = file.set_modified(SystemTime::now());
                        since = Duration::ZERO;
                    }
                }
            })
        };
        Self {
            path,
            file,
            stop,
            heartbeat: Some(heartbeat),
        }
    }

    /// Whether the claim file on disk is still this claim (it was not taken over).
    pub fn still_held(&self) -> bool {
        same_file(&self.file, &self.path)
    }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        // Remove only our own claim: a process that took a stale one over owns the file now.
        if self.still_held() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let policy = ClaimPolicy::default();
        let ClaimOutcome::Claimed(c) = try_claim(dir.path(), "r", policy).unwrap() else {
            panic!("first claim")
        };
        let ClaimOutcome::Held(holder) = try_claim(dir.path(), "r", policy).unwrap() else {
            panic!("second claim must see the first")
        };
        assert!(
            holder.contains(&format!("\"pid\": {}", std::process::id())),
            "{holder}"
        );
        drop(c);
        assert!(!claim_path(dir.path(), "r").exists());
        assert!(matches!(
            try_claim(dir.path(), "r", policy).unwrap(),
            ClaimOutcome::Claimed(_)
        ));
    }

    #[test]
    fn a_stale_claim_is_taken_over_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = claim_path(dir.path(), "r");
        std::fs::write(&path, "{\"host\": \"gone\", \"pid\": 1}").unwrap();
        let old = SystemTime::now() - Duration::from_secs(30);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let policy = ClaimPolicy {
            stale_after: Duration::from_secs(10),
        };
        let ClaimOutcome::TookOver(claim, previous) = try_claim(dir.path(), "r", policy).unwrap()
        else {
            panic!("stale claim not taken over")
        };
        assert!(previous.contains("gone"), "{previous}");
        // The new claim is live: its heartbeat keeps it from being taken over in turn.
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(
            try_claim(dir.path(), "r", policy).unwrap(),
            ClaimOutcome::Held(_)
        ));
        assert!(claim.still_held());
    }

    #[test]
    fn a_heartbeat_keeps_a_long_run_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let policy = ClaimPolicy {
            stale_after: Duration::from_millis(400),
        };
        let ClaimOutcome::Claimed(_c) = try_claim(dir.path(), "r", policy).unwrap() else {
            panic!()
        };
        // Three timeouts later the claim is still fresh, so still held.
        std::thread::sleep(Duration::from_millis(1200));
        assert!(matches!(
            try_claim(dir.path(), "r", policy).unwrap(),
            ClaimOutcome::Held(_)
        ));
    }
}
