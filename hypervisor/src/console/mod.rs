//! The operator console: a line editor for the serial port, the command
//! grammar, and the replies in text or JSON. Bad input gets a one-line error
//! and changes nothing.

mod checkpoint;
pub mod commands;
mod disk;
pub mod line;
mod mem;
pub mod parse;
pub mod reply;

pub use commands::{CpuStatus, HostStatus, execute};
pub use line::{Edit, LineEditor};
pub use parse::{Command, ParseError, Parsed, Refusal, parse};

/// What the console prints before reading a line.
pub const PROMPT: &str = "hv> ";
