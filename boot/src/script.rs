//! Console scripts: what `boot run --script FILE` feeds the hypervisor.
//!
//! One item per line:
//! - `# ...` and blank lines are ignored;
//! - `@wait TEXT` waits until TEXT appears in the console output (anywhere
//!   after the previous command was sent); `@wait-secs N` sets how long the
//!   following waits may take (default 120 s);
//! - `@sleep SECS` pauses;
//! - `@type TEXT` types TEXT and Enter without waiting for a prompt (into a
//!   guest's console after `vm console <id>`);
//! - `@detach` types Ctrl-], which detaches the terminal from a guest;
//! - anything else is a console line, sent once the hypervisor shows its
//!   prompt (so a line is never typed into a busy console).

use anyhow::{Result, bail};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Send(String),
    /// Raw bytes, sent at once (no prompt awaited).
    Type(Vec<u8>),
    Wait {
        text: String,
        timeout: Duration,
    },
    Sleep(Duration),
}

pub fn parse(text: &str) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut wait = Duration::from_secs(120);
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('@') {
            let (word, arg) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let arg = arg.trim();
            match word {
                "wait" if !arg.is_empty() => steps.push(Step::Wait { text: arg.into(), timeout: wait }),
                "wait-secs" => wait = Duration::from_secs(num(arg, n)?),
                "sleep" => steps.push(Step::Sleep(Duration::from_secs(num(arg, n)?))),
                "type" => steps.push(Step::Type(format!("{arg}\r").into_bytes())),
                "detach" if arg.is_empty() => steps.push(Step::Type(vec![0x1d])),
                _ => bail!("script line {}: unknown directive {line:?}", n + 1),
            }
        } else {
            steps.push(Step::Send(line.into()));
        }
    }
    Ok(steps)
}

fn num(s: &str, line: usize) -> Result<u64> {
    s.parse().map_err(|_| anyhow::anyhow!("script line {}: {s:?} is not a number", line + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_into_a_guest_and_detaching() {
        let s = parse("vm console 1\n@type uname -r\n@wait 6.1\n@detach\n").unwrap();
        assert_eq!(s[1], Step::Type(b"uname -r\r".to_vec()));
        assert_eq!(s[3], Step::Type(vec![0x1d]));
        assert!(parse("@detach now").is_err());
    }

    #[test]
    fn parses_commands_waits_and_comments() {
        let s = parse("# hi\n\nvm run selftest\n@wait-secs 5\n@wait vm 1 exited\n@sleep 1\npoweroff\n").unwrap();
        assert_eq!(
            s,
            vec![
                Step::Send("vm run selftest".into()),
                Step::Wait { text: "vm 1 exited".into(), timeout: Duration::from_secs(5) },
                Step::Sleep(Duration::from_secs(1)),
                Step::Send("poweroff".into()),
            ]
        );
    }

    #[test]
    fn refuses_unknown_directives_and_bad_numbers() {
        assert!(parse("@frobnicate").is_err());
        assert!(parse("@sleep soon").is_err());
        assert!(parse("@wait").is_err());
    }
}
