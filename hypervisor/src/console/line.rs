//! Line editing over a byte stream from a terminal: printable characters,
//! backspace/delete, Ctrl-C (discard the line) and Ctrl-U (erase it); CR,
//! LF and CR LF all end a line.
//!
//! A line that grew past [`MAX_LINE`] is refused as a whole when it ends:
//! running the prefix that fitted could turn `vm stop 12` into `vm stop 1`.

use alloc::string::String;
use alloc::vec::Vec;

use super::{ParseError, Refusal};

/// Longest accepted line; further characters are refused with a bell, and
/// the line is refused when it ends.
pub const MAX_LINE: usize = 256;

#[derive(Debug, Default)]
pub struct LineEditor {
    buf: String,
    last_cr: bool,
    /// Printable characters dropped from the current line (past `MAX_LINE`).
    dropped: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    /// Bytes to echo to the terminal.
    Echo(Vec<u8>),
    /// A complete line (its newline already echoed).
    Line(String),
    /// A complete line that was refused (too long): report the error and
    /// run nothing.
    Refused(ParseError),
    /// Nothing to do.
    None,
}

impl LineEditor {
    /// Nothing typed on the current line.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.dropped == 0
    }

    pub fn feed(&mut self, b: u8) -> Edit {
        let after_cr = core::mem::replace(&mut self.last_cr, b == b'\r');
        match b {
            b'\n' if after_cr => Edit::None,
            b'\r' | b'\n' => {
                let line = core::mem::take(&mut self.buf);
                match core::mem::take(&mut self.dropped) {
                    0 => Edit::Line(line),
                    dropped => Edit::Refused(ParseError {
                        refusal: Refusal::LineTooLong { chars: line.len() + dropped },
                        json: line.split_whitespace().any(|w| w == "--json"),
                    }),
                }
            }
            0x08 | 0x7f => {
                // What was dropped cannot be edited back: the line stays
                // refused until it ends or is discarded.
                if self.dropped > 0 {
                    Edit::Echo(b"\x07".to_vec())
                } else if self.buf.pop().is_some() {
                    Edit::Echo(b"\x08 \x08".to_vec())
                } else {
                    Edit::None
                }
            }
            0x03 => {
                self.buf.clear();
                self.dropped = 0;
                Edit::Echo(b"^C\r\n".to_vec())
            }
            0x15 => {
                let n = self.buf.chars().count();
                self.buf.clear();
                self.dropped = 0;
                let mut e = Vec::new();
                for _ in 0..n {
                    e.extend_from_slice(b"\x08 \x08");
                }
                Edit::Echo(e)
            }
            0x20..=0x7e => {
                if self.buf.len() >= MAX_LINE {
                    self.dropped += 1;
                    return Edit::Echo(b"\x07".to_vec());
                }
                self.buf.push(b as char);
                Edit::Echo(alloc::vec![b])
            }
            // Other control bytes and non-ASCII: ignored (the grammar is
            // ASCII and a terminal's escape sequences must not leak in).
            _ => Edit::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(e: &mut LineEditor, s: &[u8]) -> Vec<Edit> {
        s.iter().map(|&b| e.feed(b)).filter(|x| *x != Edit::None).collect()
    }

    #[test]
    fn lines_end_on_cr_lf_or_crlf_once() {
        let mut e = LineEditor::default();
        let out = feed_all(&mut e, b"ab\r\ncd\nef\r");
        let lines: Vec<_> =
            out.into_iter().filter_map(|x| if let Edit::Line(l) = x { Some(l) } else { None }).collect();
        assert_eq!(lines, ["ab", "cd", "ef"]);
    }

    #[test]
    fn editing_keys() {
        let mut e = LineEditor::default();
        feed_all(&mut e, b"vm lisx\x7ft");
        assert_eq!(e.feed(b'\r'), Edit::Line("vm list".into()));
        feed_all(&mut e, b"junk\x03");
        assert_eq!(e.feed(b'\r'), Edit::Line("".into()), "Ctrl-C discards the line");
        feed_all(&mut e, b"abc\x15help");
        assert_eq!(e.feed(b'\n'), Edit::Line("help".into()));
        assert_eq!(e.feed(0x7f), Edit::None, "backspace on an empty line does nothing");
        feed_all(&mut e, b"\x1b[A\xffok");
        assert_eq!(e.feed(b'\r'), Edit::Line("[Aok".into()), "escape and non-ASCII bytes are dropped");
    }

    fn refused(e: Edit) -> ParseError {
        match e {
            Edit::Refused(err) => err,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn overlong_lines_are_refused_whole() {
        // `vm stop 12` pushed past the cap: the prefix `vm stop 1` must not run.
        let mut e = LineEditor::default();
        let line = format!("{}vm stop 12", " ".repeat(MAX_LINE - 9));
        let out = feed_all(&mut e, line.as_bytes());
        assert_eq!(out.last(), Some(&Edit::Echo(b"\x07".to_vec())), "the dropped character rings the bell");
        assert!(!e.is_empty(), "an overflowed line is still a line being typed");
        let err = refused(e.feed(b'\r'));
        assert_eq!(err.to_string(), "line too long (257 characters, at most 256); nothing was run");
        assert!(!err.json && !err.to_string().contains('\n'));
        // The next line is unaffected.
        feed_all(&mut e, b"vm list");
        assert_eq!(e.feed(b'\r'), Edit::Line("vm list".into()));
    }

    #[test]
    fn a_line_of_exactly_the_cap_runs() {
        let mut e = LineEditor::default();
        feed_all(&mut e, "x".repeat(MAX_LINE).as_bytes());
        assert_eq!(e.feed(b'\n'), Edit::Line("x".repeat(MAX_LINE)));
    }

    #[test]
    fn overflow_survives_backspace_but_not_discard() {
        let mut e = LineEditor::default();
        feed_all(&mut e, "y".repeat(MAX_LINE + 3).as_bytes());
        // Deleting below the cap does not bring the dropped characters back.
        for _ in 0..10 {
            assert_eq!(e.feed(0x7f), Edit::Echo(b"\x07".to_vec()));
        }
        let err = refused(e.feed(b'\r'));
        assert!(err.to_string().contains("259 characters"), "{err}");
        // Ctrl-C and Ctrl-U start afresh.
        feed_all(&mut e, "z".repeat(MAX_LINE + 1).as_bytes());
        feed_all(&mut e, b"\x03help");
        assert_eq!(e.feed(b'\r'), Edit::Line("help".into()));
        feed_all(&mut e, "z".repeat(MAX_LINE + 1).as_bytes());
        feed_all(&mut e, b"\x15help");
        assert_eq!(e.feed(b'\r'), Edit::Line("help".into()));
    }

    #[test]
    fn an_overlong_json_command_is_refused_in_json() {
        let mut e = LineEditor::default();
        feed_all(&mut e, format!("vm list --json {}", "a".repeat(MAX_LINE)).as_bytes());
        assert!(refused(e.feed(b'\n')).json);
    }
}
