//! The fwrule grammar as a recursive-descent parser that reproduces upstream's LALR(1) parser
//! decision for decision.
//!
//! Upstream (jison) runs its value checks inside grammar reductions, and an LALR parser only
//! reduces once it has read the next token and found it in the reduction's lookahead set. So
//! whether a bad value or a later syntax error is reported depends on that set, which LALR
//! state merging makes wider than the grammar alone suggests (for example `FROM ip 1.2.3.999 )`
//! reports the bad address, because `)` may follow an address inside a parenthesised list). Each
//! checked construct below therefore peeks at the next token and requires it to be in the exact
//! lookahead set of upstream's reduction (the `LA_*` constants, read off upstream's parse table)
//! before running its check; otherwise the next token is the syntax error. The one reduction
//! upstream makes without a lookahead (the priority level) checks at once.

use super::lexer::{Kind, Lexer, Token};
use super::validate::{decimal_in, is_uuid, node_is_ipv4, node_is_ipv6, validate_subnet};
use super::{
    Action, IcmpTarget, IpTarget, ParseOptions, ParseTree, PortTarget, ProtoTargets, Protocol,
    RuleError, SubnetTarget, Tag, Target, Wildcard,
};

/// Lookahead of every target-level reduction (addresses, subnets, VM UUIDs).
const LA_TARGET: &[Kind] = &[Kind::To, Kind::RParen, Kind::Or, Kind::Block, Kind::Allow];
/// Lookahead of `portnumber` (after `PORT n`).
const LA_PORTNUMBER: &[Kind] = &[Kind::Eof, Kind::Priority, Kind::RParen, Kind::And];
/// Lookahead of `portrange` (one element of a `PORTS` list).
const LA_PORTRANGE: &[Kind] = &[Kind::Eof, Kind::Priority, Kind::Comma];
/// Lookahead of a whole protocol clause (`PORTS` list, `icmp6`, `ah`, `esp`).
const LA_PROTOCOL: &[Kind] = &[Kind::Eof, Kind::Priority];
/// Lookahead of `TYPE ALL`.
const LA_TYPE_ALL: &[Kind] = &[Kind::Eof, Kind::Priority, Kind::RParen];
/// Lookahead of `icmptype`.
const LA_ICMPTYPE: &[Kind] = &[
    Kind::Eof,
    Kind::Priority,
    Kind::RParen,
    Kind::And,
    Kind::Code,
];
/// Lookahead of `icmpcode`.
const LA_ICMPCODE: &[Kind] = &[Kind::Eof, Kind::Priority, Kind::RParen, Kind::And];

/// The targets that can start a side.
const TARGET_START: &[Kind] = &[Kind::Ip, Kind::Subnet, Kind::Tag, Kind::Vm];

pub(crate) struct Parser<'a> {
    lexer: Lexer<'a>,
    peeked: Option<Token>,
    max_version: u32,
    enforce_subnet_mask: bool,
}

fn expected_list(kinds: &[Kind]) -> String {
    kinds
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'a> Parser<'a> {
    pub(crate) fn new(input: &'a str, opts: &ParseOptions) -> Self {
        Parser {
            lexer: Lexer::new(input),
            peeked: None,
            // Upstream: `opts.maxVersion || CURR_VERSION`.
            max_version: match opts.max_version {
                None | Some(0) => super::CURRENT_VERSION,
                Some(v) => v,
            },
            enforce_subnet_mask: opts.enforce_subnet_mask,
        }
    }

    fn peek(&mut self) -> Result<&Token, RuleError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lexer.next_token()?);
        }
        // Just filled above.
        self.peeked.as_ref().ok_or(RuleError::Syntax {
            pos: 0,
            message: "internal lexer state".into(),
        })
    }

    fn peek_kind(&mut self) -> Result<Kind, RuleError> {
        Ok(self.peek()?.kind)
    }

    fn next(&mut self) -> Result<Token, RuleError> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lexer.next_token(),
        }
    }

    fn unexpected(tok: &Token, expected: &[Kind]) -> RuleError {
        let found = if tok.kind == Kind::Eof {
            "end of input".to_string()
        } else {
            format!("'{}'", tok.text)
        };
        RuleError::Syntax {
            pos: tok.pos,
            message: format!(
                "unexpected {found} ({}), expected {}",
                tok.kind.name(),
                expected_list(expected)
            ),
        }
    }

    /// Consumes the next token, which must be one of `kinds`.
    fn expect(&mut self, kinds: &[Kind]) -> Result<Token, RuleError> {
        let tok = self.next()?;
        if kinds.contains(&tok.kind) {
            Ok(tok)
        } else {
            Err(Self::unexpected(&tok, kinds))
        }
    }

    /// Requires the next token (not consumed) to be in a reduction's lookahead set.
    fn lookahead(&mut self, set: &[Kind]) -> Result<(), RuleError> {
        let tok = self.peek()?;
        if set.contains(&tok.kind) {
            Ok(())
        } else {
            let tok = tok.clone();
            Err(Self::unexpected(&tok, set))
        }
    }

    fn version(&self, needed: u32, feature: &'static str, pos: usize) -> Result<(), RuleError> {
        if needed > self.max_version {
            Err(RuleError::Version {
                feature,
                needed,
                pos,
            })
        } else {
            Ok(())
        }
    }

    fn value(pos: usize, message: String) -> RuleError {
        RuleError::Value { pos, message }
    }

    /// `rule = FROM side TO side action protocol [PRIORITY level] EOF`.
    pub(crate) fn parse_rule(&mut self) -> Result<ParseTree, RuleError> {
        self.expect(&[Kind::From])?;
        let from = self.parse_side()?;
        self.expect(&[Kind::To])?;
        let to = self.parse_side()?;
        let action = match self.expect(&[Kind::Block, Kind::Allow])?.kind {
            Kind::Block => Action::Block,
            _ => Action::Allow,
        };
        let (protocol, targets) = self.parse_protocol()?;
        let tok = self.expect(&[Kind::Eof, Kind::Priority])?;
        let priority = if tok.kind == Kind::Priority {
            let word = self.expect(&[Kind::Word])?;
            // Reduced without a lookahead (a default action upstream): check at once.
            let level = decimal_in(&word.text, 0, 100).ok_or_else(|| {
                Self::value(
                    word.pos,
                    format!("Priority level \"{}\" is invalid", word.text),
                )
            })?;
            self.expect(&[Kind::Eof])?;
            self.version(4, "priority levels", tok.pos)?;
            Some(level as u8)
        } else {
            None
        };
        Ok(ParseTree {
            from,
            to,
            action,
            protocol,
            targets,
            priority,
        })
    }

    /// `side = ANY | ALL VMS | ( ANY ) | ( ALL VMS ) | target | ( target {OR target} )`.
    fn parse_side(&mut self) -> Result<Vec<Target>, RuleError> {
        let mut start = vec![Kind::LParen, Kind::Any, Kind::All];
        start.extend_from_slice(TARGET_START);
        match self.peek_kind()? {
            Kind::Any => {
                self.next()?;
                Ok(vec![Target::Wildcard(Wildcard::Any)])
            }
            Kind::All => {
                self.next()?;
                self.expect(&[Kind::Vms])?;
                Ok(vec![Target::Wildcard(Wildcard::AllVms)])
            }
            Kind::LParen => {
                self.next()?;
                let mut inner = vec![Kind::Any, Kind::All];
                inner.extend_from_slice(TARGET_START);
                match self.peek_kind()? {
                    Kind::Any => {
                        self.next()?;
                        self.expect(&[Kind::RParen])?;
                        Ok(vec![Target::Wildcard(Wildcard::Any)])
                    }
                    Kind::All => {
                        self.next()?;
                        self.expect(&[Kind::Vms])?;
                        self.expect(&[Kind::RParen])?;
                        Ok(vec![Target::Wildcard(Wildcard::AllVms)])
                    }
                    k if TARGET_START.contains(&k) => {
                        let mut targets = vec![self.parse_target()?];
                        loop {
                            match self.expect(&[Kind::RParen, Kind::Or])?.kind {
                                Kind::Or => {
                                    let k = self.peek_kind()?;
                                    if !TARGET_START.contains(&k) {
                                        let t = self.next()?;
                                        return Err(Self::unexpected(&t, TARGET_START));
                                    }
                                    targets.push(self.parse_target()?);
                                }
                                _ => return Ok(targets),
                            }
                        }
                    }
                    _ => {
                        let t = self.next()?;
                        Err(Self::unexpected(&t, &inner))
                    }
                }
            }
            k if TARGET_START.contains(&k) => Ok(vec![self.parse_target()?]),
            _ => {
                let t = self.next()?;
                Err(Self::unexpected(&t, &start))
            }
        }
    }

    /// One `ip`, `subnet`, `tag` or `vm` target (the caller has peeked its keyword).
    fn parse_target(&mut self) -> Result<Target, RuleError> {
        let kw = self.next()?;
        match kw.kind {
            Kind::Ip => {
                let addr = self.expect(&[Kind::Ipv4, Kind::Ipv6])?;
                self.lookahead(LA_TARGET)?;
                if addr.kind == Kind::Ipv4 {
                    let valid = node_is_ipv4(&addr.text)
                        && addr.text != "0.0.0.0"
                        && addr.text != "255.255.255.255";
                    let ip = addr.text.parse().ok().filter(|_| valid).ok_or_else(|| {
                        Self::value(
                            addr.pos,
                            format!("IPv4 address \"{}\" is invalid", addr.text),
                        )
                    })?;
                    Ok(Target::Ip(IpTarget {
                        text: addr.text,
                        addr: std::net::IpAddr::V4(ip),
                    }))
                } else {
                    self.version(3, "IPv6", addr.pos)?;
                    let ip = Some(&addr.text)
                        .filter(|t| node_is_ipv6(t))
                        .and_then(|t| super::validate::ipv6_value(t))
                        .ok_or_else(|| {
                            Self::value(
                                addr.pos,
                                format!("IPv6 address \"{}\" is invalid", addr.text),
                            )
                        })?;
                    Ok(Target::Ip(IpTarget {
                        text: addr.text,
                        addr: std::net::IpAddr::V6(ip),
                    }))
                }
            }
            Kind::Subnet => {
                let addr = self.expect(&[Kind::Ipv4, Kind::Ipv6])?;
                let suffix = self.expect(&[Kind::Cidr])?;
                self.lookahead(LA_TARGET)?;
                if addr.kind == Kind::Ipv6 {
                    self.version(3, "IPv6", addr.pos)?;
                }
                let text = format!("{}{}", addr.text, suffix.text);
                let (net, prefix) = validate_subnet(
                    &addr.text,
                    suffix.text.trim_start_matches('/'),
                    self.enforce_subnet_mask,
                )
                .map_err(|p| {
                    Self::value(
                        addr.pos,
                        format!("Subnet \"{}\" is invalid ({})", text, p.reason()),
                    )
                })?;
                Ok(Target::Subnet(SubnetTarget {
                    text,
                    addr: net,
                    prefix,
                }))
            }
            Kind::Vm => {
                let word = self.expect(&[Kind::Word])?;
                self.lookahead(LA_TARGET)?;
                if !is_uuid(&word.text) {
                    return Err(Self::value(
                        word.pos,
                        format!("UUID \"{}\" is invalid", word.text),
                    ));
                }
                Ok(Target::Vm(word.text))
            }
            _ => {
                // TAG: tag_string [ '=' tag_string ]
                let name = self.expect(&[Kind::Word, Kind::Str])?.text;
                if self.peek_kind()? == Kind::Eq {
                    self.next()?;
                    let value = self.expect(&[Kind::Word, Kind::Str])?.text;
                    Ok(Target::Tag(Tag {
                        name,
                        value: Some(value),
                    }))
                } else {
                    Ok(Target::Tag(Tag { name, value: None }))
                }
            }
        }
    }

    fn parse_protocol(&mut self) -> Result<(Protocol, ProtoTargets), RuleError> {
        let kinds = [
            Kind::Tcp,
            Kind::Udp,
            Kind::Icmp,
            Kind::Icmp6,
            Kind::Ah,
            Kind::Esp,
        ];
        let tok = self.expect(&kinds)?;
        match tok.kind {
            Kind::Tcp | Kind::Udp => {
                let ports = self.parse_ports()?;
                let proto = if tok.kind == Kind::Tcp {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                Ok((proto, ProtoTargets::Ports(ports)))
            }
            Kind::Icmp | Kind::Icmp6 => {
                let types = self.parse_types()?;
                if tok.kind == Kind::Icmp6 {
                    self.lookahead(LA_PROTOCOL)?;
                    self.version(3, "IPv6", tok.pos)?;
                    Ok((Protocol::Icmp6, ProtoTargets::Types(types)))
                } else {
                    Ok((Protocol::Icmp, ProtoTargets::Types(types)))
                }
            }
            _ => {
                self.lookahead(LA_PROTOCOL)?;
                if tok.kind == Kind::Ah {
                    self.version(4, "AH", tok.pos)?;
                    Ok((Protocol::Ah, ProtoTargets::All))
                } else {
                    self.version(4, "ESP", tok.pos)?;
                    Ok((Protocol::Esp, ProtoTargets::All))
                }
            }
        }
    }

    /// `PORT n`: checks the number once the lookahead allows the reduction.
    fn port_number(&mut self) -> Result<PortTarget, RuleError> {
        let word = self.expect(&[Kind::Word])?;
        self.lookahead(LA_PORTNUMBER)?;
        port_value(&word.text, word.pos).map(PortTarget::Port)
    }

    fn parse_ports(&mut self) -> Result<Vec<PortTarget>, RuleError> {
        let tok = self.expect(&[Kind::Port, Kind::Ports, Kind::LParen])?;
        match tok.kind {
            Kind::Port => {
                if self.peek_kind()? == Kind::All {
                    self.next()?;
                    Ok(vec![PortTarget::All])
                } else {
                    Ok(vec![self.port_number()?])
                }
            }
            Kind::Ports => {
                let mut list = Vec::new();
                loop {
                    let first = self.expect(&[Kind::Word])?;
                    if self.peek_kind()? == Kind::Dash {
                        self.next()?;
                        let second = self.expect(&[Kind::Word])?;
                        self.lookahead(LA_PORTRANGE)?;
                        let start = port_value(&first.text, first.pos)?;
                        let end = port_value(&second.text, second.pos)?;
                        list.push(range(start, end, second.pos)?);
                    } else {
                        self.lookahead(LA_PORTRANGE)?;
                        list.push(maybe_range(&first.text, first.pos)?);
                    }
                    if self.peek_kind()? == Kind::Comma {
                        self.next()?;
                    } else {
                        break;
                    }
                }
                self.lookahead(LA_PROTOCOL)?;
                self.version(2, "port ranges", tok.pos)?;
                Ok(list)
            }
            _ => {
                // '(' PORT ALL ')' | '(' PORT n {AND PORT n} ')'
                self.expect(&[Kind::Port])?;
                if self.peek_kind()? == Kind::All {
                    self.next()?;
                    self.expect(&[Kind::RParen])?;
                    return Ok(vec![PortTarget::All]);
                }
                let mut list = vec![self.port_number()?];
                loop {
                    match self.expect(&[Kind::RParen, Kind::And])?.kind {
                        Kind::And => {
                            self.expect(&[Kind::Port])?;
                            list.push(self.port_number()?);
                        }
                        _ => return Ok(list),
                    }
                }
            }
        }
    }

    /// `TYPE t [CODE c]` or `TYPE ALL` (after the TYPE keyword); `all_ok` is false after AND.
    fn icmp_type(&mut self, all_ok: bool) -> Result<IcmpTarget, RuleError> {
        let kinds: &[Kind] = if all_ok {
            &[Kind::Word, Kind::All]
        } else {
            &[Kind::Word]
        };
        let tok = self.expect(kinds)?;
        if tok.kind == Kind::All {
            self.lookahead(LA_TYPE_ALL)?;
            self.version(3, "all ICMP types", tok.pos)?;
            return Ok(IcmpTarget::All);
        }
        self.lookahead(LA_ICMPTYPE)?;
        let t = decimal_in(&tok.text, 0, 255)
            .ok_or_else(|| Self::value(tok.pos, format!("ICMP type \"{}\" is invalid", tok.text)))?
            as u8;
        if self.peek_kind()? == Kind::Code {
            self.next()?;
            let code = self.expect(&[Kind::Word])?;
            self.lookahead(LA_ICMPCODE)?;
            let c = decimal_in(&code.text, 0, 255).ok_or_else(|| {
                Self::value(code.pos, format!("ICMP code \"{}\" is invalid", code.text))
            })? as u8;
            Ok(IcmpTarget::TypeCode(t, c))
        } else {
            Ok(IcmpTarget::Type(t))
        }
    }

    fn parse_types(&mut self) -> Result<Vec<IcmpTarget>, RuleError> {
        let tok = self.expect(&[Kind::Type, Kind::LParen])?;
        if tok.kind == Kind::Type {
            return Ok(vec![self.icmp_type(true)?]);
        }
        self.expect(&[Kind::Type])?;
        let first = self.icmp_type(true)?;
        if first == IcmpTarget::All {
            self.expect(&[Kind::RParen])?;
            return Ok(vec![first]);
        }
        let mut list = vec![first];
        loop {
            match self.expect(&[Kind::RParen, Kind::And])?.kind {
                Kind::And => {
                    self.expect(&[Kind::Type])?;
                    list.push(self.icmp_type(false)?);
                }
                _ => return Ok(list),
            }
        }
    }
}

/// Upstream's `validatePortNumber`: digits only, 1..65535.
fn port_value(text: &str, pos: usize) -> Result<u16, RuleError> {
    decimal_in(text, 1, 65535)
        .map(|v| v as u16)
        .ok_or_else(|| RuleError::Value {
            pos,
            message: format!("Port number \"{text}\" is invalid"),
        })
}

/// Upstream's `validateRangeOrder`.
fn range(start: u16, end: u16, pos: usize) -> Result<PortTarget, RuleError> {
    if end < start {
        return Err(RuleError::Value {
            pos,
            message: format!(
                "The end of the range ({end}) cannot be less than the start ({start})"
            ),
        });
    }
    Ok(PortTarget::Range { start, end })
}

/// Upstream's `createMaybePortRange`: a WORD that is a number or `a-b` (split on every `-`).
fn maybe_range(word: &str, pos: usize) -> Result<PortTarget, RuleError> {
    let parts: Vec<&str> = word.split('-').collect();
    match parts.as_slice() {
        [one] => port_value(one, pos).map(PortTarget::Port),
        [a, b] => {
            let start = port_value(a, pos)?;
            let end = port_value(b, pos)?;
            range(start, end, pos)
        }
        _ => Err(RuleError::Value {
            pos,
            message: format!("\"{word}\" is not a valid port number or range"),
        }),
    }
}
