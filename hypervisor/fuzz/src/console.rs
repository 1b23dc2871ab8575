//! The operator's input paths on arbitrary bytes: the serial line editor,
//! the command parser and the boot configuration parser. Never panics; every
//! refusal is one line; accepted commands carry in-range values.

use hypervisor::boot_config;
use hypervisor::console::{Command, Edit, LineEditor, parse};
use hypervisor::manager::{MAX_MEM_MIB, MIN_MEM_MIB};

pub fn console(data: &[u8]) {
    let mut editor = LineEditor::default();
    for &b in data {
        if let Edit::Line(line) = editor.feed(b) {
            assert!(line.len() <= hypervisor::console::line::MAX_LINE);
            assert!(line.bytes().all(|c| (0x20..0x7f).contains(&c)));
            match parse(&line) {
                Ok(Some(p)) => match p.command {
                    Command::VmRun { guest, mem_mib, .. } => {
                        assert!(!guest.is_empty() && !guest.contains('='));
                        assert!((MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib));
                    }
                    Command::VmStats { id } | Command::VmStop { id } => assert!(id > 0),
                    _ => {}
                },
                Ok(None) => assert!(line.trim().is_empty()),
                Err(e) => assert!(!e.message.is_empty() && !e.message.contains('\n')),
            }
        }
    }
    if let Ok(text) = core::str::from_utf8(data) {
        let (cfg, problems) = boot_config::parse(text);
        assert!(problems.iter().all(|p| !p.contains('\n')));
        assert!(cfg.debug_exit_port != Some(0));
    }
}
