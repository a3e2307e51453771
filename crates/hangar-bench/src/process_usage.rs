//! Memory and CPU use of a process, read from `/proc/<pid>/status` and `/proc/<pid>/stat`.

use anyhow::Context;
use std::time::Duration;

/// Which process to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    This,
    Other(u32),
}

impl Pid {
    fn dir(self) -> String {
        match self {
            Pid::This => "/proc/self".into(),
            Pid::Other(pid) => format!("/proc/{pid}"),
        }
    }
}

/// Resident set size (`VmRSS`) in bytes.
pub fn rss_bytes(pid: Pid) -> anyhow::Result<u64> {
    let path = format!("{}/status", pid.dir());
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .with_context(|| format!("no VmRSS line in {path}"))?;
    Ok(kib * 1024)
}

/// CPU time (user + system, all threads) the process has used so far.
pub fn cpu_time(pid: Pid) -> anyhow::Result<Duration> {
    let path = format!("{}/stat", pid.dir());
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: fields after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("unexpected format of {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `after` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("field {i} missing in {path}"))
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_secs_f64(
        total as f64 / clock_ticks_per_second(),
    ))
}

/// CPU time of the process and of its living child processes (nginx's master and its workers).
pub fn cpu_time_with_children(pid: u32) -> anyhow::Result<Duration> {
    let mut total = cpu_time(Pid::Other(pid))?;
    for child in children(pid)? {
        // A child that exited in between has nothing more to add.
        if let Ok(t) = cpu_time(Pid::Other(child)) {
            total += t;
        }
    }
    Ok(total)
}

/// The child processes of `pid`, from `/proc/<pid>/task/<tid>/children` of each of its threads.
fn children(pid: u32) -> anyhow::Result<Vec<u32>> {
    let tasks = format!("/proc/{pid}/task");
    let mut children = Vec::new();
    for task in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let path = task
            .with_context(|| format!("reading {tasks}"))?
            .path()
            .join("children");
        let list = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        children.extend(
            list.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    Ok(children)
}

/// `USER_HZ`, the unit of `/proc/<pid>/stat` times: 100 on every mainstream Linux ABI; asked from
/// `getconf` in case this one differs.
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|hz| *hz > 0.0)
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(rss_bytes(Pid::This).unwrap() > 0);
        let before = cpu_time(Pid::This).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time(Pid::This).unwrap() >= before);
        assert!(rss_bytes(Pid::Other(u32::MAX)).is_err());
        let sleeper = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(children(std::process::id())
            .unwrap()
            .contains(&sleeper.id()));
        assert!(cpu_time_with_children(std::process::id()).unwrap() >= before);
        let mut sleeper = sleeper;
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}
