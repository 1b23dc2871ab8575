//! How every console command answers, in the form the operator asked for:
//! text lines, or one JSON object per reply (`--json`), so scripts parse
//! the `vm`, `net` and `migrate` commands alike.

use alloc::format;
use alloc::string::ToString;
use serde_json::{Value, json};

use crate::vm::exit::Console;

/// Prints the reply of command `name`: its text's lines, or
/// `{"ok":true,"command":name, ...fields}` (`fields` a JSON object); a
/// refusal as `error: <e>` (`error: <name>: <e>` with `name_errors`) or
/// `{"ok":false,"command":name,"error":e}`.
pub fn print(out: &mut impl Console, name: &str, json: bool, name_errors: bool, result: Result<(&str, Value), &str>) {
    match (result, json) {
        (Ok((text, _)), false) => text.lines().for_each(|l| out.line(l)),
        (Ok((_, fields)), true) => {
            let mut v = json!({ "ok": true, "command": name });
            if let (Value::Object(o), Value::Object(f)) = (&mut v, fields) {
                o.extend(f);
            }
            out.line(&v.to_string());
        }
        (Err(e), false) if name_errors => out.line(&format!("error: {name}: {e}")),
        (Err(e), false) => out.line(&format!("error: {e}")),
        (Err(e), true) => out.line(&json!({ "ok": false, "command": name, "error": e }).to_string()),
    }
}

/// A line that did not parse as a command: `error: <why>`, or
/// `{"ok":false,"error":why}`.
pub fn print_parse_error(out: &mut impl Console, why: &str, json: bool) {
    if json {
        out.line(&json!({ "ok": false, "error": why }).to_string());
    } else {
        out.line(&format!("error: {why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Lines;

    #[test]
    fn replies_in_both_forms() {
        let mut l = Lines::default();
        print(&mut l, "net show", false, true, Ok(("a\nb", json!({ "x": 1 }))));
        print(&mut l, "net show", true, true, Ok(("a\nb", json!({ "x": 1 }))));
        print(&mut l, "net show", false, true, Err("no nic"));
        print(&mut l, "vm list", false, false, Err("no vm 3"));
        print(&mut l, "vm list", true, false, Err("no vm 3"));
        print_parse_error(&mut l, "unknown command \"x\"", false);
        print_parse_error(&mut l, "unknown command \"x\"", true);
        assert_eq!(
            l.0,
            [
                "a",
                "b",
                r#"{"command":"net show","ok":true,"x":1}"#,
                "error: net show: no nic",
                "error: no vm 3",
                r#"{"command":"vm list","error":"no vm 3","ok":false}"#,
                "error: unknown command \"x\"",
                r#"{"error":"unknown command \"x\"","ok":false}"#,
            ]
        );
    }
}
