//! The message as it goes on the wire after DATA's 354 (RFC 5321 sections 4.1.1.4 and 4.5.2).

/// Encodes `body` for the DATA phase, terminator included: every line ends in CRLF (a bare CR or
/// LF becomes one, since RFC 5321 allows them only together; `build_email` never makes them, but
/// a stray one must not end the data early or reach a server that rejects it), a line that
/// starts with `.` gets another `.`, a last line without an ending gets one, then `.` CRLF.
pub(super) fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 32 + 5);
    let mut at_line_start = true;
    let mut bytes = body.iter().copied().peekable();
    while let Some(byte) = bytes.next() {
        match byte {
            b'\r' | b'\n' => {
                if byte == b'\r' && bytes.peek() == Some(&b'\n') {
                    bytes.next();
                }
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
                continue;
            }
            b'.' if at_line_start => out.push(b'.'),
            _ => {}
        }
        out.push(byte);
        at_line_start = false;
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(body: &str) -> String {
        String::from_utf8(encode(body.as_bytes())).unwrap()
    }

    #[test]
    fn lines_starting_with_a_dot_get_another() {
        assert_eq!(text(".hidden\r\n"), "..hidden\r\n.\r\n");
        assert_eq!(text("a\r\n.\r\nb\r\n"), "a\r\n..\r\nb\r\n.\r\n");
        assert_eq!(text("a\r\n..two\r\n"), "a\r\n...two\r\n.\r\n");
        assert_eq!(text("a.b\r\n"), "a.b\r\n.\r\n");
    }

    #[test]
    fn line_endings_become_crlf_and_the_last_line_is_ended() {
        assert_eq!(text("a\nb"), "a\r\nb\r\n.\r\n");
        assert_eq!(text("a\rb\r\n"), "a\r\nb\r\n.\r\n");
        assert_eq!(text("a\n.b\n"), "a\r\n..b\r\n.\r\n");
        assert_eq!(text(""), ".\r\n");
        assert_eq!(text("\r\n"), "\r\n.\r\n");
    }

    /// What a server does with the data: cut at the first lone `.` line, unstuff.
    fn server_reads(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in wire.split_inclusive(|&b| b == b'\n') {
            if line == b".\r\n" {
                return out;
            }
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        panic!("no terminator in {wire:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any CRLF body arrives exactly as it was, however many dots and line ends it holds.
        #[test]
        fn a_crlf_body_round_trips(lines in proptest::collection::vec("[.a\r]{0,4}", 0..8)) {
            let body: String = lines
                .iter()
                .map(|l| format!("{}\r\n", l.replace('\r', "")))
                .collect();
            let wire = encode(body.as_bytes());
            proptest::prop_assert_eq!(server_reads(&wire), body.as_bytes());
        }

        /// Whatever the bytes, the wire form has only CRLF line ends and exactly one terminator.
        #[test]
        fn the_terminator_appears_only_at_the_end(body in proptest::collection::vec(
            proptest::sample::select(vec![b'.', b'\r', b'\n', b'x']), 0..40)) {
            let wire = encode(&body);
            let lines: Vec<&[u8]> = wire.split_inclusive(|&b| b == b'\n').collect();
            proptest::prop_assert!(lines.iter().all(|l| l.ends_with(b"\r\n")));
            proptest::prop_assert!(lines.iter().all(|l| !l[..l.len() - 2].contains(&b'\r')));
            let ends = lines.iter().filter(|l| **l == b".\r\n").count();
            proptest::prop_assert_eq!(ends, 1);
            proptest::prop_assert_eq!(*lines.last().unwrap(), b".\r\n");
        }
    }
}
