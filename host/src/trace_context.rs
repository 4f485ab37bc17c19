//! W3C Trace Context: the ids of the spans stepscope emits and an incoming `traceparent`.
//!
//! [`TraceId`] and [`SpanId`] are the 16- and 8-byte ids of OpenTelemetry, written as lowercase
//! hex in the JSON-lines files as OTLP's JSON encoding writes them. [`TraceParent::parse`] reads
//! the `traceparent` and `tracestate` headers of a request (W3C Trace Context level 1): a header
//! that does not parse is ignored, as the specification asks, and the request starts a trace of
//! its own. [`SpanIdSource`] makes fresh ids; they are random per process (seeded from the clock,
//! the process id and a counter) so two runs never reuse a trace id, and nothing here is
//! cryptographic.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::splitmix::{SplitMix64, finalize};

/// The longest `tracestate` kept (the specification's 512 characters); a longer one is dropped.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// A 16-byte trace id (never all zero when valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id (never all zero when valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn is_valid(self) -> bool {
        self.0 != [0; 16]
    }
}

impl SpanId {
    pub fn is_valid(self) -> bool {
        self.0 != [0; 8]
    }

    /// The span id as a number (big-endian), for hashing.
    pub fn as_u64(self) -> u64 {
        u64::from_be_bytes(self.0)
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for byte in bytes {
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// The caller's span, from a valid `traceparent` (and its `tracestate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    /// The caller's span: the parent of `llm_request`.
    pub parent_span_id: SpanId,
    /// The `sampled` flag: the caller records this trace.
    pub sampled: bool,
    /// `tracestate`, passed on as it came (absent, empty or over [`MAX_TRACESTATE_LEN`]: `None`).
    pub tracestate: Option<Arc<str>>,
}

impl TraceParent {
    /// Parses `traceparent` (`version-traceid-parentid-flags`, lowercase hex). `None` for a
    /// header that is not valid: version `ff`, wrong lengths, upper-case or non-hex digits, an
    /// all-zero id, or a version-00 header with anything after the flags.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let value = traceparent.trim_matches([' ', '\t']);
        let bytes = value.as_bytes();
        // Future versions may append fields after a dash; version 00 may not.
        if bytes.len() < 55 || (bytes.len() > 55 && bytes[55] != b'-') {
            return None;
        }
        let field = |range: std::ops::Range<usize>| -> Option<&str> {
            let text = value.get(range)?;
            text.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                .then_some(text)
        };
        let version = field(0..2)?;
        if version == "ff" || (version == "00" && bytes.len() != 55) {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = TraceId(hex_array(field(3..35)?)?);
        let parent_span_id = SpanId(hex_array(field(36..52)?)?);
        let flags = u8::from_str_radix(field(53..55)?, 16).ok()?;
        if !trace_id.is_valid() || !parent_span_id.is_valid() {
            return None;
        }
        let tracestate = tracestate
            .map(|s| s.trim_matches([' ', '\t']))
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_LEN)
            .map(Arc::from);
        Some(Self {
            trace_id,
            parent_span_id,
            sampled: flags & 1 == 1,
            tracestate,
        })
    }
}

fn hex_array<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for (slot, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *slot = u8::from_str_radix(text, 16).ok()?;
    }
    (hex.len() == 2 * N).then_some(out)
}

/// Makes fresh span and trace ids (random per process, never zero).
#[derive(Debug, Clone)]
pub struct SpanIdSource(SplitMix64);

static SOURCES: AtomicU64 = AtomicU64::new(0);

impl Default for SpanIdSource {
    fn default() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let salt = finalize(now ^ u64::from(std::process::id()).rotate_left(32))
            ^ finalize(SOURCES.fetch_add(1, Ordering::Relaxed));
        Self(SplitMix64::new(salt))
    }
}

impl SpanIdSource {
    fn nonzero(&mut self) -> u64 {
        loop {
            let value = self.0.next_u64();
            if value != 0 {
                return value;
            }
        }
    }

    pub fn span_id(&mut self) -> SpanId {
        SpanId(self.nonzero().to_be_bytes())
    }

    pub fn trace_id(&mut self) -> TraceId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.nonzero().to_be_bytes());
        id[8..].copy_from_slice(&self.0.next_u64().to_be_bytes());
        TraceId(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specification_example() {
        let parent = TraceParent::parse(VALID, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(
            parent.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parent.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(parent.sampled);
        assert_eq!(parent.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let unsampled = VALID.replace("-01", "-00");
        assert!(!TraceParent::parse(&unsampled, None).unwrap().sampled);
        // A future version may carry more fields after a dash.
        let future = format!("cc{}-what-the-future-holds", &VALID[2..]);
        assert!(TraceParent::parse(&future, None).is_some());
    }

    #[test]
    fn ignores_invalid_headers() {
        for bad in [
            "",
            "garbage",
            &VALID.to_uppercase(),
            &VALID.replace("00-4bf9", "ff-4bf9"),
            &format!("{VALID}-extra"),
            &VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &VALID.replace("-01", "-0x"),
            &VALID.replace('-', "_"),
        ] {
            assert_eq!(TraceParent::parse(bad, None), None, "{bad:?}");
        }
        let long_state = "a=".to_string() + &"b".repeat(MAX_TRACESTATE_LEN);
        let parent = TraceParent::parse(VALID, Some(&long_state)).unwrap();
        assert_eq!(parent.tracestate, None);
    }

    #[test]
    fn fresh_ids_are_valid_and_distinct() {
        let mut a = SpanIdSource::default();
        let mut b = SpanIdSource::default();
        let ids: Vec<SpanId> = (0..100).map(|_| a.span_id()).collect();
        assert!(ids.iter().all(|id| id.is_valid()));
        assert_ne!(a.trace_id(), b.trace_id());
        let mut unique = ids.clone();
        unique.sort_by_key(|id| id.0);
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
    }
}
