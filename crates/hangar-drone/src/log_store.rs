//! The drone's bounded on-disk store of backend output (issue 15): every line a backend writes to
//! stdout or stderr, with its time and stream, kept after the backend ended for `log_retention`.
//!
//! Layout: `<log_dir>/<backend id>/<segment>.jsonl`, one [`LogLine`] as JSON per line, plus
//! `meta.json` (`{"dropped": lines, "ended": ms}`). Segment numbers come from one counter for the whole
//! drone, so the lowest number is the oldest segment anywhere. A backend's current segment is closed
//! once it reaches a quarter of `log_backend_bytes`; then the oldest segments are deleted while the
//! backend is over `log_backend_bytes`, and anyone's oldest while the drone is over `log_total_bytes`
//! (oldest dropped first). Dropped lines are counted per backend (`meta.json`) and per drone (metrics).
//!
//! Memory: lines are appended through a small buffer, flushed after each batch the executor read, and
//! readers stream from the files in bounded batches; nothing holds a backend's whole output.
//! Executors write through a [`LogWriter`] (`writer.rs`): one thread does the appends, off the runtime.
//! Invariant: lines never leave the drone except as answers to a log request on the controller
//! session (never through the controller's database).

use hangar_types::logs::{LogLine, LogSince, LogStream};
use hangar_types::{BackendId, Millis};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

mod writer;
pub use writer::LogWriter;

/// Most lines a read returns per batch (and per `LogLines` frame).
pub const BATCH_LINES: usize = 256;
/// Most bytes of lines per batch, so a frame stays well under the WebSocket message limit.
const BATCH_BYTES: usize = 256 * 1024;
/// Largest `tail` served; a larger one is cut to this (it bounds the memory of one read).
pub const MAX_TAIL: usize = 10_000;
/// A backend's segments are this fraction of its cap (so at most 1/4 of the cap is dropped at once).
const SEGMENTS_PER_BACKEND: u64 = 4;
const META_FILE: &str = "meta.json";

/// The store's limits (from `DroneConfig`).
#[derive(Debug, Clone)]
pub struct LogLimits {
    /// Most bytes kept per backend (oldest segments dropped first).
    pub backend_bytes: u64,
    /// Most bytes kept for all backends together.
    pub total_bytes: u64,
    /// How long lines are kept after their backend ended.
    pub retention: Duration,
}

/// Lines captured and dropped by this drone (the `hangar_drone_log_lines*` series).
#[derive(Debug, Clone, Default)]
pub struct LogCounters {
    pub captured: Counter,
    pub dropped: Counter,
}

/// Cheap to clone; every clone is the same store.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    limits: LogLimits,
    counters: LogCounters,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    backends: HashMap<BackendId, BackendLog>,
    total_bytes: u64,
    next_segment: u64,
}

struct BackendLog {
    /// Oldest first; the last one is written to.
    segments: VecDeque<Segment>,
    writer: Option<BufWriter<File>>,
    meta: Meta,
    /// Bumped after every flushed batch; followers wait on it.
    changed: watch::Sender<Version>,
    /// For a backend found on disk at start that had not ended: when it was found. Cleared by the
    /// next write (a re-adopted container); otherwise its retention counts from here.
    found_unended: Option<Millis>,
    /// When a line was last appended (for one found on disk: its newest segment's modification).
    last_write: Option<Millis>,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    number: u64,
    bytes: u64,
    /// `None` for a segment found on disk at start (counted when it is dropped).
    lines: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Meta {
    dropped: u64,
    ended: Option<Millis>,
}

/// What followers watch: lines written so far (a counter) and whether the backend ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Version {
    pub written: u64,
    pub ended: bool,
}

/// Where a reader is: a segment and a byte offset in it.
#[derive(Debug, Clone)]
pub struct LogCursor {
    backend: BackendId,
    segment: u64,
    offset: u64,
    since: Millis,
}

impl LogStore {
    /// Opens (creating) the store in `dir` and indexes what a previous run left there.
    pub fn open(dir: &Path, limits: LogLimits, counters: LogCounters) -> io::Result<LogStore> {
        fs::create_dir_all(dir)?;
        let mut state = State::default();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let Some(id) = crate::parsed_file_name::<BackendId>(&entry) else {
                continue;
            };
            let log = load_backend(&entry.path())?;
            if let Some(last) = log.segments.back() {
                state.next_segment = state.next_segment.max(last.number + 1);
            }
            state.total_bytes += log.segments.iter().map(|s| s.bytes).sum::<u64>();
            state.backends.insert(id, log);
        }
        let store = LogStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                limits,
                counters,
                state: Mutex::new(state),
            }),
        };
        store.prune(Millis::now());
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends one batch of lines of `backend` and makes it visible to readers. Lines past the caps
    /// push the oldest out. IO errors are logged and the batch dropped (a full disk must not stop a
    /// backend).
    /// Blocking file IO: the drone calls it from its [`LogWriter`] thread.
    pub fn append(&self, backend: &BackendId, lines: &[(LogStream, String)]) {
        self.append_at(backend, Millis::now(), lines);
    }

    /// [`LogStore::append`] of lines read at `time`.
    pub fn append_at(&self, backend: &BackendId, time: Millis, lines: &[(LogStream, String)]) {
        if lines.is_empty() {
            return;
        }
        let mut state = self.lock();
        if let Err(e) = self.append_locked(&mut state, backend, time, lines) {
            tracing::warn!(%backend, error = %e, "Failed to keep backend output lines");
            self.inner.counters.dropped.inc_by(lines.len() as u64);
        }
    }

    fn append_locked(
        &self,
        state: &mut State,
        backend: &BackendId,
        time: Millis,
        lines: &[(LogStream, String)],
    ) -> io::Result<()> {
        let segment_cap = (self.inner.limits.backend_bytes / SEGMENTS_PER_BACKEND).max(1);
        let dir = self.backend_dir(backend);
        let next_segment = &mut state.next_segment;
        let log = state
            .backends
            .entry(backend.clone())
            .or_insert_with(BackendLog::new);
        log.found_unended = None;
        log.last_write = Some(time);
        if log.writer.is_none() {
            fs::create_dir_all(&dir)?;
            let reuse = log.segments.back().is_some_and(|s| s.bytes < segment_cap);
            if !reuse {
                log.segments.push_back(Segment {
                    number: *next_segment,
                    bytes: 0,
                    lines: Some(0),
                });
                *next_segment += 1;
            }
            let number = log.segments.back().map(|s| s.number).unwrap_or_default();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(segment_path(&dir, number))?;
            log.writer = Some(BufWriter::new(file));
        }
        let mut added = 0u64;
        for (stream, line) in lines {
            let record = LogLine {
                time,
                stream: *stream,
                line: line.clone(),
            };
            let mut json = serde_json::to_vec(&record).map_err(io::Error::other)?;
            json.push(b'\n');
            let (Some(writer), Some(current)) = (log.writer.as_mut(), log.segments.back_mut())
            else {
                break;
            };
            writer.write_all(&json)?;
            current.bytes += json.len() as u64;
            current.lines = current.lines.map(|n| n + 1);
            added += json.len() as u64;
            if current.bytes >= segment_cap {
                writer.flush()?;
                log.segments.push_back(Segment {
                    number: *next_segment,
                    bytes: 0,
                    lines: Some(0),
                });
                let file = File::create(segment_path(&dir, *next_segment))?;
                *next_segment += 1;
                log.writer = Some(BufWriter::new(file));
            }
        }
        if let Some(writer) = log.writer.as_mut() {
            writer.flush()?;
        }
        state.total_bytes += added;
        self.inner.counters.captured.inc_by(lines.len() as u64);
        self.enforce_caps(state, backend);
        if let Some(log) = state.backends.get(backend) {
            log.changed.send_modify(|v| v.written += lines.len() as u64);
        }
        Ok(())
    }

    /// Drops the oldest segments of `backend` while it is over its cap, then anyone's oldest while the
    /// drone is over its total (never a live backend's current segment).
    fn enforce_caps(&self, state: &mut State, backend: &BackendId) {
        let limits = &self.inner.limits;
        while let Some(log) = state.backends.get(backend) {
            let bytes: u64 = log.segments.iter().map(|s| s.bytes).sum();
            if bytes <= limits.backend_bytes || log.segments.len() <= 1 {
                break;
            }
            self.drop_oldest(state, backend);
        }
        while state.total_bytes > limits.total_bytes {
            let oldest = state
                .backends
                .iter()
                .filter(|(_, log)| log.segments.len() > 1 || log.writer.is_none())
                .filter_map(|(id, log)| log.segments.front().map(|s| (s.number, id.clone())))
                .min();
            let Some((_, id)) = oldest else { break };
            self.drop_oldest(state, &id);
        }
    }

    fn drop_oldest(&self, state: &mut State, backend: &BackendId) {
        let dir = self.backend_dir(backend);
        let Some(log) = state.backends.get_mut(backend) else {
            return;
        };
        let Some(segment) = log.segments.pop_front() else {
            return;
        };
        if log.segments.is_empty() {
            log.writer = None;
        }
        let path = segment_path(&dir, segment.number);
        let lines = segment.lines.unwrap_or_else(|| count_lines(&path));
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(%backend, error = %e, "Failed to delete a log segment");
        }
        state.total_bytes = state.total_bytes.saturating_sub(segment.bytes);
        log.meta.dropped += lines;
        self.inner.counters.dropped.inc_by(lines);
        write_meta(&dir, &log.meta);
        tracing::debug!(%backend, lines, "Dropped the oldest log segment");
    }

    /// The backend ended: nothing more will be written; followers finish; retention starts.
    pub fn end(&self, backend: &BackendId) {
        let dir = self.backend_dir(backend);
        let mut state = self.lock();
        let Some(log) = state.backends.get_mut(backend) else {
            return;
        };
        log.writer = None;
        if log.meta.ended.is_none() {
            log.meta.ended = Some(Millis::now());
            write_meta(&dir, &log.meta);
        }
        log.changed.send_modify(|v| v.ended = true);
    }

    /// Deletes the lines of backends that ended more than the retention before `now` (and of those
    /// a previous run left unfinished and nobody wrote to since), returning how many were removed.
    pub fn prune(&self, now: Millis) -> usize {
        let retention = self.inner.limits.retention;
        let expired = |log: &BackendLog| {
            let since = log.meta.ended.or(log.found_unended);
            since.is_some_and(|t| now.0.saturating_sub(t.0) > retention.as_millis() as i64)
        };
        let mut state = self.lock();
        let gone: Vec<BackendId> = state
            .backends
            .iter()
            .filter(|(_, log)| expired(log))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            if let Some(log) = state.backends.remove(id) {
                let bytes: u64 = log.segments.iter().map(|s| s.bytes).sum();
                state.total_bytes = state.total_bytes.saturating_sub(bytes);
                log.changed.send_modify(|v| v.ended = true);
            }
            if let Err(e) = fs::remove_dir_all(self.backend_dir(id)) {
                tracing::warn!(backend = %id, error = %e, "Failed to delete expired logs");
            }
        }
        gone.len()
    }

    /// Lines dropped so far for `backend` (caps), `None` when nothing is kept of it.
    pub fn dropped(&self, backend: &BackendId) -> Option<u64> {
        self.lock()
            .backends
            .get(backend)
            .map(|log| log.meta.dropped)
    }

    /// When a line of `backend` was last kept, if any.
    pub fn last_write(&self, backend: &BackendId) -> Option<Millis> {
        self.lock()
            .backends
            .get(backend)
            .and_then(|log| log.last_write)
    }

    /// Bytes kept for all backends.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    /// Watches `backend`'s writes, `None` when nothing is kept of it.
    pub fn watch(&self, backend: &BackendId) -> Option<watch::Receiver<Version>> {
        self.lock()
            .backends
            .get(backend)
            .map(|log| log.changed.subscribe())
    }

    /// Starts a read: the last `tail` lines (all when `None`, at most [`MAX_TAIL`]) written since
    /// `since`, and a cursor after the last line kept now. `None` when nothing is kept of `backend`.
    /// Blocking file IO: call it from a blocking thread.
    pub fn start_read(
        &self,
        backend: &BackendId,
        since: Option<LogSince>,
        tail: Option<usize>,
    ) -> io::Result<Option<(Vec<LogLine>, LogCursor)>> {
        let since = since
            .map(|s| s.resolve(Millis::now()))
            .unwrap_or(Millis(i64::MIN));
        let Some(first) = self.segment_after(backend, None) else {
            return Ok(None);
        };
        let mut cursor = LogCursor {
            backend: backend.clone(),
            segment: first,
            offset: 0,
            since,
        };
        let Some(tail) = tail else {
            return Ok(Some((Vec::new(), cursor)));
        };
        let tail = tail.min(MAX_TAIL);
        let mut kept = VecDeque::with_capacity(tail.min(BATCH_LINES));
        loop {
            let batch = self.read_batch(&mut cursor)?;
            if batch.is_empty() {
                break;
            }
            for line in batch {
                if kept.len() == tail {
                    kept.pop_front();
                }
                if tail > 0 {
                    kept.push_back(line);
                }
            }
        }
        Ok(Some((kept.into(), cursor)))
    }

    /// The next lines after `cursor` (at most [`BATCH_LINES`] / [`BATCH_BYTES`]); empty when the
    /// reader is at the end. Blocking file IO.
    pub fn read_batch(&self, cursor: &mut LogCursor) -> io::Result<Vec<LogLine>> {
        self.read(cursor, BATCH_LINES, BATCH_BYTES)
    }

    fn read(
        &self,
        cursor: &mut LogCursor,
        max_lines: usize,
        max_bytes: usize,
    ) -> io::Result<Vec<LogLine>> {
        let mut lines = Vec::new();
        let mut bytes = 0;
        loop {
            // Taken before reading: when a later segment exists, this one is complete (a segment is
            // flushed before the next one is listed, under the same lock).
            let next = self.segment_after(&cursor.backend, Some(cursor.segment));
            let path = segment_path(&self.backend_dir(&cursor.backend), cursor.segment);
            match File::open(&path) {
                Ok(file) => {
                    let mut reader = BufReader::new(file);
                    reader.seek(SeekFrom::Start(cursor.offset))?;
                    let mut buf = Vec::new();
                    while lines.len() < max_lines && bytes < max_bytes {
                        buf.clear();
                        let n = reader.read_until(b'\n', &mut buf)?;
                        // A line being written is taken once it is complete.
                        if n == 0 || buf.last() != Some(&b'\n') {
                            break;
                        }
                        cursor.offset += n as u64;
                        bytes += n;
                        match serde_json::from_slice::<LogLine>(&buf) {
                            Ok(line) if line.time >= cursor.since => lines.push(line),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(backend = %cursor.backend, error = %e, "Skipping a damaged log line")
                            }
                        }
                    }
                }
                // Dropped under the reader (caps): continue with the next segment.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if lines.len() >= max_lines || bytes >= max_bytes {
                return Ok(lines);
            }
            match next {
                Some(next) => {
                    cursor.segment = next;
                    cursor.offset = 0;
                }
                None => return Ok(lines),
            }
        }
    }

    /// The first segment of `backend` after `after` (the oldest with `None`).
    fn segment_after(&self, backend: &BackendId, after: Option<u64>) -> Option<u64> {
        let state = self.lock();
        let log = state.backends.get(backend)?;
        log.segments
            .iter()
            .map(|s| s.number)
            .find(|n| after.is_none_or(|a| *n > a))
    }

    fn backend_dir(&self, backend: &BackendId) -> PathBuf {
        self.inner.dir.join(backend.as_str())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.inner.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl BackendLog {
    fn new() -> Self {
        BackendLog {
            segments: VecDeque::new(),
            writer: None,
            meta: Meta::default(),
            changed: watch::channel(Version::default()).0,
            found_unended: None,
            last_write: None,
        }
    }
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.jsonl"))
}

fn load_backend(dir: &Path) -> io::Result<BackendLog> {
    let mut log = BackendLog::new();
    if let Ok(text) = fs::read(dir.join(META_FILE)) {
        log.meta = serde_json::from_slice(&text).unwrap_or_default();
    }
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        segments.push(Segment {
            number,
            bytes: entry.metadata()?.len(),
            lines: None,
        });
    }
    segments.sort_by_key(|s| s.number);
    if let Some(last) = segments.last() {
        let modified = fs::metadata(segment_path(dir, last.number)).and_then(|m| m.modified());
        log.last_write = modified.ok().and_then(|t| {
            let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
            Some(Millis(i64::try_from(ms).ok()?))
        });
    }
    log.segments = segments.into();
    log.changed
        .send_modify(|v| v.ended = log.meta.ended.is_some());
    if log.meta.ended.is_none() {
        log.found_unended = Some(Millis::now());
    }
    Ok(log)
}

fn write_meta(dir: &Path, meta: &Meta) {
    let written = serde_json::to_vec(meta)
        .map_err(io::Error::other)
        .and_then(|json| fs::write(dir.join(META_FILE), json));
    if let Err(e) = written {
        tracing::warn!(dir = %dir.display(), error = %e, "Failed to write log metadata");
    }
}

/// Lines in a segment file (0 when unreadable).
fn count_lines(path: &Path) -> u64 {
    let Ok(file) = File::open(path) else { return 0 };
    let mut reader = BufReader::new(file);
    let mut count = 0;
    while let Ok(buf) = reader.fill_buf() {
        if buf.is_empty() {
            break;
        }
        count += buf.iter().filter(|b| **b == b'\n').count() as u64;
        let n = buf.len();
        reader.consume(n);
    }
    count
}

/// A log store in `dir` for tests: fresh counters, `backend_bytes` per backend, ample room in all and
/// an hour's retention.
#[cfg(test)]
pub(crate) fn test_store(dir: &Path, backend_bytes: u64) -> LogStore {
    let limits = LogLimits {
        backend_bytes,
        total_bytes: 1 << 30,
        retention: Duration::from_secs(3600),
    };
    LogStore::open(dir, limits, LogCounters::default()).unwrap()
}

#[cfg(test)]
mod tests;
