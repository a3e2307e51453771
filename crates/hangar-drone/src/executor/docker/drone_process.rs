//! The process a container of an *ephemeral* drone (one without a state file, `hangar dev
//! --in-memory` among them) belongs to, written on the container as the label
//! [`DRONE_PROCESS_LABEL`], so that any drone of the same machine can later prove that process dead
//! and remove what it left behind.
//!
//! An ephemeral drone stops its containers when it shuts down, and no later run can re-adopt them
//! (nothing records them), so once its process is gone they are orphans, whatever drone name the
//! next run takes. A drone with a state file puts no such label: its containers outlive it on
//! purpose, and only a drone of its own name (which re-adopts them first) removes them.
//!
//! A process is named by the kernel's boot id, its pid namespace, its pid and its start time (a
//! reused pid comes with another start time). Only a process of this boot and this pid namespace
//! can be proven gone; of any other (another machine sharing the Docker engine, another container)
//! nothing is concluded and its containers are left alone.

use std::fmt;
use std::str::FromStr;

/// Label naming the process of the ephemeral drone that started the container.
pub const DRONE_PROCESS_LABEL: &str = "dev.hangar.drone-process";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroneProcess {
    /// `/proc/sys/kernel/random/boot_id`: changes at each boot, the same for every namespace.
    boot_id: String,
    /// The pid namespace's inode (`/proc/self/ns/pid` reads `pid:[<inode>]`).
    pid_namespace: u64,
    pid: u32,
    /// Clock ticks after the boot.
    start_ticks: u64,
}

impl DroneProcess {
    /// This process; `None` where `/proc` cannot tell (not Linux, `/proc` not mounted): its
    /// containers then carry no label and are left to the operator, as before.
    pub fn current() -> Option<DroneProcess> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
        let pid = std::process::id();
        Some(DroneProcess {
            boot_id: boot_id.trim().to_string(),
            pid_namespace: parse_namespace(namespace.to_str()?)?,
            pid,
            start_ticks: hangar_process_metrics::start_ticks(pid)?,
        })
    }

    /// Whether `self` is proven gone, seen from `here` (the running process): it ran in this boot
    /// and this pid namespace, and its pid is free or now another process's. A process that exists
    /// but whose `/proc` entry cannot be read (another user's, under `hidepid`) is not gone.
    pub fn is_gone(&self, here: &DroneProcess) -> bool {
        if self.boot_id != here.boot_id || self.pid_namespace != here.pid_namespace {
            return false;
        }
        if !process_exists(self.pid) {
            return true;
        }
        hangar_process_metrics::start_ticks(self.pid).is_some_and(|t| t != self.start_ticks)
    }
}

/// `kill(pid, 0)`: only "no such process" means none (not permitted means someone else's).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// `pid:[4026531836]` → 4026531836.
fn parse_namespace(link: &str) -> Option<u64> {
    link.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// The label value: `<boot id>.<pid namespace>.<pid>.<start ticks>`.
impl fmt::Display for DroneProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DroneProcess {
            boot_id,
            pid_namespace,
            pid,
            start_ticks,
        } = self;
        write!(f, "{boot_id}.{pid_namespace}.{pid}.{start_ticks}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a drone process label: {0:?}")]
pub struct InvalidDroneProcess(String);

impl FromStr for DroneProcess {
    type Err = InvalidDroneProcess;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidDroneProcess(s.to_string());
        let mut parts = s.split('.');
        let mut next = || parts.next().filter(|p| !p.is_empty()).ok_or_else(invalid);
        let process = DroneProcess {
            boot_id: next()?.to_string(),
            pid_namespace: next()?.parse().map_err(|_| invalid())?,
            pid: next()?.parse().map_err(|_| invalid())?,
            start_ticks: next()?.parse().map_err(|_| invalid())?,
        };
        match parts.next() {
            Some(_) => Err(invalid()),
            None => Ok(process),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn label_value_round_trips() {
        let process = DroneProcess {
            boot_id: "0b6b1a8c-5f0e-4c2a-9d11-7f3c2e1a9b00".into(),
            pid_namespace: 4_026_531_836,
            pid: 4242,
            start_ticks: 123_456,
        };
        assert_eq!(process.to_string().parse::<DroneProcess>(), Ok(process));
        for bad in ["", "b.1.2", "b.1.2.3.4", "b.x.2.3", "b..2.3", "b.1.2.-3"] {
            assert!(bad.parse::<DroneProcess>().is_err(), "{bad}");
        }
        assert_eq!(parse_namespace("pid:[4026531836]"), Some(4_026_531_836));
        assert_eq!(parse_namespace("net:[4026531836]"), None);
    }

    #[test]
    fn only_a_process_of_this_boot_and_namespace_is_proven_gone() {
        let Some(here) = DroneProcess::current() else {
            return;
        };
        assert!(!here.is_gone(&here), "this process runs");
        let restarted = DroneProcess {
            start_ticks: here.start_ticks + 1,
            ..here.clone()
        };
        assert!(restarted.is_gone(&here), "a reused pid is another process");
        // A pid above the kernel's limit (2^22) is free.
        let exited = DroneProcess {
            pid: 1 << 23,
            ..here.clone()
        };
        assert!(exited.is_gone(&here));
        let elsewhere = DroneProcess {
            boot_id: "another-machine".into(),
            ..exited.clone()
        };
        assert!(
            !elsewhere.is_gone(&here),
            "nothing is known of another boot"
        );
        let other_namespace = DroneProcess {
            pid_namespace: here.pid_namespace + 1,
            ..exited
        };
        assert!(!other_namespace.is_gone(&here));
    }
}
