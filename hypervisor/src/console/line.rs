//! Line editing over a byte stream from a terminal: printable characters,
//! backspace/delete, Ctrl-C (discard the line) and Ctrl-U (erase it); CR,
//! LF and CR LF all end a line.

use alloc::string::String;
use alloc::vec::Vec;

/// Longest accepted line; further characters are refused with a bell.
pub const MAX_LINE: usize = 256;

#[derive(Debug, Default)]
pub struct LineEditor {
    buf: String,
    last_cr: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    /// Bytes to echo to the terminal.
    Echo(Vec<u8>),
    /// A complete line (its newline already echoed).
    Line(String),
    /// Nothing to do.
    None,
}

impl LineEditor {
    /// Nothing typed on the current line.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn feed(&mut self, b: u8) -> Edit {
        let after_cr = core::mem::replace(&mut self.last_cr, b == b'\r');
        match b {
            b'\n' if after_cr => Edit::None,
            b'\r' | b'\n' => {
                let line = core::mem::take(&mut self.buf);
                Edit::Line(line)
            }
            0x08 | 0x7f => {
                if self.buf.pop().is_some() {
                    Edit::Echo(b"\x08 \x08".to_vec())
                } else {
                    Edit::None
                }
            }
            0x03 => {
                self.buf.clear();
                Edit::Echo(b"^C\r\n".to_vec())
            }
            0x15 => {
                let n = self.buf.chars().count();
                self.buf.clear();
                let mut e = Vec::new();
                for _ in 0..n {
                    e.extend_from_slice(b"\x08 \x08");
                }
                Edit::Echo(e)
            }
            0x20..=0x7e => {
                if self.buf.len() >= MAX_LINE {
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

    #[test]
    fn overlong_lines_are_capped() {
        let mut e = LineEditor::default();
        for _ in 0..MAX_LINE + 10 {
            e.feed(b'x');
        }
        match e.feed(b'\r') {
            Edit::Line(l) => assert_eq!(l.len(), MAX_LINE),
            other => panic!("{other:?}"),
        }
    }
}
