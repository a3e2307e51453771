//! Reading a Prometheus text exposition, for the tests that scrape a `/metrics` endpoint.

use std::collections::HashMap;

/// The samples of a text exposition: `name{labels}` (as written by the server) → value. Fails the
/// test on a line without a numeric value or on a series written twice.
pub fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
        let value: f64 = value.parse().expect("a sample value is a number");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    samples
}
