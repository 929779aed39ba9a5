//! One-shot mode, for VMMs without vsock (QEMU on a host without
//! vhost-vsock, as `ligera bench` runs it): the kernel command line carries
//! one shell script, `ligera.run=HEX` (its bytes, hex-encoded, so that
//! spaces and quotes survive the kernel's parser). The agent runs it in the
//! image with the serial port as its terminal, writes [`EXIT_MARKER`] and
//! the status on a line of their own after the script's output, and ends
//! the VM (see [`DEBUG_EXIT_PORT`]).

/// The I/O port of QEMU's `isa-debug-exit` device, written once the status
/// is out, which ends QEMU at once.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// What precedes the script's exit status on the serial port.
pub const EXIT_MARKER: &str = "ligera-oneshot-exit=";

/// The longest script taken (the kernel's command line holds 2 KiB).
pub const MAX_SCRIPT: usize = 1024;

/// The script of `ligera.run=` in `cmdline`, if there is one.
pub fn parse_cmdline(cmdline: &str) -> Result<Option<String>, String> {
    let Some(hex) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ligera.run="))
    else {
        return Ok(None);
    };
    if hex.len() % 2 != 0 || hex.len() / 2 > MAX_SCRIPT {
        return Err(format!(
            "ligera.run: not an even number of hex digits, at most {}",
            2 * MAX_SCRIPT
        ));
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("x"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| "ligera.run: not hex".to_string())?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| "ligera.run: the script is not UTF-8".to_string())
}

/// `script` as the value of `ligera.run=`.
pub fn encode(script: &str) -> String {
    script.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Splits what the serial port carried into the script's output and its
/// exit status (None: the marker never came, the VM ended before).
pub fn split_output(out: &[u8]) -> (&[u8], Option<i32>) {
    let marker = format!("\n{EXIT_MARKER}");
    let Some(at) = out
        .windows(marker.len())
        .rposition(|w| w == marker.as_bytes())
    else {
        return (out, None);
    };
    let rest = &out[at + marker.len()..];
    let digits: Vec<u8> = rest
        .iter()
        .copied()
        .take_while(|b| b.is_ascii_digit())
        .collect();
    let status = std::str::from_utf8(&digits)
        .ok()
        .and_then(|s| s.parse().ok());
    (&out[..at], status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_round_trip_through_the_command_line() {
        let script = "echo \"a b\"; exit 3";
        let cmdline = format!("quiet ligera.run={} init=/agent", encode(script));
        assert_eq!(parse_cmdline(&cmdline), Ok(Some(script.to_string())));
        assert_eq!(parse_cmdline("quiet init=/agent"), Ok(None));
        assert!(parse_cmdline("ligera.run=abc").is_err());
        assert!(parse_cmdline("ligera.run=zz").is_err());
        assert!(parse_cmdline("ligera.run=ff").is_err());
        let long = "x".repeat(MAX_SCRIPT + 1);
        assert!(parse_cmdline(&format!("ligera.run={}", encode(&long))).is_err());
    }

    #[test]
    fn the_status_is_split_off_the_output() {
        let out = format!("running\n\n{EXIT_MARKER}7\n");
        assert_eq!(split_output(out.as_bytes()), (&b"running\n"[..], Some(7)));
        assert_eq!(split_output(b"cut short"), (&b"cut short"[..], None));
        // A script that prints the marker itself: the last one counts.
        let out = format!("\n{EXIT_MARKER}1\nmore\n{EXIT_MARKER}0\n");
        assert_eq!(split_output(out.as_bytes()).1, Some(0));
    }
}
