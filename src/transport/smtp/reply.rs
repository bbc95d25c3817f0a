//! SMTP replies (RFC 5321 section 4.2): a three-digit code on every line, `-` after it on all
//! lines but the last. Parsing is pure, so the wire code only finds line ends.

/// Longest reply line accepted (Postfix's `line_length_limit` is 2048).
pub(super) const MAX_LINE: usize = 4096;
/// Most bytes one reply may take, all lines together (Postfix's `smtp_response_limit`).
pub(super) const MAX_REPLY: usize = 100_000;

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    pub code: u16,
    /// The text of each line, after the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// The server's words on one line: `"250 2.0.0 Ok: queued as 12345"`.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" "))
            .trim()
            .to_string()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// One line of a reply: its code, whether it is the last line, and its text.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ReplyLine {
    pub code: u16,
    pub last: bool,
    pub text: String,
}

/// Parses one line (CRLF or LF already removed). A bare code (`"250"`) is a last line.
pub(super) fn parse_line(line: &[u8]) -> Result<ReplyLine, String> {
    let shown = || String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    let digits = line.get(..3).filter(|d| d.iter().all(u8::is_ascii_digit));
    let Some(digits) = digits else {
        return Err(format!("not an SMTP reply line: {:?}", shown()));
    };
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(200..600).contains(&code) {
        return Err(format!("reply code out of range: {:?}", shown()));
    }
    let last = match line.get(3) {
        None | Some(b' ') => true,
        Some(b'-') => false,
        Some(_) => return Err(format!("not an SMTP reply line: {:?}", shown())),
    };
    let text = String::from_utf8_lossy(line.get(4..).unwrap_or_default())
        .trim_end()
        .to_string();
    Ok(ReplyLine { code, last, text })
}

/// Collects lines into replies: feed each line, a reply comes out with its last line.
#[derive(Default)]
pub(super) struct ReplyBuilder {
    code: Option<u16>,
    lines: Vec<String>,
    bytes: usize,
}

impl ReplyBuilder {
    pub fn push(&mut self, line: &[u8]) -> Result<Option<Reply>, String> {
        self.bytes += line.len();
        if self.bytes > MAX_REPLY {
            return Err("the reply is too large".into());
        }
        let parsed = parse_line(line)?;
        if self.code.is_some_and(|code| code != parsed.code) {
            return Err(format!(
                "a multi-line reply changed its code to {}",
                parsed.code
            ));
        }
        self.code = Some(parsed.code);
        self.lines.push(parsed.text);
        if !parsed.last {
            return Ok(None);
        }
        let reply = Reply {
            code: parsed.code,
            lines: std::mem::take(&mut self.lines),
        };
        *self = ReplyBuilder::default();
        Ok(Some(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(input: &[&str]) -> Result<Vec<Reply>, String> {
        let mut builder = ReplyBuilder::default();
        let mut out = Vec::new();
        for line in input {
            out.extend(builder.push(line.as_bytes())?);
        }
        Ok(out)
    }

    #[test]
    fn single_and_multi_line_replies() {
        let got = replies(&["250-localhost", "250-PIPELINING", "250 8BITMIME", "354 Go"]).unwrap();
        assert_eq!(got[0].code, 250);
        assert_eq!(got[0].lines, ["localhost", "PIPELINING", "8BITMIME"]);
        assert_eq!(got[1].text(), "354 Go");
        assert_eq!(replies(&["250"]).unwrap()[0].text(), "250");
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(replies(&["hello"]).is_err());
        assert!(replies(&["25"]).is_err());
        assert!(replies(&["250x"]).is_err());
        assert!(replies(&["099 no"]).is_err());
        assert!(replies(&["250-a", "251 b"]).is_err());
        let long = format!("250-{}", "x".repeat(4000));
        let lines: Vec<&str> = std::iter::repeat_n(long.as_str(), 30).collect();
        assert!(replies(&lines).is_err(), "an endless reply is cut off");
    }

    proptest::proptest! {
        /// Whatever a server sends, parsing is an answer, not a panic.
        #[test]
        fn parsing_never_panics(line in proptest::collection::vec(proptest::num::u8::ANY, 0..20)) {
            let _ = parse_line(&line);
        }
    }
}
