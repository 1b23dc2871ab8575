//! The operator's input paths on arbitrary bytes: the serial line editor,
//! the command parser and the boot configuration parser. Never panics; every
//! refusal is one line; accepted commands carry in-range values; a line that
//! overflowed the editor is refused whole, never run truncated.

use hypervisor::boot_config;
use hypervisor::console::{Command, Edit, LineEditor, parse};
use hypervisor::manager::{MAX_MEM_MIB, MIN_MEM_MIB};

pub fn console(data: &[u8]) {
    let mut editor = LineEditor::default();
    // Whether the line being typed lost a character (the editor rang the
    // bell: only an overflowed line does); Ctrl-C and Ctrl-U start afresh.
    let mut overflowed = false;
    for &b in data {
        let edit = editor.feed(b);
        if matches!(b, 0x03 | 0x15) {
            overflowed = false;
        }
        match &edit {
            Edit::Echo(e) if e.as_slice() == b"\x07" => overflowed = true,
            Edit::Refused(e) => {
                assert!(overflowed, "a line that fitted was refused: {}", e);
                assert!(e.to_string().starts_with("line too long") && !e.to_string().contains('\n'));
                overflowed = false;
            }
            Edit::Line(_) => {
                assert!(!overflowed, "an overflowed line ran truncated");
                overflowed = false;
            }
            _ => {}
        }
        if let Edit::Line(line) = edit {
            assert!(line.len() <= hypervisor::console::line::MAX_LINE);
            assert!(line.bytes().all(|c| (0x20..0x7f).contains(&c)));
            match parse(&line) {
                Ok(Some(p)) => match p.command {
                    Command::VmRun { guest, mem_mib, .. } => {
                        assert!(!guest.is_empty() && !guest.contains('='));
                        assert!(mem_mib.is_none_or(|m| (MIN_MEM_MIB..=MAX_MEM_MIB).contains(&m)));
                    }
                    Command::VmStats { id } | Command::VmStop { id } => assert!(id > 0),
                    _ => {}
                },
                Ok(None) => assert!(line.trim().is_empty()),
                Err(e) => assert!(!e.to_string().is_empty() && !e.to_string().contains('\n')),
            }
        }
    }
    if let Ok(text) = core::str::from_utf8(data) {
        let (cfg, problems) = boot_config::parse(text);
        assert!(problems.iter().all(|p| !p.contains('\n')));
        assert!(cfg.debug_exit_port != Some(0));
    }
}
