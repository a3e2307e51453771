//! The Prometheus series every Hangar process exposes besides its component's own:
//! `hangar_build_info{version, git_hash}` (always 1) and Prometheus' standard process series, named
//! as its client libraries name them: `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds` and
//! `process_start_time_seconds`.
//!
//! The process series are read from `/proc/self` at each scrape (a few small file reads; nothing is
//! kept between scrapes). A value that cannot be read (not Linux, `/proc` not mounted) is left out
//! rather than reported as 0. With one process running several components (`hangar dev`) every
//! component's metrics carry the same process series.

use hangar_types::{git_hash, VERSION};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

/// Appends these series to `out` in the Prometheus text format 0.0.4 (no `# EOF` line, so the text
/// can follow a component's own).
pub fn encode(out: &mut String) -> Result<(), std::fmt::Error> {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    let registry = REGISTRY.get_or_init(|| {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        registry
    });
    prometheus_text::encode(out, registry)
}

/// `/proc` reports CPU times and start times in clock ticks of `USER_HZ`, which Linux fixes at 100
/// for user space on every architecture it supports (`sysconf(_SC_CLK_TCK)`).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = ConstGauge::new(1_i64);
        let labels = [("version", VERSION), ("git_hash", git_hash())];
        let mut family = encoder.encode_descriptor(
            "hangar_build_info",
            "Version and git commit of this Hangar binary (always 1)",
            None,
            info.metric_type(),
        )?;
        info.encode(family.encode_family(&labels)?)?;

        let sample = ProcessSample::read();
        if let Some(cpu) = sample.cpu_seconds {
            let counter = ConstCounter::new(cpu);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                sample.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                sample.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                sample.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                sample.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                sample.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// One reading of `/proc/self`; `None` for what could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessSample {
    pub fn read() -> ProcessSample {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(stat_fields);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| boot_time(&text));
        ProcessSample {
            cpu_seconds: stat
                .as_ref()
                .map(|s| (s.utime + s.stime) as f64 / TICKS_PER_SECOND),
            resident_bytes: status_kib(&status, "VmRSS:").map(|kib| kib * 1024.0),
            virtual_bytes: status_kib(&status, "VmSize:").map(|kib| kib * 1024.0),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as f64),
            max_fds: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|text| max_open_files(&text)),
            start_time_seconds: stat
                .zip(boot_time)
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / TICKS_PER_SECOND),
        }
    }
}

/// When process `pid` started, in clock ticks after the boot (`/proc/<pid>/stat`, field 22); `None`
/// when no such process runs (or `/proc` cannot be read). With the pid it identifies one process:
/// a reused pid comes with another start time.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_fields(&stat)?.start_ticks)
}

/// The fields of `/proc/<pid>/stat` used here, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatFields {
    utime: u64,
    stime: u64,
    start_ticks: u64,
}

fn stat_fields(stat: &str) -> Option<StatFields> {
    // The command name (field 2) may hold spaces and parentheses: count fields after the last `)`.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    // `rest` starts at field 3 (state); utime is field 14, stime 15, starttime 22.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(StatFields {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
    })
}

/// A `Name:   1234 kB` line of `/proc/self/status`, in KiB.
fn status_kib(status: &str, name: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.get(name.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The boot time (seconds since the epoch) from the `btime` line of `/proc/stat`.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft limit of the `Max open files` line of `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .get("Max open files".len()..)?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(f64::INFINITY),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    3 0 12345 1000 200 18446744073709551615";
        assert_eq!(
            stat_fields(stat),
            Some(StatFields {
                utime: 250,
                stime: 50,
                start_ticks: 12345
            })
        );
        assert_eq!(stat_fields("garbage"), None);
        let status = "Name:\thangar\nVmSize:\t  20480 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(1024.0));
        assert_eq!(status_kib(status, "VmSize:"), Some(20480.0));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024.0));
    }

    #[test]
    fn this_process_is_measured() {
        let sample = ProcessSample::read();
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        assert!(sample.resident_bytes.unwrap() > 0.0);
        assert!(sample.open_fds.unwrap() >= 1.0);
        assert!(sample.max_fds.unwrap() >= sample.open_fds.unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = sample.start_time_seconds.unwrap();
        // Started before now, and not before 2020 (the clock-tick conversion is right).
        assert!(start <= now + 1.0 && start > 1_577_836_800.0, "{start}");
        assert!(sample.cpu_seconds.unwrap() >= 0.0);
    }

    #[test]
    fn series_are_named_as_prometheus_does() {
        let mut text = String::new();
        encode(&mut text).unwrap();
        let build = format!(
            "hangar_build_info{{version=\"{VERSION}\",git_hash=\"{}\"}} 1\n",
            git_hash()
        );
        assert!(text.contains(&build), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        if std::path::Path::new("/proc/self/stat").exists() {
            for name in [
                "process_cpu_seconds_total ",
                "process_resident_memory_bytes ",
                "process_virtual_memory_bytes ",
                "process_open_fds ",
                "process_max_fds ",
                "process_start_time_seconds ",
            ] {
                assert!(
                    text.contains(&format!("\n{name}")),
                    "{name} missing: {text}"
                );
            }
            assert!(
                text.contains("# TYPE process_cpu_seconds_total counter\n"),
                "{text}"
            );
        }
    }
}
