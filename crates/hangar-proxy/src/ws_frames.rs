//! Just enough of the WebSocket framing (RFC 6455 §5.2) for a byte-copying proxy to know where
//! frames start, so that on shutdown it can put a close frame between two frames instead of into
//! the middle of one.
//!
//! Owns: [`FrameTracker`], which follows frame headers and skips payloads by length (it never
//! buffers or inspects payloads, so compressed and fragmented messages pass untouched), and the
//! close frames the proxy sends when it goes away.
//!
//! Must not: alter or validate the stream. On framing it cannot follow (an impossible length), the
//! tracker only gives up knowing where frames start.

/// Largest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of masking key.
const MAX_HEADER_LEN: usize = 14;

/// WebSocket close status 1001: the endpoint is going away (server shutdown).
const GOING_AWAY: [u8; 2] = 1001u16.to_be_bytes();

/// A server → client close frame with status 1001 (FIN + opcode 8, unmasked, 2-byte payload).
pub(crate) const CLOSE_GOING_AWAY: [u8; 4] = [0x88, 0x02, GOING_AWAY[0], GOING_AWAY[1]];

/// A client → server close frame with status 1001, masked with `mask` as clients must.
pub(crate) fn masked_close_going_away(mask: [u8; 4]) -> [u8; 8] {
    [
        0x88,
        0x82,
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        GOING_AWAY[0] ^ mask[0],
        GOING_AWAY[1] ^ mask[1],
    ]
}

/// Follows frame boundaries in one direction of a WebSocket connection. Feed it the bytes in the
/// order they are forwarded; it then says how far the next frame boundary is.
#[derive(Debug, Clone)]
pub(crate) struct FrameTracker {
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// Inside a frame header, of which `have` bytes are in `header`; `have == 0` is a boundary.
    Header {
        header: [u8; MAX_HEADER_LEN],
        have: usize,
    },
    /// Inside a payload with `remaining` (> 0) bytes to go.
    Payload { remaining: u64 },
    /// The stream is not framing this tracker can follow; boundaries are unknown from here on.
    Lost,
}

impl State {
    fn boundary() -> State {
        State::Header {
            header: [0; MAX_HEADER_LEN],
            have: 0,
        }
    }
}

impl FrameTracker {
    /// A tracker at the start of a stream, which is a frame boundary.
    pub(crate) fn new() -> Self {
        FrameTracker {
            state: State::boundary(),
        }
    }

    /// How many of the next bytes still belong to the current frame: `Some(0)` at a boundary, `None`
    /// when the boundaries are lost. Inside a header it is the rest of the header only (the payload
    /// length is not known yet), so callers ask again after forwarding that many bytes.
    pub(crate) fn until_boundary(&self) -> Option<u64> {
        match &self.state {
            State::Header { have: 0, .. } => Some(0),
            State::Header { header, have } => {
                let need = if *have < 2 { 2 } else { header_len(header[1]) };
                Some(need.saturating_sub(*have) as u64)
            }
            State::Payload { remaining } => Some(*remaining),
            State::Lost => None,
        }
    }

    /// Accounts for `bytes`, which were just forwarded.
    pub(crate) fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Lost => return,
                State::Payload { remaining } => {
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *remaining -= take as u64;
                    bytes = bytes.get(take..).unwrap_or_default();
                    if *remaining == 0 {
                        self.state = State::boundary();
                    }
                }
                State::Header { header, have } => {
                    let need = if *have < 2 { 2 } else { header_len(header[1]) };
                    let take = need.saturating_sub(*have).min(bytes.len());
                    let (Some(dst), Some(src)) =
                        (header.get_mut(*have..*have + take), bytes.get(..take))
                    else {
                        self.state = State::Lost;
                        return;
                    };
                    dst.copy_from_slice(src);
                    *have += take;
                    bytes = bytes.get(take..).unwrap_or_default();
                    if *have >= 2 && *have == header_len(header[1]) {
                        self.state = match payload_len(header) {
                            Some(0) => State::boundary(),
                            Some(remaining) => State::Payload { remaining },
                            None => State::Lost,
                        };
                    }
                }
            }
        }
    }
}

/// Header length given its second byte (mask bit and 7-bit length).
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// Payload length of a complete header; `None` for a 64-bit length with the top bit set, which
/// RFC 6455 forbids.
fn payload_len(header: &[u8; MAX_HEADER_LEN]) -> Option<u64> {
    match header[1] & 0x7F {
        126 => Some(u64::from(u16::from_be_bytes([header[2], header[3]]))),
        127 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(header.get(2..10)?);
            let len = u64::from_be_bytes(len);
            (len >> 63 == 0).then_some(len)
        }
        short => Some(u64::from(short)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary frame of `len` bytes, masked or not.
    fn frame(len: usize, masked: bool) -> Vec<u8> {
        hangar_test_support::ws_frame(0x82, &vec![0xAB; len], masked.then_some([1, 2, 3, 4]))
    }

    /// Feeds `stream` in chunks of `chunk` bytes and records the positions that are boundaries.
    fn boundaries(stream: &[u8], chunk: usize) -> Vec<usize> {
        let mut t = FrameTracker::new();
        let mut at = vec![];
        let mut pos = 0;
        while pos < stream.len() {
            // Never cross a boundary in one feed, so every boundary is observed.
            let step = (t.until_boundary().unwrap() as usize).clamp(1, chunk);
            let end = (pos + step).min(stream.len());
            t.advance(&stream[pos..end]);
            pos = end;
            if t.until_boundary() == Some(0) {
                at.push(pos);
            }
        }
        at
    }

    #[test]
    fn finds_boundaries_for_every_length_encoding() {
        let mut stream = vec![];
        let mut expected = vec![];
        for (len, masked) in [
            (0, false),
            (5, true),
            (125, false),
            (126, true),
            (65535, false),
            (65536, true),
            (200_000, false),
        ] {
            stream.extend(frame(len, masked));
            expected.push(stream.len());
        }
        for chunk in [1, 3, 7, 1000, usize::MAX] {
            assert_eq!(boundaries(&stream, chunk), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn whole_buffers_with_several_frames() {
        let mut t = FrameTracker::new();
        let mut stream = frame(10, false);
        stream.extend(frame(3, true));
        stream.extend(frame(300, false));
        t.advance(&stream);
        assert_eq!(t.until_boundary(), Some(0));
        // Half a header, then half a payload.
        let next = frame(60_000, true);
        t.advance(&next[..3]);
        assert_eq!(
            t.until_boundary(),
            Some(5),
            "the rest of the 16-bit length and the mask"
        );
        t.advance(&next[3..100]);
        assert_eq!(t.until_boundary(), Some(60_000 + 8 - 100));
        t.advance(&next[100..]);
        assert_eq!(t.until_boundary(), Some(0));
    }

    #[test]
    fn impossible_length_loses_track() {
        let mut t = FrameTracker::new();
        let mut h = vec![0x82, 127];
        h.extend_from_slice(&u64::MAX.to_be_bytes());
        t.advance(&h);
        assert_eq!(t.until_boundary(), None);
        t.advance(&[0x88, 0x00]);
        assert_eq!(t.until_boundary(), None);
    }

    #[test]
    fn close_frames_are_well_formed() {
        assert_eq!(CLOSE_GOING_AWAY, [0x88, 0x02, 0x03, 0xE9]);
        let masked = masked_close_going_away([0x10, 0x20, 0x30, 0x40]);
        assert_eq!(masked[..6], [0x88, 0x82, 0x10, 0x20, 0x30, 0x40]);
        assert_eq!([masked[6] ^ 0x10, masked[7] ^ 0x20], [0x03, 0xE9]);
        for f in [&CLOSE_GOING_AWAY[..], &masked[..]] {
            let mut t = FrameTracker::new();
            t.advance(f);
            assert_eq!(t.until_boundary(), Some(0));
        }
    }
}
