//! What a scenario produces: a [`Report`] of named [`Metric`]s, each summarised as median, p90, p99 and
//! max, with its ratio against a baseline metric measured in the same run. Printed as a table and
//! written as JSON.
//!
//! Percentiles use the nearest-rank method on the sorted samples (exact, no histogram buckets): the
//! p-th percentile of n samples is the ⌈p·n/100⌉-th smallest.

use crate::machine::Machine;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::Duration;

/// Unit of a metric's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Milliseconds,
    Microseconds,
    PerSecond,
    Bytes,
    Kibibytes,
    Mebibytes,
    Percent,
    Count,
}

impl Unit {
    fn symbol(self) -> &'static str {
        match self {
            Unit::Milliseconds => "ms",
            Unit::Microseconds => "µs",
            Unit::PerSecond => "/s",
            Unit::Bytes => "B",
            Unit::Kibibytes => "KiB",
            Unit::Mebibytes => "MiB",
            Unit::Percent => "%",
            Unit::Count => "",
        }
    }
}

/// Median, p90, p99 and max of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub samples: usize,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Summarises `values`; `None` when there are none or any is not a number.
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            samples: sorted.len(),
            median: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
        })
    }

    /// Summarises durations in microseconds.
    pub fn of_micros(samples: &[Duration]) -> Option<Summary> {
        let us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        Summary::of(&us)
    }

    /// One measured value (a rate, a memory size): every statistic is that value.
    pub fn single(value: f64) -> Summary {
        Summary {
            samples: 1,
            median: value,
            p90: value,
            p99: value,
            max: value,
        }
    }
}

/// Nearest-rank percentile of an ascending, non-empty slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One named measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub unit: Unit,
    #[serde(flatten)]
    pub summary: Summary,
    /// Name of the metric of this report this one is compared with.
    pub baseline: Option<String>,
    /// `median / baseline median` (for rates too: below 1 means fewer per second than the baseline);
    /// absent when the baseline's median is not positive.
    pub ratio: Option<f64>,
}

/// The outcome of one scenario run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    /// The sizes and options the scenario ran with.
    pub params: serde_json::Map<String, serde_json::Value>,
    pub machine: Machine,
    pub metrics: Vec<Metric>,
    /// What was skipped and why, and how to read particular metrics.
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_string(),
            params: serde_json::Map::new(),
            machine: Machine::detect(),
            metrics: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn param(&mut self, name: &str, value: impl Into<serde_json::Value>) {
        self.params.insert(name.to_string(), value.into());
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Adds a metric from raw values; nothing is added when there are no values.
    pub fn add(&mut self, name: &str, unit: Unit, values: &[f64], baseline: Option<&str>) {
        if let Some(summary) = Summary::of(values) {
            self.push(name, unit, summary, baseline);
        }
    }

    /// Adds durations as milliseconds.
    pub fn add_millis(&mut self, name: &str, samples: &[Duration], baseline: Option<&str>) {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        self.add(name, Unit::Milliseconds, &ms, baseline);
    }

    /// Adds durations as microseconds.
    pub fn add_micros(&mut self, name: &str, samples: &[Duration], baseline: Option<&str>) {
        if let Some(summary) = Summary::of_micros(samples) {
            self.push(name, Unit::Microseconds, summary, baseline);
        }
    }

    /// Adds the latency a proxy adds, in µs: `<proxy>_added_p50` and `<proxy>_added_p99`, its
    /// percentile minus `direct`'s, with `<baseline>_added_p50` / `_p99` as baselines when given.
    pub fn add_added_latency(
        &mut self,
        proxy: &str,
        latency: &Summary,
        direct: &Summary,
        baseline: Option<&str>,
    ) {
        for (metric, added) in [
            ("added_p50", latency.median - direct.median),
            ("added_p99", latency.p99 - direct.p99),
        ] {
            let baseline = baseline.map(|b| format!("{b}_{metric}"));
            self.add_value(
                &format!("{proxy}_{metric}"),
                Unit::Microseconds,
                added,
                baseline.as_deref(),
            );
        }
    }

    /// Adds a single value.
    pub fn add_value(&mut self, name: &str, unit: Unit, value: f64, baseline: Option<&str>) {
        if value.is_finite() {
            self.push(name, unit, Summary::single(value), baseline);
        }
    }

    fn push(&mut self, name: &str, unit: Unit, summary: Summary, baseline: Option<&str>) {
        self.metrics.push(Metric {
            name: name.to_string(),
            unit,
            summary,
            baseline: baseline.map(str::to_string),
            ratio: None,
        });
    }

    /// Fills every metric's ratio from its baseline's median (left empty when the baseline is missing
    /// or not positive). Call once all metrics are in.
    pub fn compute_ratios(&mut self) {
        let medians: Vec<(String, f64)> = self
            .metrics
            .iter()
            .map(|m| (m.name.clone(), m.summary.median))
            .collect();
        for metric in &mut self.metrics {
            metric.ratio = metric.baseline.as_ref().and_then(|b| {
                medians
                    .iter()
                    .find(|(name, _)| name == b)
                    .map(|(_, median)| *median)
                    // A ratio to a zero or negative value (e.g. an added latency lost in noise)
                    // means nothing.
                    .filter(|median| *median > 0.0)
                    .map(|median| metric.summary.median / median)
            });
        }
    }

    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.name == name)
    }

    /// A fixed-width table of every metric, followed by the notes.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let params = serde_json::Value::Object(self.params.clone());
        let _ = writeln!(out, "scenario {} {}", self.scenario, params);
        let _ = writeln!(
            out,
            "machine: {} cpus ({}), {:.1} GiB, {} build",
            self.machine.nproc,
            self.machine.cpu_model,
            self.machine.mem_total_gib,
            self.machine.profile
        );
        let width = self
            .metrics
            .iter()
            .map(|m| m.name.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            out,
            "{:<width$} {:>5} {:>7} {:>11} {:>11} {:>11} {:>11}  {:>7}  baseline",
            "metric", "unit", "n", "median", "p90", "p99", "max", "ratio"
        );
        for m in &self.metrics {
            let s = &m.summary;
            let ratio = m.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<width$} {:>5} {:>7} {:>11} {:>11} {:>11} {:>11}  {:>7}  {}",
                m.name,
                m.unit.symbol(),
                s.samples,
                number(s.median),
                number(s.p90),
                number(s.p99),
                number(s.max),
                ratio,
                m.baseline.as_deref().unwrap_or("")
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}

/// Three significant decimals for small values, fewer for large ones.
fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&values).unwrap();
        assert_eq!(
            (s.samples, s.median, s.p90, s.p99, s.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.p90, s.p99, s.max), (2.0, 3.0, 3.0, 3.0));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ratios_against_the_baseline_median() {
        let mut r = Report::new("t");
        r.add("base", Unit::Milliseconds, &[2.0, 2.0, 100.0], None);
        r.add("thing", Unit::Milliseconds, &[5.0], Some("base"));
        r.add("orphan", Unit::Milliseconds, &[5.0], Some("missing"));
        r.compute_ratios();
        assert_eq!(r.metric("thing").unwrap().ratio, Some(2.5));
        assert_eq!(r.metric("orphan").unwrap().ratio, None);
        assert_eq!(r.metric("base").unwrap().ratio, None);
        let table = r.table();
        assert!(table.contains("2.50x"), "{table}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["metrics"][1]["median"], 5.0);
        assert_eq!(json["metrics"][1]["ratio"], 2.5);
    }
}
