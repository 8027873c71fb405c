//! Binding shape symbols from concrete shapes: the one algorithm the
//! reference interpreter and the native runtime both use to check a call's
//! inputs, so they accept and refuse the same inputs with the same reasons.
//!
//! Rules: constant dims must equal the shape; a dim that is a single symbol
//! binds it (the same value everywhere); a dim that is an expression with
//! one still-unknown symbol (`past + seq` once `seq` is bound) is solved for
//! it as a linear equation and the solution verified, repeated while that
//! binds something new; bound symbols must lie within their bounds; and at
//! the end every dim must equal its value.

use std::collections::BTreeMap;

use crate::Dim;

/// Why shapes do not fit their declared dims. `input`/`axis` name where.
#[derive(Debug, Clone, PartialEq)]
pub enum BindError {
    /// The dim at `input` axis `axis` is `expected` (already explained, e.g.
    /// `seq = 4 (bound by input `ids` axis 1)`), the shape has `found`.
    Dim { input: String, axis: usize, expected: String, found: usize },
    /// `symbol` took `value` at `input` axis `axis`, outside `[min, max]`.
    OutOfBounds { symbol: String, value: i64, input: String, axis: usize, min: i64, max: i64 },
}

/// Binds every symbol of `shapes` (name, declared dims, concrete shape; the
/// ranks must already agree), with `bounds` giving a symbol's inclusive
/// bounds when it has some.
pub fn bind_shapes(
    shapes: &[(&str, &[Dim], &[usize])],
    bounds: &dyn Fn(&str) -> Option<(i64, i64)>,
) -> Result<BTreeMap<String, i64>, BindError> {
    let dim_err = |input: &str, axis: usize, expected: String, found: usize| BindError::Dim {
        input: input.to_string(),
        axis,
        expected,
        found,
    };

    // Constants and single symbols first: they fix the symbols' values.
    let mut syms: BTreeMap<String, i64> = BTreeMap::new();
    let mut origin: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for &(name, dims, shape) in shapes {
        for (axis, (dim, &found)) in dims.iter().zip(shape).enumerate() {
            if let Some(c) = dim.as_const() {
                if c != found as i64 {
                    return Err(dim_err(name, axis, c.to_string(), found));
                }
            } else if let Some(s) = dim.as_sym() {
                match syms.get(s) {
                    Some(&v) if v != found as i64 => {
                        let (n0, a0) = &origin[s];
                        let why = format!("{s} = {v} (bound by input `{n0}` axis {a0})");
                        return Err(dim_err(name, axis, why, found));
                    }
                    Some(_) => {}
                    None => {
                        syms.insert(s.to_string(), found as i64);
                        origin.insert(s.to_string(), (name.to_string(), axis));
                    }
                }
            }
        }
    }

    // Then expressions with exactly one unknown symbol, solved as linear
    // equations (the solution is verified, so non-linear dims never bind a
    // wrong value); repeated while that binds something new.
    loop {
        let mut progress = false;
        for &(name, dims, shape) in shapes {
            for (axis, (dim, &found)) in dims.iter().zip(shape).enumerate() {
                let unknown: Vec<String> = dim.symbols().into_iter().filter(|s| !syms.contains_key(s)).collect();
                let [s] = unknown.as_slice() else { continue };
                let at = |x: i64| dim.eval(&|n: &str| if n == s { Some(x) } else { syms.get(n).copied() }).ok();
                let found = found as i64;
                let (Some(r0), Some(r1)) = (at(0), at(1)) else { continue };
                // Checked arithmetic: a huge coefficient must not overflow.
                let Some((a, rest)) = r1.checked_sub(r0).zip(found.checked_sub(r0)) else {
                    continue;
                };
                if a != 0 && rest.checked_rem(a) == Some(0) {
                    let Some(x) = rest.checked_div(a) else { continue };
                    if at(x) == Some(found) {
                        syms.insert(s.clone(), x);
                        origin.insert(s.clone(), (name.to_string(), axis));
                        progress = true;
                    }
                }
            }
        }
        if !progress {
            break;
        }
    }

    for (s, &value) in &syms {
        if let Some((min, max)) = bounds(s) {
            if value < min || value > max {
                let (input, axis) = origin[s].clone();
                return Err(BindError::OutOfBounds { symbol: s.clone(), value, input, axis, min, max });
            }
        }
    }

    // Finally every dim must equal its value.
    for &(name, dims, shape) in shapes {
        for (axis, (dim, &found)) in dims.iter().zip(shape).enumerate() {
            match dim.eval_map(&syms) {
                Ok(v) if v == found as i64 => {}
                Ok(v) => return Err(dim_err(name, axis, format!("{dim} = {v}"), found)),
                Err(e) => return Err(dim_err(name, axis, format!("{dim} ({e})"), found)),
            }
        }
    }
    Ok(syms)
}
