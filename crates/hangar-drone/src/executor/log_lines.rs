//! The last lines a backend wrote, as every executor keeps them for `RunningBackend::recent_logs`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// How many output lines are kept per backend.
pub const LOG_LINES: usize = 200;
/// Longer output lines are cut to this many bytes.
pub const MAX_LINE_BYTES: usize = 4096;

/// The last [`LOG_LINES`] lines of one backend, shared by its readers and its handle. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RecentLines {
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl RecentLines {
    pub fn push(&self, line: String) {
        let mut lines = self.lock();
        if lines.len() == LOG_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// Replaces everything kept with `lines` (their last [`LOG_LINES`]).
    pub fn replace(&self, lines: Vec<String>) {
        let skip = lines.len().saturating_sub(LOG_LINES);
        let mut kept = self.lock();
        kept.clear();
        kept.extend(lines.into_iter().skip(skip));
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<String>> {
        match self.lines.lock() {
            Ok(lines) => lines,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Cuts a byte stream into lines (lossy UTF-8, at most [`MAX_LINE_BYTES`] each).
#[derive(Debug, Default)]
pub struct LineSplitter {
    current: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; `line` is called for every line they complete.
    pub fn feed(&mut self, bytes: &[u8], mut line: impl FnMut(String)) {
        for &byte in bytes {
            if byte == b'\n' {
                line(self.take());
            } else if self.current.len() < MAX_LINE_BYTES {
                self.current.push(byte);
            }
        }
    }

    /// The unfinished last line, if any.
    pub fn finish(&mut self) -> Option<String> {
        (!self.current.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.current).into_owned();
        self.current.clear();
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_cut_and_bounded() {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        splitter.feed(b"one\ntw", |l| lines.push(l));
        splitter.feed(b"o\n", |l| lines.push(l));
        splitter.feed(&[b'x'; MAX_LINE_BYTES + 10], |l| lines.push(l));
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(splitter.finish().map(|l| l.len()), Some(MAX_LINE_BYTES));
        assert_eq!(splitter.finish(), None);

        let recent = RecentLines::default();
        for i in 0..LOG_LINES + 5 {
            recent.push(i.to_string());
        }
        let kept = recent.snapshot();
        assert_eq!(kept.len(), LOG_LINES);
        assert_eq!(kept[0], "5");
        recent.replace((0..LOG_LINES + 1).map(|i| i.to_string()).collect());
        assert_eq!(recent.snapshot()[0], "1");
    }
}
