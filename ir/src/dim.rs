//! Symbolic dimensions: small integer polynomials over named symbols.
//!
//! A [`Dim`] is a constant (`64`), a symbol (`seq`), or a small integer
//! expression of them (`past + seq`, `2*batch*seq`, `(seq + 1) / 2`). It is kept
//! in a canonical form (a sum of monomials with non-zero integer coefficients,
//! sorted), so two dims are equal exactly when their canonical forms are,
//! which is what shape inference needs to prove `past + seq == seq + past`.
//! Division that is not exact stays as an opaque floor-division atom.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, Mul, Neg, Sub};
use std::str::FromStr;
use std::sync::Arc;

/// An indivisible factor of a monomial.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Atom {
    /// A named symbol such as `batch`, `seq` or `past`.
    Sym(Arc<str>),
    /// `floor(dim / divisor)` where the division is not exact symbolically.
    FloorDiv(Box<Dim>, i64),
}

/// A product of atoms; the empty product is the constant 1.
type Monomial = Vec<Atom>;

/// A symbolic dimension in canonical form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    /// Sorted by monomial, coefficients never zero.
    terms: Vec<(Monomial, i64)>,
}

/// Why a dim could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DimError {
    #[error("symbol `{0}` has no value")]
    Unbound(String),
    #[error("division by zero in dim `{0}`")]
    DivByZero(String),
    #[error("overflow evaluating dim `{0}`")]
    Overflow(String),
    #[error("cannot parse dim `{text}`: {why}")]
    Parse { text: String, why: String },
}

impl Dim {
    /// The constant `n`.
    pub fn c(n: i64) -> Dim {
        Dim::from_terms(vec![(Vec::new(), n)])
    }

    /// The symbol `name`.
    pub fn sym(name: &str) -> Dim {
        Dim::from_terms(vec![(vec![Atom::Sym(Arc::from(name))], 1)])
    }

    fn from_terms(terms: Vec<(Monomial, i64)>) -> Dim {
        let mut acc: BTreeMap<Monomial, i64> = BTreeMap::new();
        for (mut m, c) in terms {
            m.sort();
            let e = acc.entry(m).or_insert(0);
            // Saturating: absurd dims from bad input must not panic; they
            // stay huge and fail the bounds and size checks downstream.
            *e = e.saturating_add(c);
        }
        Dim { terms: acc.into_iter().filter(|(_, c)| *c != 0).collect() }
    }

    /// The value when the dim does not depend on any symbol.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.as_slice() {
            [] => Some(0),
            [(m, c)] if m.is_empty() => Some(*c),
            _ => None,
        }
    }

    /// The symbol's name when the dim is exactly one symbol.
    pub fn as_sym(&self) -> Option<&str> {
        match self.terms.as_slice() {
            [(m, 1)] => match m.as_slice() {
                [Atom::Sym(s)] => Some(s),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn is_const(&self) -> bool {
        self.as_const().is_some()
    }

    /// Every symbol the dim mentions.
    pub fn symbols(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_symbols(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_symbols(&self, out: &mut Vec<String>) {
        for (m, _) in &self.terms {
            for a in m {
                match a {
                    Atom::Sym(s) => out.push(s.to_string()),
                    Atom::FloorDiv(d, _) => d.collect_symbols(out),
                }
            }
        }
    }

    /// `floor(self / k)`; exact when every coefficient is divisible by `k`.
    pub fn floor_div(&self, k: i64) -> Dim {
        if k == 1 {
            return self.clone();
        }
        if let Some(c) = self.as_const() {
            if k != 0 {
                return Dim::c(c.div_euclid(k));
            }
        }
        if k != 0 && self.terms.iter().all(|(_, c)| c % k == 0) {
            return Dim::from_terms(self.terms.iter().map(|(m, c)| (m.clone(), c / k)).collect());
        }
        Dim::from_terms(vec![(vec![Atom::FloorDiv(Box::new(self.clone()), k)], 1)])
    }

    /// `ceil(self / k)` for positive `k`.
    pub fn ceil_div(&self, k: i64) -> Dim {
        (self.clone() + Dim::c(k - 1)).floor_div(k)
    }

    /// Evaluates the dim given values for its symbols.
    pub fn eval(&self, env: &dyn Fn(&str) -> Option<i64>) -> Result<i64, DimError> {
        let overflow = || DimError::Overflow(self.to_string());
        let mut total: i64 = 0;
        for (m, c) in &self.terms {
            let mut v = *c;
            for a in m {
                let x = match a {
                    Atom::Sym(s) => env(s).ok_or_else(|| DimError::Unbound(s.to_string()))?,
                    Atom::FloorDiv(d, k) => {
                        if *k == 0 {
                            return Err(DimError::DivByZero(self.to_string()));
                        }
                        d.eval(env)?.div_euclid(*k)
                    }
                };
                v = v.checked_mul(x).ok_or_else(overflow)?;
            }
            total = total.checked_add(v).ok_or_else(overflow)?;
        }
        Ok(total)
    }

    /// Evaluates with a map of symbol values.
    pub fn eval_map(&self, env: &BTreeMap<String, i64>) -> Result<i64, DimError> {
        self.eval(&|s| env.get(s).copied())
    }

    /// Replaces symbols by dims (used to specialise a graph).
    pub fn substitute(&self, f: &dyn Fn(&str) -> Option<Dim>) -> Dim {
        let mut out = Dim::c(0);
        for (m, c) in &self.terms {
            let mut t = Dim::c(*c);
            for a in m {
                let x = match a {
                    Atom::Sym(s) => f(s).unwrap_or_else(|| Dim::sym(s)),
                    Atom::FloorDiv(d, k) => d.substitute(f).floor_div(*k),
                };
                t = t * x;
            }
            out = out + t;
        }
        out
    }

    /// Product of a list of dims (1 for the empty list).
    pub fn product<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Dim {
        dims.into_iter().fold(Dim::c(1), |a, b| a * b.clone())
    }
}

impl From<i64> for Dim {
    fn from(n: i64) -> Dim {
        Dim::c(n)
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::c(n as i64)
    }
}

impl Add for Dim {
    type Output = Dim;
    fn add(self, rhs: Dim) -> Dim {
        let mut t = self.terms;
        t.extend(rhs.terms);
        Dim::from_terms(t)
    }
}

impl Neg for Dim {
    type Output = Dim;
    fn neg(self) -> Dim {
        Dim::from_terms(self.terms.into_iter().map(|(m, c)| (m, c.saturating_neg())).collect())
    }
}

impl Sub for Dim {
    type Output = Dim;
    fn sub(self, rhs: Dim) -> Dim {
        self + (-rhs)
    }
}

impl Mul for Dim {
    type Output = Dim;
    fn mul(self, rhs: Dim) -> Dim {
        let mut t = Vec::new();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &rhs.terms {
                let mut m = ma.clone();
                m.extend(mb.iter().cloned());
                t.push((m, ca.saturating_mul(*cb)));
            }
        }
        Dim::from_terms(t)
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Sym(s) => f.write_str(s),
            Atom::FloorDiv(d, k) if d.terms.len() > 1 => write!(f, "(({d}) / {k})"),
            Atom::FloorDiv(d, k) => write!(f, "({d} / {k})"),
        }
    }
}

impl fmt::Display for Dim {
    /// Prints symbolic terms first (in canonical order), then the constant:
    /// `past + seq`, `2*batch*seq - 1`, `(seq / 2)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        let mut terms: Vec<&(Monomial, i64)> = self.terms.iter().filter(|(m, _)| !m.is_empty()).collect();
        terms.extend(self.terms.iter().filter(|(m, _)| m.is_empty()));
        for (i, (m, c)) in terms.iter().enumerate() {
            let c = *c;
            let mag = c.abs();
            if i == 0 {
                if c < 0 {
                    f.write_str("-")?;
                }
            } else {
                f.write_str(if c < 0 { " - " } else { " + " })?;
            }
            if m.is_empty() {
                write!(f, "{mag}")?;
                continue;
            }
            if mag != 1 {
                write!(f, "{mag}*")?;
            }
            for (j, a) in m.iter().enumerate() {
                if j > 0 {
                    f.write_str("*")?;
                }
                write!(f, "{a}")?;
            }
        }
        Ok(())
    }
}

/// Parses the spelling [`Dim`]'s `Display` prints: integers, identifiers
/// (`[A-Za-z_][A-Za-z0-9_]*`), `+`, `-`, `*`, `/ integer` (floor division)
/// and parentheses.
impl FromStr for Dim {
    type Err = DimError;
    fn from_str(s: &str) -> Result<Dim, DimError> {
        let mut p = DimParser { s: s.as_bytes(), pos: 0, text: s };
        let d = p.expr()?;
        p.skip_ws();
        if p.pos != p.s.len() {
            return Err(p.err("unexpected trailing characters"));
        }
        Ok(d)
    }
}

struct DimParser<'a> {
    s: &'a [u8],
    pos: usize,
    text: &'a str,
}

impl DimParser<'_> {
    fn err(&self, why: &str) -> DimError {
        DimError::Parse { text: self.text.to_string(), why: format!("{why} at offset {}", self.pos) }
    }
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }
    fn expr(&mut self) -> Result<Dim, DimError> {
        let mut acc = self.term()?;
        while let Some(c @ (b'+' | b'-')) = self.peek() {
            self.pos += 1;
            let t = self.term()?;
            acc = if c == b'+' { acc + t } else { acc - t };
        }
        Ok(acc)
    }
    fn term(&mut self) -> Result<Dim, DimError> {
        let mut acc = self.unary()?;
        loop {
            match self.peek() {
                Some(b'*') => {
                    self.pos += 1;
                    acc = acc * self.unary()?;
                }
                Some(b'/') => {
                    self.pos += 1;
                    let k = self.unary()?;
                    let k = k.as_const().ok_or_else(|| self.err("divisor must be an integer"))?;
                    if k <= 0 {
                        return Err(self.err("divisor must be positive"));
                    }
                    acc = acc.floor_div(k);
                }
                _ => return Ok(acc),
            }
        }
    }
    fn unary(&mut self) -> Result<Dim, DimError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
            return Ok(-self.unary()?);
        }
        self.primary()
    }
    fn primary(&mut self) -> Result<Dim, DimError> {
        match self.peek() {
            Some(b'(') => {
                self.pos += 1;
                let d = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err(self.err("expected `)`"));
                }
                self.pos += 1;
                Ok(d)
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                t.parse::<i64>().map(Dim::c).map_err(|_| self.err("integer out of range"))
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.pos;
                while self.pos < self.s.len() && (self.s[self.pos].is_ascii_alphanumeric() || self.s[self.pos] == b'_')
                {
                    self.pos += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                Ok(Dim::sym(t))
            }
            _ => Err(self.err("expected an integer, a symbol or `(`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dim {
        s.parse().unwrap()
    }

    #[test]
    fn canonical_forms_compare_equal() {
        assert_eq!(d("past + seq"), d("seq + past"));
        assert_eq!(d("seq - seq"), Dim::c(0));
        assert_eq!(d("2*(batch*seq)"), d("batch*seq + seq*batch"));
        assert_eq!(d("(4*seq + 8) / 4"), d("seq + 2"));
    }

    #[test]
    fn display_round_trips() {
        for s in ["past + seq", "2*batch*seq - 1", "(seq + 1) / 2", "-seq + 4", "64", "0", "batch*seq*(seq / 3)"] {
            let x = d(s);
            assert_eq!(d(&x.to_string()), x, "{s} printed as {x}");
        }
        assert_eq!(d("seq + past").to_string(), "past + seq");
    }

    #[test]
    fn evaluates_with_bindings() {
        let env: BTreeMap<String, i64> = [("past".to_string(), 4), ("seq".to_string(), 3)].into();
        assert_eq!(d("past + seq").eval_map(&env).unwrap(), 7);
        assert_eq!(d("(past + seq) / 2").eval_map(&env).unwrap(), 3);
        assert!(matches!(d("batch").eval_map(&env), Err(DimError::Unbound(_))));
    }

    #[test]
    fn rejects_bad_text() {
        for s in ["", "seq +", "(seq", "seq / x", "3 $"] {
            assert!(s.parse::<Dim>().is_err(), "{s}");
        }
    }
}
