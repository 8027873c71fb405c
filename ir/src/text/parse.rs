//! The parser: a hand-written lexer and a recursive-descent parser over the
//! grammar in the [`crate::text`] module docs.
//!
//! It checks syntax and names only: values are defined before use (SSA),
//! names are not redefined, ops and attributes exist and have the right
//! kind. Types are taken as written and nodes are added with
//! `Graph::add_unchecked`, so that the verifier reports every type error of
//! a file at once, each with the node's line. The first syntax error stops
//! the parse; it carries the line and column and says what was expected and
//! what was found.

use super::is_reserved_word;
use crate::attr::AttrValue;
use crate::graph::{Graph, ValueId};
use crate::ops::{Op, OpError};
use crate::tensor::Tensor;
use crate::types::TensorType;
use crate::{DType, Dim};
use std::collections::HashMap;

/// The largest tensor literal the parser builds (a splat could otherwise
/// ask for any amount of memory).
const MAX_LITERAL_ELEMENTS: usize = 1 << 26;

/// A parse error at a 1-based line and column (columns count characters).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{line}:{col}: {kind}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub kind: ParseErrorKind,
}

/// What went wrong in a parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("expected {expected}, found {found}")]
    Expected { expected: String, found: String },
    #[error("unexpected character `{0}`")]
    BadChar(char),
    #[error("unterminated string")]
    UnterminatedString,
    #[error("bad escape `\\{0}` in string")]
    BadEscape(String),
    #[error("bad number `{text}`: {why}")]
    BadNumber { text: String, why: String },
    #[error("{0}")]
    BadDim(String),
    #[error("use of undefined value `%{0}`")]
    Undefined(String),
    #[error("value `%{name}` is already defined at line {line}")]
    Redefined { name: String, line: usize },
    #[error("{0}")]
    Op(OpError),
    #[error("attribute `{0}` is given twice")]
    DuplicateAttr(String),
    #[error("{results} result(s) but {types} type(s)")]
    ResultTypes { results: usize, types: usize },
    #[error("symbol `{0}` is declared twice")]
    DuplicateSymbol(String),
    #[error("`{0}` cannot name a symbol (symbols are [A-Za-z_][A-Za-z0-9_]* and not a dtype, `true`, `false`, `inf`, `nan` or `dense`)")]
    BadSymbolName(String),
    #[error("output `{0}` is returned twice")]
    DuplicateOutput(String),
    #[error("return gives outputs ({found}) but the signature declares ({expected})")]
    OutputMismatch { expected: String, found: String },
    #[error("tensor literal: {0}")]
    BadLiteral(String),
    #[error("unsupported text format version `{0}` (this parser reads version 1)")]
    Version(String),
}

/// Parses one function in the text format into a graph. The caller runs
/// [`crate::verify::verify`] on the result: the parser does not check types.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    check_version(src)?;
    let mut p = Parser {
        lx: Lexer { src, pos: Pos { byte: 0, line: 1, col: 1 } },
        peeked: None,
        values: HashMap::new(),
        dims: HashMap::new(),
    };
    p.file()
}

/// The optional `# smelt-ir N` header must name a version we read.
fn check_version(src: &str) -> Result<(), ParseError> {
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let Some(c) = t.strip_prefix('#') else { break };
        if let Some(v) = c.trim().strip_prefix("smelt-ir ") {
            if v.trim() != "1" {
                return Err(ParseError { line: i + 1, col: 1, kind: ParseErrorKind::Version(v.trim().to_string()) });
            }
        }
    }
    Ok(())
}

// ----- lexer -----

#[derive(Clone, Copy, Debug, PartialEq)]
struct Pos {
    byte: usize,
    line: usize,
    col: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// `[A-Za-z_][A-Za-z0-9_.]*`: keywords, op names, dtypes, attribute names, symbols, output names.
    Ident(String),
    /// `%name` or `%"name"`.
    Value(String),
    /// `@name` or `@"name"`: the function name and node labels.
    At(String),
    Str(String),
    /// `-?[0-9]+(.[0-9]+)?([eE][+-]?[0-9]+)?`, kept as text until its type is known.
    Num(String),
    Punct(char),
    Arrow,
    Eof,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    at: Pos,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Value(s) => format!("`%{s}`"),
        Tok::At(s) => format!("`@{s}`"),
        Tok::Str(s) if s.chars().count() > 30 => format!("string \"{}...\"", s.chars().take(30).collect::<String>()),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Num(s) => format!("`{s}`"),
        Tok::Punct(c) => format!("`{c}`"),
        Tok::Arrow => "`->`".to_string(),
        Tok::Eof => "end of input".to_string(),
    }
}

#[derive(Clone)]
struct Lexer<'a> {
    src: &'a str,
    pos: Pos,
}

impl Lexer<'_> {
    fn err(&self, at: Pos, kind: ParseErrorKind) -> ParseError {
        ParseError { line: at.line, col: at.col, kind }
    }

    fn peek_char(&self) -> Option<char> {
        self.src[self.pos.byte..].chars().next()
    }

    fn peek_byte(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos.byte).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek_char()?;
        self.pos.byte += c.len_utf8();
        if c == '\n' {
            self.pos.line += 1;
            self.pos.col = 1;
        } else {
            self.pos.col += 1;
        }
        Some(c)
    }

    fn rest(&self) -> &str {
        &self.src[self.pos.byte..]
    }

    fn skip_trivia(&mut self) {
        while let Some(c) = self.peek_char() {
            if c.is_whitespace() {
                self.bump();
            } else if c == '#' {
                while !matches!(self.peek_char(), None | Some('\n')) {
                    self.bump();
                }
            } else {
                break;
            }
        }
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> String {
        let start = self.pos.byte;
        while self.peek_byte().is_some_and(&f) {
            self.bump();
        }
        self.src[start..self.pos.byte].to_string()
    }

    fn next(&mut self) -> Result<Token, ParseError> {
        self.skip_trivia();
        let at = self.pos;
        let Some(c) = self.peek_char() else {
            return Ok(Token { tok: Tok::Eof, at });
        };
        let tok = match c {
            'a'..='z' | 'A'..='Z' | '_' => Tok::Ident(self.take_while(super::is_name_byte)),
            '0'..='9' => Tok::Num(self.number()?),
            '-' if self.rest()[1..].starts_with(|c: char| c.is_ascii_digit()) => Tok::Num(self.number()?),
            '-' if self.rest()[1..].starts_with('>') => {
                self.bump();
                self.bump();
                Tok::Arrow
            }
            '"' => Tok::Str(self.string()?),
            '%' | '@' => {
                self.bump();
                let name = if self.peek_char() == Some('"') {
                    self.string()?
                } else {
                    let n = self.take_while(super::is_name_byte);
                    if n.is_empty() {
                        let found = self.peek_char().map(|c| format!("`{c}`")).unwrap_or("end of input".into());
                        return Err(self.err(
                            self.pos,
                            ParseErrorKind::Expected { expected: format!("a name after `{c}`"), found },
                        ));
                    }
                    n
                };
                if c == '%' {
                    Tok::Value(name)
                } else {
                    Tok::At(name)
                }
            }
            '(' | ')' | '[' | ']' | '{' | '}' | ',' | ':' | '=' | '<' | '>' | '-' => {
                self.bump();
                Tok::Punct(c)
            }
            c => return Err(self.err(at, ParseErrorKind::BadChar(c))),
        };
        Ok(Token { tok, at })
    }

    fn number(&mut self) -> Result<String, ParseError> {
        let start = self.pos.byte;
        let at = self.pos;
        if self.peek_byte() == Some(b'-') {
            self.bump();
        }
        self.take_while(|b| b.is_ascii_digit());
        let bytes = self.src.as_bytes();
        if self.peek_byte() == Some(b'.') && bytes.get(self.pos.byte + 1).is_some_and(|b| b.is_ascii_digit()) {
            self.bump();
            self.take_while(|b| b.is_ascii_digit());
        }
        if matches!(self.peek_byte(), Some(b'e' | b'E')) {
            let mut k = self.pos.byte + 1;
            if matches!(bytes.get(k), Some(b'+' | b'-')) {
                k += 1;
            }
            if bytes.get(k).is_some_and(|b| b.is_ascii_digit()) {
                while self.pos.byte < k {
                    self.bump();
                }
                self.take_while(|b| b.is_ascii_digit());
            }
        }
        // A number running straight into a name (`12abc`) is a typo, not two tokens.
        if self.peek_byte().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'.') {
            let text = format!("{}{}", &self.src[start..self.pos.byte], self.take_while(super::is_name_byte));
            return Err(self.err(at, ParseErrorKind::BadNumber { text, why: "letters follow the digits".into() }));
        }
        Ok(self.src[start..self.pos.byte].to_string())
    }

    fn string(&mut self) -> Result<String, ParseError> {
        let at = self.pos;
        self.bump();
        let mut s = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => return Err(self.err(at, ParseErrorKind::UnterminatedString)),
                Some('"') => return Ok(s),
                Some('\\') => {
                    let esc_at = self.pos;
                    match self.bump() {
                        Some('"') => s.push('"'),
                        Some('\\') => s.push('\\'),
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some('r') => s.push('\r'),
                        Some('u') if self.peek_char() == Some('{') => {
                            self.bump();
                            let hex = self.take_while(|b| b.is_ascii_hexdigit());
                            let ok = self.peek_char() == Some('}');
                            let c = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32);
                            match (ok, c) {
                                (true, Some(c)) => {
                                    self.bump();
                                    s.push(c);
                                }
                                _ => return Err(self.err(esc_at, ParseErrorKind::BadEscape(format!("u{{{hex}")))),
                            }
                        }
                        Some(c) => return Err(self.err(esc_at, ParseErrorKind::BadEscape(c.to_string()))),
                        None => return Err(self.err(at, ParseErrorKind::UnterminatedString)),
                    }
                }
                Some(c) => s.push(c),
            }
        }
    }
}

// ----- parser -----

struct Parser<'a> {
    lx: Lexer<'a>,
    peeked: Option<Token>,
    /// Every defined value by name, with the line that defined it.
    values: HashMap<String, (ValueId, usize)>,
    /// Dims already parsed, by spelling.
    dims: HashMap<String, Dim>,
}

type R<T> = Result<T, ParseError>;

/// Whether a dim element may contain this byte (dims are scanned as raw
/// text and handed to `Dim`'s parser, because `past + seq` has spaces).
fn is_dim_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'*' | b'/' | b'(' | b')' | b' ' | b'\t')
}

/// Dims (and shapes) whose coefficients could exceed this are refused.
const MAX_MAGNITUDE: f64 = (1u64 << 60) as f64;

/// An upper bound on every coefficient `Dim`'s parser can produce from this
/// text: the product of the integer literals' magnitudes (at least 1 each),
/// doubled for every `+` or `-`. Sums at most double the larger bound and
/// products multiply them, so no intermediate value can exceed it.
fn magnitude(text: &str) -> f64 {
    let mut bound = 1.0f64;
    for part in text.split(|c: char| !c.is_ascii_digit()) {
        if let Ok(n) = part.parse::<f64>() {
            bound *= n.max(1.0);
        }
    }
    let signs = text.bytes().filter(|b| matches!(b, b'+' | b'-')).count();
    bound * 2f64.powi(signs.min(1000) as i32)
}

fn is_symbol_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        && !is_reserved_word(s)
}

impl Parser<'_> {
    fn err(&self, at: Pos, kind: ParseErrorKind) -> ParseError {
        self.lx.err(at, kind)
    }

    fn peek(&mut self) -> R<&Token> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lx.next()?);
        }
        Ok(self.peeked.as_ref().expect("just filled"))
    }

    fn next(&mut self) -> R<Token> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lx.next(),
        }
    }

    /// The first character after the peeked token (skipping trivia), for
    /// the one place the grammar needs two tokens of lookahead.
    fn char_after_peeked(&self) -> Option<char> {
        let mut lx = self.lx.clone();
        lx.skip_trivia();
        lx.peek_char()
    }

    /// Drops a peeked token so the lexer can scan raw text from its start.
    fn unpeek(&mut self) {
        if let Some(t) = self.peeked.take() {
            self.lx.pos = t.at;
        }
    }

    fn expected<T>(&self, t: &Token, expected: &str) -> R<T> {
        Err(self.err(t.at, ParseErrorKind::Expected { expected: expected.to_string(), found: describe(&t.tok) }))
    }

    fn is_punct(&mut self, c: char) -> R<bool> {
        Ok(self.peek()?.tok == Tok::Punct(c))
    }

    fn eat_punct(&mut self, c: char) -> R<bool> {
        let yes = self.is_punct(c)?;
        if yes {
            self.next()?;
        }
        Ok(yes)
    }

    fn expect_punct(&mut self, c: char, expected: &str) -> R<Pos> {
        let t = self.next()?;
        if t.tok != Tok::Punct(c) {
            return self.expected(&t, expected);
        }
        Ok(t.at)
    }

    fn expect_keyword(&mut self, kw: &str) -> R<Pos> {
        let t = self.next()?;
        match &t.tok {
            Tok::Ident(s) if s == kw => Ok(t.at),
            _ => self.expected(&t, &format!("`{kw}`")),
        }
    }

    fn is_keyword(&mut self, kw: &str) -> R<bool> {
        Ok(matches!(&self.peek()?.tok, Tok::Ident(s) if s == kw))
    }

    fn file(&mut self) -> R<Graph> {
        let mut symbols: Vec<(String, i64, i64)> = Vec::new();
        while self.is_keyword("sym")? {
            self.next()?;
            let t = self.next()?;
            let name = match t.tok {
                Tok::Ident(s) if is_symbol_name(&s) => s,
                Tok::Ident(s) => return Err(self.err(t.at, ParseErrorKind::BadSymbolName(s))),
                _ => return self.expected(&t, "a symbol name"),
            };
            if symbols.iter().any(|(n, _, _)| *n == name) {
                return Err(self.err(t.at, ParseErrorKind::DuplicateSymbol(name)));
            }
            self.expect_keyword("in")?;
            self.expect_punct('[', "`[` starting the symbol's bounds")?;
            let min = self.int("the symbol's minimum")?;
            self.expect_punct(',', "`,` between the bounds")?;
            let max = self.int("the symbol's maximum")?;
            self.expect_punct(']', "`]` closing the bounds")?;
            symbols.push((name, min, max));
        }

        let t = self.next()?;
        if t.tok != Tok::Ident("func".into()) {
            return self.expected(&t, if symbols.is_empty() { "`sym` or `func`" } else { "`func`" });
        }
        let t = self.next()?;
        let Tok::At(name) = t.tok else {
            return self.expected(&t, "the function name (`@name`)");
        };
        let mut g = Graph::new(&name);
        for (n, lo, hi) in &symbols {
            g.declare_symbol(n, *lo, *hi);
        }

        // Parameters: the graph inputs, in order.
        self.expect_punct('(', "`(` starting the parameters")?;
        while !self.eat_punct(')')? {
            let t = self.next()?;
            let Tok::Value(pname) = t.tok else {
                return self.expected(&t, "a parameter (`%name: type`) or `)`");
            };
            self.expect_punct(':', "`:` and the parameter's type")?;
            let ty = self.ty()?;
            let label = self.label()?;
            let v = g.add_unchecked(Op::Input { name: pname.clone() }, &[], vec![ty], Some(t.at.line))[0];
            if let Some(l) = label {
                g.set_label(g.value(v).def, &l);
            }
            self.define(&pname, v, t.at)?;
            if !self.is_punct(')')? {
                self.expect_punct(',', "`,` or `)` after a parameter")?;
            }
        }

        // The declared output names are optional; when present, `return` must match them.
        let mut declared: Option<Vec<String>> = None;
        if self.peek()?.tok == Tok::Arrow {
            self.next()?;
            self.expect_punct('(', "`(` starting the output names")?;
            let mut names = Vec::new();
            while !self.eat_punct(')')? {
                names.push(self.name("an output name or `)`")?.0);
                if !self.is_punct(')')? {
                    self.expect_punct(',', "`,` or `)` after an output name")?;
                }
            }
            declared = Some(names);
        }
        self.expect_punct('{', "`{` starting the body")?;

        loop {
            let t = self.peek()?.clone();
            match &t.tok {
                Tok::Ident(s) if s == "return" => break,
                Tok::Value(_) | Tok::Punct('(') => self.node(&mut g)?,
                _ => return self.expected(&t, "a node (`%name = op ...`) or `return`"),
            }
        }

        let ret = self.next()?;
        let mut outs: Vec<String> = Vec::new();
        while matches!(self.peek()?.tok, Tok::Ident(_) | Tok::Str(_)) {
            let (oname, at) = self.name("an output name")?;
            self.expect_punct('=', "`=` after the output name")?;
            let v = self.value_ref()?;
            if outs.contains(&oname) {
                return Err(self.err(at, ParseErrorKind::DuplicateOutput(oname)));
            }
            g.set_output(&oname, v);
            outs.push(oname);
            if !self.eat_punct(',')? {
                break;
            }
        }
        if let Some(d) = declared {
            if d != outs {
                return Err(
                    self.err(ret.at, ParseErrorKind::OutputMismatch { expected: d.join(", "), found: outs.join(", ") })
                );
            }
        }
        self.expect_punct('}', "`}` closing the body")?;
        let t = self.next()?;
        if t.tok != Tok::Eof {
            return self.expected(&t, "end of input (one function per file)");
        }
        Ok(g)
    }

    /// `%a, %b = op %x, %y attr=value ... : type, type @"label"`
    fn node(&mut self, g: &mut Graph) -> R<()> {
        let start = self.peek()?.at;
        let mut results: Vec<(String, Pos)> = Vec::new();
        if self.eat_punct('(')? {
            self.expect_punct(')', "`)` (a node without results is written `() = op ...`)")?;
        } else {
            loop {
                let t = self.next()?;
                match t.tok {
                    Tok::Value(n) => results.push((n, t.at)),
                    _ => return self.expected(&t, "a result name (`%name`)"),
                }
                if !self.eat_punct(',')? {
                    break;
                }
            }
        }
        self.expect_punct('=', "`=` after the results")?;
        let t = self.next()?;
        let (opname, op_at) = match t.tok {
            Tok::Ident(s) => (s, t.at),
            _ => return self.expected(&t, "an op name"),
        };

        let mut operands = Vec::new();
        if matches!(self.peek()?.tok, Tok::Value(_)) {
            loop {
                operands.push(self.value_ref()?);
                if !self.eat_punct(',')? {
                    break;
                }
            }
        }

        let mut attrs: Vec<(String, AttrValue)> = Vec::new();
        let mut attr_at: Vec<(String, Pos)> = Vec::new();
        // An identifier starts an attribute only when `=` follows, so that a
        // missing `:` is reported as such rather than as a bad attribute.
        while let Tok::Ident(k) = &self.peek()?.tok {
            let k = k.clone();
            if self.char_after_peeked() != Some('=') {
                break;
            }
            let at = self.next()?.at;
            self.expect_punct('=', &format!("`=` after attribute name `{k}`"))?;
            let v = self.attr_value()?;
            if attrs.iter().any(|(n, _)| *n == k) {
                return Err(self.err(at, ParseErrorKind::DuplicateAttr(k)));
            }
            attr_at.push((k.clone(), at));
            attrs.push((k, v));
        }

        let t = self.peek()?.clone();
        if t.tok != Tok::Punct(':') {
            let what = if operands.is_empty() && attrs.is_empty() {
                "operands, attributes or `:` and the result types"
            } else if attrs.is_empty() {
                "`,` and another operand, an attribute (`name=value`) or `:` and the result types"
            } else {
                "another attribute (`name=value`) or `:` and the result types"
            };
            return self.expected(&t, what);
        }
        self.next()?;
        let types_at = self.peek()?.at;
        let mut types = Vec::new();
        if self.eat_punct('(')? {
            self.expect_punct(')', "`)` (no result types are written `()`)")?;
        } else {
            loop {
                types.push(self.ty()?);
                if !self.eat_punct(',')? {
                    break;
                }
            }
        }
        let label = self.label()?;

        if types.len() != results.len() {
            return Err(self.err(types_at, ParseErrorKind::ResultTypes { results: results.len(), types: types.len() }));
        }
        let op = Op::from_parts(&opname, attrs).map_err(|e| {
            let at = match &e {
                OpError::BadAttr { attr, .. } | OpError::UnknownAttr { attr, .. } => {
                    attr_at.iter().find(|(k, _)| k == attr).map(|(_, p)| *p).unwrap_or(op_at)
                }
                OpError::UnknownOp(_) => op_at,
            };
            self.err(at, ParseErrorKind::Op(e))
        })?;
        let outs = g.add_unchecked(op, &operands, types, Some(start.line));
        if let Some(l) = label {
            match outs.first() {
                Some(v) => g.set_label(g.value(*v).def, &l),
                None => {
                    if let Some(n) = g.node_ids().last() {
                        g.set_label(*n, &l);
                    }
                }
            }
        }
        for ((name, at), v) in results.into_iter().zip(outs) {
            self.define(&name, v, at)?;
        }
        Ok(())
    }

    fn define(&mut self, name: &str, v: ValueId, at: Pos) -> R<()> {
        if let Some((_, line)) = self.values.get(name) {
            return Err(self.err(at, ParseErrorKind::Redefined { name: name.to_string(), line: *line }));
        }
        self.values.insert(name.to_string(), (v, at.line));
        Ok(())
    }

    fn value_ref(&mut self) -> R<ValueId> {
        let t = self.next()?;
        let Tok::Value(n) = &t.tok else {
            return self.expected(&t, "a value (`%name`)");
        };
        match self.values.get(n) {
            Some((v, _)) => Ok(*v),
            None => Err(self.err(t.at, ParseErrorKind::Undefined(n.clone()))),
        }
    }

    /// An output name: a bare identifier or a string.
    fn name(&mut self, expected: &str) -> R<(String, Pos)> {
        let t = self.next()?;
        match t.tok {
            Tok::Ident(s) | Tok::Str(s) => Ok((s, t.at)),
            _ => self.expected(&t, expected),
        }
    }

    fn label(&mut self) -> R<Option<String>> {
        if let Tok::At(_) = self.peek()?.tok {
            if let Tok::At(l) = self.next()?.tok {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    fn int(&mut self, what: &str) -> R<i64> {
        let t = self.next()?;
        match &t.tok {
            Tok::Num(s) => s.parse::<i64>().map_err(|e| {
                self.err(
                    t.at,
                    ParseErrorKind::BadNumber { text: s.clone(), why: format!("{what} must be an integer ({e})") },
                )
            }),
            _ => self.expected(&t, &format!("an integer ({what})")),
        }
    }

    /// `f32[batch, past + seq, 64]`
    fn ty(&mut self) -> R<TensorType> {
        let t = self.next()?;
        let dtype = match &t.tok {
            Tok::Ident(s) => match s.parse::<DType>() {
                Ok(d) => d,
                Err(e) => {
                    return Err(self.err(
                        t.at,
                        ParseErrorKind::Expected {
                            expected: "a dtype (f32, f16, bf16, f64, i64, i32, i8, u8, bool)".into(),
                            found: format!("`{}`", e.0),
                        },
                    ))
                }
            },
            _ => return self.expected(&t, "a type (`f32[dims]`)"),
        };
        let dims = self.dim_list()?;
        let mut shape = Vec::with_capacity(dims.len());
        for (text, at) in &dims {
            shape.push(self.dim(text, *at)?);
        }
        // Inference multiplies a type's dims together (reshape, element
        // counts), so the whole shape must stay far from i64 overflow too.
        let total: f64 = dims.iter().map(|(t, _)| magnitude(t)).product();
        if total > MAX_MAGNITUDE {
            let at = dims.first().map_or(t.at, |d| d.1);
            return Err(self.err(at, ParseErrorKind::BadDim("the shape's dims are too large".into())));
        }
        Ok(TensorType::new(dtype, shape))
    }

    /// Parses a dim, remembering each spelling: a model repeats a handful of
    /// shapes thousands of times, and `Dim`'s parser canonicalises as it goes.
    fn dim(&mut self, text: &str, at: Pos) -> R<Dim> {
        if let Some(d) = self.dims.get(text) {
            return Ok(d.clone());
        }
        // `Dim`'s arithmetic does not check for overflow, so text whose
        // coefficients could leave i64 is refused before it is parsed.
        if text.parse::<i64>().is_err() && magnitude(text) > MAX_MAGNITUDE {
            return Err(self.err(at, ParseErrorKind::BadDim(format!("dim `{text}` is too large"))));
        }
        let d = text.parse::<Dim>().map_err(|e| self.err(at, ParseErrorKind::BadDim(e.to_string())))?;
        self.dims.insert(text.to_string(), d.clone());
        Ok(d)
    }

    /// `[elem, elem]` with each element scanned as raw dim text.
    fn dim_list(&mut self) -> R<Vec<(String, Pos)>> {
        self.expect_punct('[', "`[` starting a dim list")?;
        self.unpeek();
        let mut out = Vec::new();
        self.lx.skip_trivia();
        if self.lx.peek_byte() == Some(b']') {
            self.lx.bump();
            return Ok(out);
        }
        loop {
            self.lx.skip_trivia();
            let at = self.lx.pos;
            let text = self.lx.take_while(is_dim_byte);
            let text = text.trim();
            self.lx.skip_trivia();
            let sep = self.lx.peek_char();
            if text.is_empty() {
                let t = self.lx.next()?;
                return self.expected(&t, "a dim (an integer, a symbol or an expression like `past + seq`)");
            }
            out.push((text.to_string(), at));
            match sep {
                Some(',') => {
                    self.lx.bump();
                }
                Some(']') => {
                    self.lx.bump();
                    return Ok(out);
                }
                _ => {
                    let t = self.lx.next()?;
                    return self.expected(&t, "`,` or `]` in a dim list");
                }
            }
        }
    }

    fn attr_value(&mut self) -> R<AttrValue> {
        let t = self.peek()?.clone();
        match &t.tok {
            Tok::Punct('[') => {
                let elems = self.dim_list()?;
                let ints: Option<Vec<i64>> = elems.iter().map(|(s, _)| s.parse::<i64>().ok()).collect();
                match ints {
                    Some(v) => Ok(AttrValue::Ints(v)),
                    None => {
                        let mut dims = Vec::with_capacity(elems.len());
                        for (s, at) in elems {
                            dims.push(self.dim(&s, at)?);
                        }
                        Ok(AttrValue::Dims(dims))
                    }
                }
            }
            Tok::Punct('(') => {
                // A parenthesised dim expression; scanned raw up to the matching `)`.
                self.unpeek();
                let at = self.lx.pos;
                let start = at.byte;
                let mut depth = 0i32;
                while let Some(b) = self.lx.peek_byte() {
                    if !is_dim_byte(b) {
                        break;
                    }
                    self.lx.bump();
                    match b {
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                if depth != 0 {
                    let t = self.lx.next()?;
                    return self.expected(&t, "`)` closing the dim expression");
                }
                let text = self.lx.src[start..self.lx.pos.byte].to_string();
                Ok(AttrValue::Dim(self.dim(&text, at)?))
            }
            Tok::Str(s) => {
                let s = s.clone();
                self.next()?;
                Ok(AttrValue::Str(s))
            }
            Tok::Num(s) => {
                let s = s.clone();
                self.next()?;
                if s.contains(['.', 'e', 'E']) {
                    Ok(AttrValue::Float(self.f64_text(&s, t.at)?))
                } else {
                    s.parse::<i64>()
                        .map(AttrValue::Int)
                        .map_err(|e| self.err(t.at, ParseErrorKind::BadNumber { text: s.clone(), why: e.to_string() }))
                }
            }
            Tok::Punct('-') | Tok::Ident(_) if self.special_float_ahead()? => {
                let (s, at) = self.scalar()?;
                Ok(AttrValue::Float(self.f64_text(&s, at)?))
            }
            Tok::Ident(s) => {
                let s = s.clone();
                self.next()?;
                match s.as_str() {
                    "true" => Ok(AttrValue::Bool(true)),
                    "false" => Ok(AttrValue::Bool(false)),
                    "dense" => Ok(AttrValue::Tensor(self.tensor_literal(t.at)?)),
                    _ => {
                        if let Ok(d) = s.parse::<DType>() {
                            Ok(AttrValue::DType(d))
                        } else if is_symbol_name(&s) {
                            Ok(AttrValue::Dim(Dim::sym(&s)))
                        } else {
                            self.expected(&t, "an attribute value")
                        }
                    }
                }
            }
            _ => self.expected(&t, "an attribute value"),
        }
    }

    /// Whether the next token starts `inf`, `-inf` or `nan`.
    fn special_float_ahead(&mut self) -> R<bool> {
        match &self.peek()?.tok {
            Tok::Ident(s) => Ok(s == "inf" || s == "nan"),
            Tok::Punct('-') => {
                let at = self.peek()?.at;
                Ok(self.lx.src[at.byte + 1..].starts_with("inf"))
            }
            _ => Ok(false),
        }
    }

    /// One literal element as text: a number, `true`, `false`, `inf`,
    /// `-inf`, `nan` or `nan:0x<bits>`; converted once the dtype is known.
    fn scalar(&mut self) -> R<(String, Pos)> {
        let t = self.next()?;
        match &t.tok {
            Tok::Num(s) => Ok((s.clone(), t.at)),
            Tok::Punct('-') => {
                let u = self.next()?;
                match &u.tok {
                    Tok::Ident(s) if s == "inf" && u.at.byte == t.at.byte + 1 => Ok(("-inf".into(), t.at)),
                    _ => self.expected(&u, "`inf` after `-`"),
                }
            }
            Tok::Ident(s) if s == "nan" => {
                // `nan:0x7fc00001` spells a NaN's bits; the `:` must follow directly.
                if self.peeked.is_none() && self.lx.rest().starts_with(":0x") {
                    self.lx.bump();
                    self.lx.bump();
                    self.lx.bump();
                    let hex = self.lx.take_while(|b| b.is_ascii_hexdigit());
                    return Ok((format!("nan:0x{hex}"), t.at));
                }
                Ok(("nan".into(), t.at))
            }
            Tok::Ident(s) if matches!(s.as_str(), "inf" | "true" | "false") => Ok((s.clone(), t.at)),
            _ => self.expected(&t, "a literal element (a number, `inf`, `nan`, `true` or `false`)"),
        }
    }

    fn bad_number(&self, text: &str, at: Pos, why: &str) -> ParseError {
        self.err(at, ParseErrorKind::BadNumber { text: text.to_string(), why: why.to_string() })
    }

    fn f64_text(&self, s: &str, at: Pos) -> R<f64> {
        match s {
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            "nan" => Ok(f64::NAN),
            _ if s.starts_with("nan:0x") => {
                let bits = u64::from_str_radix(&s[6..], 16)
                    .map_err(|_| self.bad_number(s, at, "expected 16 hex digits of NaN bits"))?;
                let x = f64::from_bits(bits);
                if !x.is_nan() || s.len() != 6 + 16 {
                    return Err(self.bad_number(s, at, "expected 16 hex digits of NaN bits"));
                }
                Ok(x)
            }
            "true" | "false" => Err(self.bad_number(s, at, "expected a number")),
            _ => s.parse::<f64>().map_err(|e| self.bad_number(s, at, &e.to_string())),
        }
    }

    fn f32_text(&self, s: &str, at: Pos) -> R<f32> {
        match s {
            "inf" => Ok(f32::INFINITY),
            "-inf" => Ok(f32::NEG_INFINITY),
            "nan" => Ok(f32::NAN),
            _ if s.starts_with("nan:0x") => {
                let bits = u32::from_str_radix(&s[6..], 16)
                    .map_err(|_| self.bad_number(s, at, "expected 8 hex digits of NaN bits"))?;
                let x = f32::from_bits(bits);
                if !x.is_nan() || s.len() != 6 + 8 {
                    return Err(self.bad_number(s, at, "expected 8 hex digits of NaN bits"));
                }
                Ok(x)
            }
            "true" | "false" => Err(self.bad_number(s, at, "expected a number")),
            // Parsing straight to f32 rounds once; going through f64 could round twice.
            _ => s.parse::<f32>().map_err(|e| self.bad_number(s, at, &e.to_string())),
        }
    }

    /// `dense<[e, e, ...] : dtype[shape]>` or the splat `dense<e : dtype[shape]>`
    /// (`dense`, written at `at`, already consumed).
    fn tensor_literal(&mut self, at: Pos) -> R<Tensor> {
        self.expect_punct('<', "`<` after `dense`")?;
        let mut elems = Vec::new();
        let splat = if self.eat_punct('[')? {
            while !self.eat_punct(']')? {
                elems.push(self.scalar()?);
                if !self.is_punct(']')? {
                    self.expect_punct(',', "`,` or `]` in a literal")?;
                }
            }
            false
        } else {
            elems.push(self.scalar()?);
            true
        };
        self.expect_punct(':', "`:` and the literal's type")?;
        let ty = self.ty()?;
        self.expect_punct('>', "`>` closing the literal")?;

        let bad = |p: &Self, why: String| Err(p.err(at, ParseErrorKind::BadLiteral(why)));
        let Some(shape) = ty.const_shape() else {
            return bad(self, format!("the shape must be constant, found {ty}"));
        };
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let n = match n {
            Some(n) if n <= MAX_LITERAL_ELEMENTS => n,
            _ => return bad(self, format!("{ty} is too large for a literal")),
        };
        if !splat && elems.len() != n {
            return bad(self, format!("{} elements do not fill {ty} ({n} elements)", elems.len()));
        }
        let dtype = ty.dtype;
        let tensor = match dtype {
            DType::F32 | DType::F16 | DType::BF16 => {
                let mut v = Vec::with_capacity(elems.len());
                for (s, at) in &elems {
                    v.push(self.f32_text(s, *at)?);
                }
                let v = if splat { vec![v[0]; n] } else { v };
                Tensor::from_f32(dtype, shape, v)
            }
            DType::F64 => {
                let mut v = Vec::with_capacity(elems.len());
                for (s, at) in &elems {
                    v.push(self.f64_text(s, *at)?);
                }
                let v = if splat { vec![v[0]; n] } else { v };
                Tensor::from_f64(dtype, shape, v)
            }
            DType::Bool => {
                let mut v = Vec::with_capacity(elems.len());
                for (s, at) in &elems {
                    v.push(match s.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(self.bad_number(s, *at, "a bool literal is `true` or `false`")),
                    });
                }
                let v = if splat { vec![v[0]; n] } else { v };
                Tensor::from_bool(shape, v)
            }
            DType::I64 | DType::I32 | DType::I8 | DType::U8 => {
                let (lo, hi) = match dtype {
                    DType::I32 => (i32::MIN as i64, i32::MAX as i64),
                    DType::I8 => (i8::MIN as i64, i8::MAX as i64),
                    DType::U8 => (0, u8::MAX as i64),
                    _ => (i64::MIN, i64::MAX),
                };
                let mut v = Vec::with_capacity(elems.len());
                for (s, at) in &elems {
                    let x = s
                        .parse::<i64>()
                        .map_err(|e| self.bad_number(s, *at, &format!("expected an {dtype} integer ({e})")))?;
                    if x < lo || x > hi {
                        return Err(self.bad_number(s, *at, &format!("out of range for {dtype}")));
                    }
                    v.push(x);
                }
                let v = if splat { vec![v[0]; n] } else { v };
                Tensor::from_i64(dtype, shape, v)
            }
        };
        tensor.or_else(|e| bad(self, e.to_string()))
    }
}
