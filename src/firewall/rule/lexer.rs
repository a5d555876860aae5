//! The fwrule lexer: a faithful port of the `%lex` section of upstream's `fwrule.jison`.
//!
//! Upstream's lexer tries its rules **in order and takes the first that matches** (jison without
//! the `flex` option), not the longest. The rules are: whitespace (JavaScript `\s`), end of input,
//! the keywords (each only in its ALL-UPPER or all-lower spelling and followed by a word
//! boundary), the punctuation `- , = ( )`, double-quoted strings (unescaped here, at lex time),
//! IPv4 addresses, IPv6 addresses (lower-case hex only), CIDR suffixes and words
//! `[-a-zA-Z0-9_]+`. Tokens are produced lazily, one at a time, exactly when the parser asks for
//! one: a lexical error further on in the input is only seen once the parser gets there, as
//! upstream's.

use super::RuleError;

/// The kind of a token; the names are upstream's terminal names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    From,
    To,
    Ip,
    Subnet,
    Any,
    All,
    Tag,
    Vm,
    Vms,
    Dash,
    Comma,
    Eq,
    LParen,
    RParen,
    Or,
    And,
    Block,
    Allow,
    Port,
    Ports,
    Tcp,
    Udp,
    Icmp,
    Icmp6,
    Ah,
    Esp,
    Type,
    Code,
    Priority,
    Str,
    Ipv4,
    Ipv6,
    Cidr,
    Word,
    Eof,
}

impl Kind {
    /// How upstream's grammar names this terminal (used in error messages).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::From => "FROM",
            Kind::To => "TO",
            Kind::Ip => "ip",
            Kind::Subnet => "subnet",
            Kind::Any => "any",
            Kind::All => "all",
            Kind::Tag => "tag",
            Kind::Vm => "vm",
            Kind::Vms => "VMS",
            Kind::Dash => "'-'",
            Kind::Comma => "','",
            Kind::Eq => "'='",
            Kind::LParen => "'('",
            Kind::RParen => "')'",
            Kind::Or => "OR",
            Kind::And => "AND",
            Kind::Block => "BLOCK",
            Kind::Allow => "ALLOW",
            Kind::Port => "PORT",
            Kind::Ports => "PORTS",
            Kind::Tcp => "TCP",
            Kind::Udp => "UDP",
            Kind::Icmp => "ICMP",
            Kind::Icmp6 => "ICMP6",
            Kind::Ah => "AH",
            Kind::Esp => "ESP",
            Kind::Type => "TYPE",
            Kind::Code => "CODE",
            Kind::Priority => "PRIORITY",
            Kind::Str => "STRING",
            Kind::Ipv4 => "IPV4ADDR",
            Kind::Ipv6 => "IPV6ADDR",
            Kind::Cidr => "CIDRSUFFIX",
            Kind::Word => "word",
            Kind::Eof => "end of input",
        }
    }
}

/// One token: its kind, its text (unescaped for strings) and its position in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: Kind,
    pub text: String,
    pub pos: usize,
}

/// A lazy lexer over one rule's text.
pub(crate) struct Lexer<'a> {
    input: &'a str,
    /// Byte offset of the next unread character.
    off: usize,
    /// Character index of the next unread character (for messages).
    pos: usize,
    done: bool,
}

/// JavaScript's `\s`: ECMAScript WhiteSpace (TAB, VT, FF, ZWNBSP, Zs) and LineTerminator.
pub(crate) fn is_js_space(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202f}'
                | '\u{205f}'
                | '\u{3000}'
                | '\u{feff}'
    )
}

fn is_word_boundary_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn keyword(word: &str) -> Option<Kind> {
    Some(match word {
        "FROM" | "from" => Kind::From,
        "TO" | "to" => Kind::To,
        "IP" | "ip" => Kind::Ip,
        "SUBNET" | "subnet" => Kind::Subnet,
        "ANY" | "any" => Kind::Any,
        "ALL" | "all" => Kind::All,
        "TAG" | "tag" => Kind::Tag,
        "VM" | "vm" => Kind::Vm,
        "VMS" | "vms" => Kind::Vms,
        "OR" | "or" => Kind::Or,
        "AND" | "and" => Kind::And,
        "BLOCK" | "block" => Kind::Block,
        "ALLOW" | "allow" => Kind::Allow,
        "PORT" | "port" => Kind::Port,
        "PORTS" | "ports" => Kind::Ports,
        "TCP" | "tcp" => Kind::Tcp,
        "UDP" | "udp" => Kind::Udp,
        "ICMP" | "icmp" => Kind::Icmp,
        "ICMP6" | "icmp6" => Kind::Icmp6,
        "AH" | "ah" => Kind::Ah,
        "ESP" | "esp" => Kind::Esp,
        "TYPE" | "type" => Kind::Type,
        "CODE" | "code" => Kind::Code,
        "PRIORITY" | "priority" => Kind::Priority,
        _ => return None,
    })
}

fn is_hex_lower(c: u8) -> bool {
    c.is_ascii_digit() || (b'a'..=b'f').contains(&c)
}

fn run_len(bytes: &[u8], pred: impl Fn(u8) -> bool) -> usize {
    bytes.iter().take_while(|&&b| pred(b)).count()
}

/// `(\d{1,3}\.){3}\d{1,3}` anchored at the start; returns the match length.
fn match_ipv4(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    for _ in 0..3 {
        let n = run_len(&b[i..], |c| c.is_ascii_digit());
        if n == 0 || n > 3 || b.get(i + n) != Some(&b'.') {
            return None;
        }
        i += n + 1;
    }
    let n = run_len(&b[i..], |c| c.is_ascii_digit());
    if n == 0 {
        return None;
    }
    Some(i + n.min(3))
}

/// `[0-9a-f]*:[0-9a-f]*:[:0-9a-f]*` anchored at the start; returns the match length.
fn match_ipv6(b: &[u8]) -> Option<usize> {
    let mut i = run_len(b, is_hex_lower);
    if b.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    i += run_len(&b[i..], is_hex_lower);
    if b.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    i += run_len(&b[i..], |c| c == b':' || is_hex_lower(c));
    Some(i)
}

/// The escapes upstream's STRING rule admits after a backslash (besides `\uXXXX`).
fn simple_escape(c: char) -> Option<u16> {
    Some(match c {
        '"' => u16::from(b'"'),
        'b' => 0x08,
        'f' => 0x0c,
        'n' => u16::from(b'\n'),
        'r' => u16::from(b'\r'),
        't' => u16::from(b'\t'),
        '/' => u16::from(b'/'),
        '(' => u16::from(b'('),
        ')' => u16::from(b')'),
        '\\' => u16::from(b'\\'),
        _ => return None,
    })
}

/// Matches a double-quoted string at the start of `s` (which begins with `"`) and unescapes
/// it; returns (bytes consumed, characters consumed, value).
///
/// The value is built as UTF-16 as in JavaScript (`\uXXXX` gives one code unit) and decoded
/// lossily: a lone surrogate becomes U+FFFD (the one place a Rust string cannot hold what
/// upstream's JavaScript string holds).
fn match_string(s: &str) -> Option<(usize, usize, String)> {
    let mut units: Vec<u16> = Vec::new();
    let mut chars = s.char_indices().skip(1);
    let mut nchars = 1;
    while let Some((i, c)) = chars.next() {
        nchars += 1;
        match c {
            '"' => return Some((i + 1, nchars, String::from_utf16_lossy(&units))),
            '\\' => {
                let (_, e) = chars.next()?;
                nchars += 1;
                if let Some(u) = simple_escape(e) {
                    units.push(u);
                } else if e == 'u' {
                    let mut v: u32 = 0;
                    for _ in 0..4 {
                        let (_, h) = chars.next()?;
                        nchars += 1;
                        v = v * 16 + h.to_digit(16)?;
                    }
                    units.push(u16::try_from(v).ok()?);
                } else {
                    return None;
                }
            }
            other => {
                let mut buf = [0u16; 2];
                units.extend_from_slice(other.encode_utf16(&mut buf));
            }
        }
    }
    None
}

impl<'a> Lexer<'a> {
    /// A lexer positioned at the start of `input`.
    pub(crate) fn new(input: &'a str) -> Self {
        Lexer {
            input,
            off: 0,
            pos: 0,
            done: false,
        }
    }

    fn advance(&mut self, bytes: usize, chars: usize) -> &'a str {
        let text = &self.input[self.off..self.off + bytes];
        self.off += bytes;
        self.pos += chars;
        text
    }

    /// The next token, or a syntax error naming the unrecognised text and its position.
    pub(crate) fn next_token(&mut self) -> Result<Token, RuleError> {
        // Whitespace.
        let rest = &self.input[self.off..];
        let mut skip_b = 0;
        let mut skip_c = 0;
        for c in rest.chars() {
            if !is_js_space(c) {
                break;
            }
            skip_b += c.len_utf8();
            skip_c += 1;
        }
        self.advance(skip_b, skip_c);
        let pos = self.pos;
        let rest = &self.input[self.off..];
        let b = rest.as_bytes();
        if b.is_empty() {
            // jison returns EOF once for `$`, then its own end marker; both end the parse here.
            self.done = true;
            return Ok(Token {
                kind: Kind::Eof,
                text: String::new(),
                pos,
            });
        }
        let tok = |kind, text: &str| Token {
            kind,
            text: text.to_string(),
            pos,
        };
        // Keywords: a keyword followed by a word boundary is exactly a maximal run of word
        // characters that spells the keyword.
        let word_run = run_len(b, is_word_boundary_char);
        if word_run > 0 {
            if let Some(kind) = keyword(&rest[..word_run]) {
                let text = self.advance(word_run, word_run);
                return Ok(tok(kind, text));
            }
        }
        let punct = match b[0] {
            b'-' => Some(Kind::Dash),
            b',' => Some(Kind::Comma),
            b'=' => Some(Kind::Eq),
            b'(' => Some(Kind::LParen),
            b')' => Some(Kind::RParen),
            _ => None,
        };
        if let Some(kind) = punct {
            let text = self.advance(1, 1);
            return Ok(tok(kind, text));
        }
        if b[0] == b'"' {
            if let Some((nb, nc, value)) = match_string(rest) {
                self.advance(nb, nc);
                return Ok(Token {
                    kind: Kind::Str,
                    text: value,
                    pos,
                });
            }
        }
        // The remaining rules only match ASCII, so byte lengths are character counts.
        if let Some(n) = match_ipv4(b) {
            let text = self.advance(n, n);
            return Ok(tok(Kind::Ipv4, text));
        }
        if let Some(n) = match_ipv6(b) {
            let text = self.advance(n, n);
            return Ok(tok(Kind::Ipv6, text));
        }
        if b[0] == b'/' {
            let n = run_len(&b[1..], |c| c.is_ascii_digit()).min(3);
            if n > 0 {
                let text = self.advance(n + 1, n + 1);
                return Ok(tok(Kind::Cidr, text));
            }
        }
        let n = run_len(b, |c| c == b'-' || is_word_boundary_char(c));
        if n > 0 {
            let text = self.advance(n, n);
            return Ok(tok(Kind::Word, text));
        }
        let upcoming: String = rest.chars().take(20).collect();
        Err(RuleError::Syntax {
            pos,
            message: format!("unrecognised text '{upcoming}'"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<Kind> {
        let mut l = Lexer::new(s);
        let mut out = Vec::new();
        loop {
            match l.next_token() {
                Ok(t) if t.kind == Kind::Eof => return out,
                Ok(t) => out.push(t.kind),
                Err(_) => {
                    out.push(Kind::Eof);
                    return out;
                }
            }
        }
    }

    #[test]
    fn keywords_need_upper_or_lower_and_a_boundary() {
        assert_eq!(
            kinds("FROM from From"),
            vec![Kind::From, Kind::From, Kind::Word]
        );
        assert_eq!(kinds("to-do"), vec![Kind::To, Kind::Dash, Kind::Word]);
        assert_eq!(kinds("ports portsx"), vec![Kind::Ports, Kind::Word]);
        assert_eq!(kinds("icmp6 icmp"), vec![Kind::Icmp6, Kind::Icmp]);
    }

    #[test]
    fn addresses_and_words() {
        assert_eq!(kinds("10.0.0.1/24"), vec![Kind::Ipv4, Kind::Cidr]);
        assert_eq!(kinds("fd00::1"), vec![Kind::Ipv6]);
        assert_eq!(kinds("FD00::1"), vec![Kind::Word, Kind::Ipv6]);
        assert_eq!(kinds("20-40 -40"), vec![Kind::Word, Kind::Dash, Kind::Word]);
        // `.254` is unrecognised text: the lexer error is reported as Eof in this helper.
        assert_eq!(kinds("10.99.99.99.254"), vec![Kind::Ipv4, Kind::Eof]);
    }

    #[test]
    fn strings_unescape() {
        let mut l = Lexer::new(r#""a\"b\u0041\(""#);
        let t = l.next_token().unwrap();
        assert_eq!(t.kind, Kind::Str);
        assert_eq!(t.text, "a\"bA(");
        assert!(Lexer::new(r#""bad\q""#).next_token().is_err());
    }
}
