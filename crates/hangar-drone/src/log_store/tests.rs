use super::*;

fn limits(backend_bytes: u64, total_bytes: u64) -> LogLimits {
    LogLimits {
        backend_bytes,
        total_bytes,
        retention: Duration::from_secs(3600),
    }
}

fn lines(stream: LogStream, prefix: &str, n: usize) -> Vec<(LogStream, String)> {
    (0..n).map(|i| (stream, format!("{prefix}-{i}"))).collect()
}

fn read_all(store: &LogStore, backend: &BackendId) -> Vec<LogLine> {
    let (mut all, mut cursor) = store.start_read(backend, None, None).unwrap().unwrap();
    loop {
        let batch = store.read_batch(&mut cursor).unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

#[test]
fn lines_keep_their_stream_and_order_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let backend = BackendId::random();
    let store = test_store(dir.path(), 1 << 20);
    assert!(store.start_read(&backend, None, None).unwrap().is_none());
    store.append(
        &backend,
        &[
            (LogStream::Stdout, "out".into()),
            (LogStream::Stderr, "err".into()),
        ],
    );
    store.append(&backend, &[(LogStream::Stdout, "again".into())]);
    let got: Vec<_> = read_all(&store, &backend)
        .into_iter()
        .map(|l| (l.stream, l.line))
        .collect();
    let want = vec![
        (LogStream::Stdout, "out".to_string()),
        (LogStream::Stderr, "err".to_string()),
        (LogStream::Stdout, "again".to_string()),
    ];
    assert_eq!(got, want);
    store.end(&backend);
    drop(store);

    let store = test_store(dir.path(), 1 << 20);
    let again: Vec<_> = read_all(&store, &backend)
        .into_iter()
        .map(|l| (l.stream, l.line))
        .collect();
    assert_eq!(again, want);
    assert!(store.watch(&backend).unwrap().borrow().ended);
}

#[test]
fn tail_and_since_select_lines() {
    let dir = tempfile::tempdir().unwrap();
    let backend = BackendId::random();
    let store = test_store(dir.path(), 1 << 20);
    for chunk in lines(LogStream::Stdout, "l", 1000).chunks(7) {
        store.append(&backend, chunk);
    }
    let (tail, mut cursor) = store.start_read(&backend, None, Some(3)).unwrap().unwrap();
    let tail: Vec<_> = tail.into_iter().map(|l| l.line).collect();
    assert_eq!(tail, ["l-997", "l-998", "l-999"]);
    assert!(
        store.read_batch(&mut cursor).unwrap().is_empty(),
        "the cursor is at the end"
    );
    store.append(&backend, &[(LogStream::Stderr, "new".into())]);
    assert_eq!(store.read_batch(&mut cursor).unwrap()[0].line, "new");
    let (none, _) = store.start_read(&backend, None, Some(0)).unwrap().unwrap();
    assert!(none.is_empty());
    // Everything is at most a few seconds old; nothing is from the future.
    let future = LogSince::At(Millis(Millis::now().0 + 3_600_000));
    let (later, mut cursor) = store
        .start_read(&backend, Some(future), Some(10))
        .unwrap()
        .unwrap();
    assert!(later.is_empty());
    assert!(store.read_batch(&mut cursor).unwrap().is_empty());
    let (recent, _) = store
        .start_read(&backend, Some(LogSince::Ago(3_600_000)), Some(5))
        .unwrap()
        .unwrap();
    assert_eq!(recent.len(), 5);
}

#[test]
fn caps_drop_the_oldest_lines_and_count_them() {
    let dir = tempfile::tempdir().unwrap();
    let counters = LogCounters::default();
    let (a, b) = (BackendId::random(), BackendId::random());
    // 8 KiB per backend (2 KiB segments), 12 KiB in all.
    let store = LogStore::open(dir.path(), limits(8 << 10, 12 << 10), counters.clone()).unwrap();
    for chunk in lines(LogStream::Stdout, "a", 2000).chunks(10) {
        store.append(&a, chunk);
    }
    let kept = read_all(&store, &a);
    let bytes_on_disk: u64 = fs::read_dir(dir.path().join(a.as_str()))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(bytes_on_disk <= 8 << 10, "{bytes_on_disk} bytes kept");
    let dropped = store.dropped(&a).unwrap();
    assert_eq!(dropped + kept.len() as u64, 2000);
    assert_eq!(kept.last().unwrap().line, "a-1999", "the newest lines stay");
    assert_eq!(counters.captured.get(), 2000);
    assert_eq!(counters.dropped.get(), dropped);
    // A second backend pushes the drone over its total: the oldest segments anywhere go first.
    store.end(&a);
    for chunk in lines(LogStream::Stderr, "b", 2000).chunks(10) {
        store.append(&b, chunk);
    }
    assert!(store.total_bytes() <= 12 << 10, "{}", store.total_bytes());
    assert!(
        store.dropped(&a).unwrap() > dropped,
        "a lost its oldest lines"
    );
    assert_eq!(read_all(&store, &b).last().unwrap().line, "b-1999");
}

#[test]
fn a_reader_follows_across_segments_and_drops() {
    let dir = tempfile::tempdir().unwrap();
    let backend = BackendId::random();
    let store = test_store(dir.path(), 4 << 10);
    store.append(&backend, &[(LogStream::Stdout, "first".into())]);
    let (_, mut cursor) = store.start_read(&backend, None, None).unwrap().unwrap();
    let mut seen = Vec::new();
    for chunk in lines(LogStream::Stdout, "x", 300).chunks(3) {
        store.append(&backend, chunk);
        seen.extend(
            store
                .read_batch(&mut cursor)
                .unwrap()
                .into_iter()
                .map(|l| l.line),
        );
    }
    // Read as it was written: every line once, in order, none lost to rotation.
    let mut want = vec!["first".to_string()];
    want.extend((0..300).map(|i| format!("x-{i}")));
    assert_eq!(seen, want);
}

#[test]
fn ended_backends_are_pruned_after_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (ended, live) = (BackendId::random(), BackendId::random());
    let store = test_store(dir.path(), 1 << 20);
    store.append(&ended, &[(LogStream::Stdout, "bye".into())]);
    store.append(&live, &[(LogStream::Stdout, "hi".into())]);
    store.end(&ended);
    assert_eq!(store.prune(Millis::now()), 0, "within the retention");
    let later = Millis(Millis::now().0 + 3_600_001 + 1000);
    assert_eq!(store.prune(later), 1);
    assert!(store.watch(&ended).is_none());
    assert!(!dir.path().join(ended.as_str()).exists());
    assert_eq!(read_all(&store, &live).len(), 1, "a live backend is kept");
}
