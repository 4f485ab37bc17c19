//! Text that comes from a guest, made safe to print.
//!
//! A policy chooses the text of its `configure` errors, its extra attributes, and (through its
//! function names and exit codes) part of every trap message. Before any of it reaches a log
//! line, a terminal, an HTTP body or a span, [`sanitize`] escapes every control character (so
//! no guest can end a log line and forge the next one, move the cursor or clear a screen) and
//! the Unicode format characters that reorder or hide text, then cuts the result at
//! [`MAX_GUEST_TEXT_BYTES`] with a marker saying how much was left out.

/// The longest guest text shown anywhere, in bytes (after escaping, before the marker).
pub const MAX_GUEST_TEXT_BYTES: usize = 1024;

/// `text` with control and bidirectional-format characters escaped, cut at
/// [`MAX_GUEST_TEXT_BYTES`] (see the module doc).
pub fn sanitize(text: &str) -> String {
    sanitize_to(text, MAX_GUEST_TEXT_BYTES)
}

/// [`sanitize`] with another length bound.
pub fn sanitize_to(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes) + 32);
    for (offset, c) in text.char_indices() {
        let before = out.len();
        push_escaped(&mut out, c);
        if out.len() > max_bytes {
            out.truncate(before);
            let left = text.len() - offset;
            out.push_str(&format!("…[{left} more bytes cut]"));
            return out;
        }
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if c.is_control() || is_hiding_format(c) => {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        }
        c => out.push(c),
    }
}

/// Zero-width characters, bidirectional embeddings, overrides and isolates, and the BOM.
fn is_hiding_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2069 | 0xFEFF
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_lines_or_drive_the_terminal() {
        let hostile = "bad\n2026-12-06T00:00:00Z ERROR stepscope: forged\x1b[2J\r\u{202e}txt";
        let clean = sanitize(hostile);
        assert_eq!(
            clean,
            "bad\\n2026-12-06T00:00:00Z ERROR stepscope: forged\\u{1b}[2J\\r\\u{202e}txt"
        );
        assert!(!clean.chars().any(|c| c.is_control()));
        assert_eq!(sanitize("plain text, ünïcode ✓"), "plain text, ünïcode ✓");
    }

    #[test]
    fn long_text_is_cut_with_a_marker_on_a_character_boundary() {
        let long = "é".repeat(100_000); // 200,000 bytes
        let clean = sanitize(&long);
        assert!(clean.len() <= MAX_GUEST_TEXT_BYTES + 40, "{}", clean.len());
        assert!(
            clean.ends_with("…[198976 more bytes cut]"),
            "{}",
            &clean[1000..]
        );
        let escapes = "\x1b".repeat(1000);
        let clean = sanitize_to(&escapes, 20);
        assert_eq!(clean, "\\u{1b}\\u{1b}\\u{1b}…[997 more bytes cut]");
        assert_eq!(sanitize_to("short", 5), "short");
    }
}
