//! A backend printing 100 MB (issue 15): the drone keeps at most its per-backend cap on disk, counts
//! every dropped line, and its memory stays flat. A test binary of its own, so that no other test
//! shares the process whose memory is measured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use hangar_tests::{shell_executable, TestEnv, WAIT};

/// This process's resident memory (Linux), in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_printing_100_mb_keeps_at_most_the_cap() {
    tokio::time::timeout(WAIT * 3, async {
        let mut env = TestEnv::controller_only(false).await;
        let cap = 1024 * 1024;
        env.add_drone(|c| {
            c.log_backend_bytes = cap;
            c.log_total_bytes = 4 * cap;
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
        let before = resident_bytes();
        // 1,000,000 lines of 99 bytes and a newline: 100 MB, then one last line.
        let mut req = env.connect_request("flood", &[]);
        req.spawn_config.as_mut().unwrap().executable = shell_executable(
            "head -c 99000000 /dev/zero | tr '\\0' x | fold -w 99; echo; echo 'flood done'",
        );
        let resp = env.connect(&req).await;
        env.terminated(&resp.backend_id).await;
        let growth = resident_bytes().saturating_sub(before);
        // Streamed to disk: memory does not grow with the output.
        assert!(
            growth < 32 * 1024 * 1024,
            "resident memory grew by {growth} bytes"
        );

        let store = env.drones[0].log_store().clone();
        assert!(
            store.total_bytes() <= cap,
            "{} bytes kept",
            store.total_bytes()
        );
        let dropped = store.dropped(&resp.backend_id).unwrap();
        let (_, mut cursor) = store
            .start_read(&resp.backend_id, None, None)
            .unwrap()
            .unwrap();
        let mut kept = Vec::new();
        loop {
            let batch = store.read_batch(&mut cursor).unwrap();
            if batch.is_empty() {
                break;
            }
            kept.extend(batch);
        }
        assert_eq!(
            dropped + kept.len() as u64,
            1_000_001,
            "every line kept or counted"
        );
        assert_eq!(
            kept.last().unwrap().line,
            "flood done",
            "the newest lines stay"
        );
        assert_eq!(kept[0].line.len(), 99);

        let metrics_addr = env.drones[0].metrics_addr().unwrap();
        let url = format!("http://{metrics_addr}/metrics");
        let text = env
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
        };
        assert_eq!(value("hangar_drone_log_lines_total"), 1_000_001);
        assert_eq!(value("hangar_drone_log_lines_dropped_total"), dropped);
        env.shutdown().await;
    })
    .await
    .expect("test timed out");
}
