//! The text format of the IR: a canonical printer ([`print()`]) and a parser
//! ([`parse()`]) that reads back everything the printer writes, so that
//! `print(parse(print(g))) == print(g)` holds for every graph. Pass tests are
//! written in this format (see `tests/filetests/`).
//!
//! A file holds one function:
//!
//! ```text
//! # smelt-ir 1                                   (optional; `#` starts a comment)
//! sym past in [0, 4096]                          (symbol bounds, inclusive)
//! sym seq in [1, 4096]
//! func @layer(%x: f32[1, seq, 64], %cache.key: f32[1, 2, past, 16]) -> (y, present.key) {
//!   %w0 = weight name="model.norm.weight" : f32[64]
//!   %0 = rms_norm %x, %w0 eps=1e-5 : f32[1, seq, 64] @"layers.0.norm"
//!   %1, %2 = add_rms_norm %x, %0, %w0 eps=1e-5 : f32[1, seq, 64], f32[1, seq, 64]
//!   %3 = reshape %2 shape=[1, seq, 2, 32] : f32[1, seq, 2, 32]
//!   %4 = range start=past end=(past + seq) step=1 dtype=i64 : i64[seq]
//!   %5 = constant value=dense<[1.0, -0.5] : f32[2]> : f32[2]
//!   return y=%1, present.key=%cache.key
//! }
//! ```
//!
//! Grammar (whitespace and newlines are insignificant; `#` comments run to
//! the end of the line):
//!
//! ```text
//! file   := sym* 'func' '@' name '(' (param (',' param)* ','?)? ')' ('->' '(' names ')')? '{' stmt* ret '}'
//! sym    := 'sym' ident 'in' '[' int ',' int ']'
//! param  := value ':' type label?
//! stmt   := ('(' ')' | value (',' value)*) '=' op (value (',' value)*)? (ident '=' attr)* ':' types label?
//! ret    := 'return' (name '=' value (',' name '=' value)* ','?)?
//! type   := dtype '[' (dim (',' dim)*)? ']'            dims are `Dim` expressions: `past + seq`, `2*seq`
//! attr   := int | float | 'true' | 'false' | string | dtype | symbol | '(' dim ')' | '[' dims ']'
//!         | 'dense' '<' ('[' scalars ']' | scalar) ':' type '>'
//! value  := '%' name       label := '@' string       name := [A-Za-z0-9_.]+ | string
//! ```
//!
//! Canonical printing: symbols sorted by name, then the signature (inputs in
//! `Graph::inputs()` order, outputs in `Graph::outputs()` order), then one
//! node per line in `Graph::topo_order()`, values renumbered `%0, %1, ...`
//! (weights `%w0, %w1, ...`; inputs keep their names), attributes in
//! declaration order. Floats print as the shortest text that reads back to
//! the same bits (a NaN other than the canonical quiet NaN prints its bits,
//! `nan:0x7ff8000000000001`), so constants survive a round trip exactly.

mod parse;
mod print;

pub use parse::{parse, ParseError, ParseErrorKind};
pub use print::print;
pub(crate) use print::Names;

use crate::ops::{Category, OPS};
use crate::DType;

/// Words the attribute grammar reads as something other than a symbol; a
/// symbol spelled like one is printed in parentheses (`(f32)`) so that it
/// still reads back as a dim.
pub(crate) fn is_reserved_word(s: &str) -> bool {
    matches!(s, "true" | "false" | "inf" | "nan" | "dense") || s.parse::<DType>().is_ok()
}

/// Whether `s` can be printed without quotes after `%` or `@`.
pub(crate) fn is_bare_ref(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_name_byte)
}

/// Whether `s` can be printed without quotes where an identifier is expected
/// (output names): it must not start with a digit or a dot.
pub(crate) fn is_bare_ident(s: &str) -> bool {
    is_bare_ref(s) && (s.as_bytes()[0].is_ascii_alphabetic() || s.as_bytes()[0] == b'_')
}

pub(crate) fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
}

/// Writes `s` as a double-quoted string with Rust-like escapes.
pub(crate) fn write_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Writes a name bare when the grammar allows it, quoted otherwise.
pub(crate) fn write_name(out: &mut String, s: &str, bare: fn(&str) -> bool) {
    if bare(s) {
        out.push_str(s);
    } else {
        write_quoted(out, s);
    }
}

/// Shortest text that reads back to exactly this f64.
pub(crate) fn fmt_f64(x: f64) -> String {
    if x.is_nan() {
        if x.to_bits() == f64::NAN.to_bits() {
            "nan".to_string()
        } else {
            format!("nan:0x{:016x}", x.to_bits())
        }
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        // `{:?}` prints the shortest round-tripping form and always marks the
        // value as a float (`1.0`, `1e-5`, `1e20`), never as an integer.
        format!("{x:?}")
    }
}

/// Shortest text that reads back (as an f32) to exactly this f32.
pub(crate) fn fmt_f32(x: f32) -> String {
    if x.is_nan() {
        if x.to_bits() == f32::NAN.to_bits() {
            "nan".to_string()
        } else {
            format!("nan:0x{:08x}", x.to_bits())
        }
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{x:?}")
    }
}

/// Shortest text for an f16 or bf16 value (held as the f32 it rounds to)
/// that reads back, through the parser's f32-then-round path, to the same
/// value: `0.3333` rather than the f32 spelling `0.33325195` (and, as numpy
/// prints it, `65500.0` for the largest f16, which reads back as 65504).
pub(crate) fn fmt_narrow(x: f32, dtype: DType) -> String {
    if !x.is_finite() || !matches!(dtype, DType::F16 | DType::BF16) {
        return fmt_f32(x);
    }
    for digits in 0..9 {
        let s = format!("{x:.digits$e}");
        if s.parse::<f32>().is_ok_and(|y| crate::tensor::round_to(dtype, y).to_bits() == x.to_bits()) {
            return debug_style(&s);
        }
    }
    fmt_f32(x)
}

/// Rewrites `{:e}` output (`-3.333e-1`) the way `{:?}` prints floats:
/// positional between 1e-5 and 1e16 (`-0.3333`, `65504.0`), else
/// exponential (`6e-8`).
fn debug_style(s: &str) -> String {
    let (mant, exp) = s.split_once('e').unwrap_or((s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if !(-5 < exp && exp < 16) {
        let rest = &digits[1..];
        let dot = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        return format!("{sign}{}{dot}e{exp}", &digits[..1]);
    }
    if exp < 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let int_len = exp as usize + 1;
    let (int, frac) = if digits.len() > int_len {
        (digits[..int_len].to_string(), digits[int_len..].to_string())
    } else {
        (format!("{digits:0<int_len$}"), "0".to_string())
    };
    format!("{sign}{int}.{frac}")
}

/// The reference table of every op as Markdown, generated from [`OPS`]; it
/// is committed as `docs/ops.md` and a test keeps the two equal.
pub fn ops_markdown() -> String {
    let mut out = String::new();
    out.push_str("# Ops\n\n");
    out.push_str(
        "Generated from the `ops!` table in `ir/src/ops/mod.rs` by `smelt_ir::text::ops_markdown()`; \
         do not edit by hand.\nRegenerate with `SMELT_BLESS=1 cargo test -p smelt-ir --test filetests`.\n\n",
    );
    out.push_str(
        "Operands are listed in order; `name...` is a trailing variadic list. Attributes print after the \
         operands as `name=value`, in the order listed; see `ir/src/text/mod.rs` for the text grammar.\n",
    );
    for (cat, title, blurb) in [
        (Category::Declared, "Declared", "Sources whose type is declared in the text rather than inferred."),
        (Category::Primitive, "Primitive", "What frontends emit."),
        (Category::Fused, "Fused", "What fusion produces; each has a reference decomposition into primitives."),
    ] {
        let ops: Vec<_> = OPS.iter().filter(|o| o.category == cat).collect();
        out.push_str(&format!(
            "\n## {title} ({})\n\n{blurb}\n\n| op | operands | attributes | meaning |\n|---|---|---|---|\n",
            ops.len()
        ));
        for o in ops {
            let mut operands: Vec<String> = o.operands.iter().map(|s| format!("`{s}`")).collect();
            if let Some(r) = o.variadic {
                operands.push(format!("`{r}...`"));
            }
            let attrs: Vec<String> = o.attrs.iter().map(|s| format!("`{s}`")).collect();
            let doc = o.doc.trim().replace('|', "\\|");
            out.push_str(&format!("| `{}` | {} | {} | {} |\n", o.name, operands.join(", "), attrs.join(", "), doc));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{Data, Tensor};
    use crate::types::TensorType;
    use crate::verify::verify;
    use crate::{Dim, Graph, Op};
    use DType::*;

    fn s(n: &str) -> Dim {
        Dim::sym(n)
    }

    fn c(n: i64) -> Dim {
        Dim::c(n)
    }

    fn t(dtype: DType, shape: Vec<Dim>) -> TensorType {
        TensorType::new(dtype, shape)
    }

    /// A graph built in Rust that uses every attribute kind (int, float,
    /// bool, string, dtype, dim, int list, dim list, tensor, absent option),
    /// odd names, labels and a multi-result op.
    fn sample() -> Graph {
        let mut g = Graph::new("every.attr");
        g.declare_symbol("batch", 1, 8);
        g.declare_symbol("past", 0, 4096);
        g.declare_symbol("seq", 1, 4096);
        let x = g.add_input("x", t(F32, vec![s("batch"), s("seq"), c(64)]));
        let ids = g.add_input("input_ids", t(I64, vec![s("batch"), s("seq")]));
        let kc = g.add_input("past_key_values.0.key", t(F32, vec![s("batch"), c(2), s("past"), c(16)]));
        let cos = g.add_input("rope/cos", t(F32, vec![c(1), c(1), s("seq"), c(16)]));
        let sin = g.add_input("0", t(F32, vec![c(1), c(1), s("seq"), c(16)]));
        g.set_label(g.value(cos).def, "rotary.cos");
        let w = g.add_weight("model.layers.0.input_layernorm.weight", TensorType::fixed(F32, &[64]));
        let emb = g.add_weight("model.embed_tokens.weight", TensorType::fixed(F32, &[256, 64]));
        let wk = g.add_weight("we\"ird\n\\name", TensorType::fixed(F32, &[64, 32]));
        let wg = g.add_weight("w0", TensorType::fixed(F32, &[64, 128]));
        let wu = g.add_weight("w1", TensorType::fixed(F32, &[64, 128]));

        let e = g.add(Op::Gather { axis: 0 }, &[emb, ids]).unwrap();
        let sn = g.add_multi(Op::AddRmsNorm { eps: 1e-6 }, &[x, e, w], Some("layers.0.add_norm")).unwrap();
        let n = g.add_labeled(Op::RmsNorm { eps: 1e-5 }, &[sn[0], w], Some("layers.0.input_layernorm")).unwrap();
        let red = g.add(Op::ReduceSum { axes: vec![-1], keepdims: true }, &[n]).unwrap();
        let fill =
            g.add(Op::Fill { shape: vec![s("batch"), s("past") + s("seq")], value: -0.0, dtype: BF16 }, &[]).unwrap();
        let fill = g.add(Op::Cast { to: F32 }, &[fill]).unwrap();
        let tri = g.add(Op::Trilu { upper: false, k: s("past") + c(1) }, &[fill]).unwrap();
        let tri2 = g.add(Op::Trilu { upper: true, k: c(-1) }, &[tri]).unwrap();
        let rng = g.add(Op::Range { start: s("past"), end: s("past") + s("seq"), step: 1, dtype: I64 }, &[]).unwrap();
        let sl = g
            .add(Op::Slice { axes: vec![1], starts: vec![c(0)], ends: vec![s("seq") - c(1)], steps: vec![1] }, &[x])
            .unwrap();
        let q = g.add(Op::Reshape { shape: vec![s("batch"), s("seq"), c(4), c(16)] }, &[n]).unwrap();
        let q = g.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[q]).unwrap();
        let q = g.add(Op::Rope { interleaved: false }, &[q, cos, sin]).unwrap();
        let kv = g.add(Op::MatMul {}, &[n, wk]).unwrap();
        let kv = g.add(Op::Reshape { shape: vec![s("batch"), s("seq"), c(2), c(16)] }, &[kv]).unwrap();
        let kv = g.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[kv]).unwrap();
        let k = g.add(Op::Concat { axis: 2 }, &[kc, kv]).unwrap();
        let k2 = g.add(Op::KvAppend { axis: 2 }, &[kc, kv]).unwrap();
        let a =
            g.add(Op::Attention { scale: 0.25, causal: true, window: Some(128), softcap: None }, &[q, k, k2]).unwrap();
        let a2 = g
            .add(Op::Attention { scale: 1.0 / 3.0, causal: false, window: None, softcap: Some(30.0) }, &[q, k, k])
            .unwrap();
        let sm = g.add(Op::Softmax { axis: -1 }, &[a2]).unwrap();
        let mlp = g.add(Op::GatedMlp { act: "silu".into() }, &[n, wg, wu]).unwrap();
        let lit = Tensor::from_f32(F16, vec![2, 2], vec![1.0, -0.5, 65504.0, 6.1e-5]).unwrap();
        let k16 = g.add(Op::Constant { value: lit }, &[]).unwrap();
        let lit = Tensor::from_i64(I8, vec![3], vec![-128, 0, 127]).unwrap();
        let k8 = g.add(Op::Constant { value: lit }, &[]).unwrap();
        let lit = Tensor::from_bool(vec![], vec![true]).unwrap();
        let kb = g.add(Op::Constant { value: lit }, &[]).unwrap();
        let lit = Tensor::full(F64, vec![2, 3], 0.1);
        let k64 = g.add(Op::Constant { value: lit }, &[]).unwrap();
        for (name, v) in [
            ("sum", sn[0]),
            ("norm", sn[1]),
            ("red", red),
            ("tri", tri2),
            ("rng", rng),
            ("sl", sl),
            ("attn", a),
            ("sm", sm),
            ("mlp", mlp),
            ("present.0.key", k2),
            ("k16", k16),
            ("k8", k8),
            ("kb", kb),
            ("k64", k64),
            ("odd name/1", x),
        ] {
            g.set_output(name, v);
        }
        g
    }

    /// (op, result types, label) of every node in print order.
    fn shape_of(g: &Graph) -> Vec<(Op, Vec<TensorType>, Option<String>)> {
        g.topo_order()
            .unwrap()
            .into_iter()
            .map(|n| {
                let node = g.node(n);
                let tys = node.outputs.iter().map(|v| g.ty(*v).clone()).collect();
                (node.op.clone(), tys, node.label.clone())
            })
            .collect()
    }

    #[test]
    fn round_trips_a_graph_built_in_rust() {
        let g = sample();
        verify(&g).unwrap();
        let text = print(&g);
        let g2 = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        verify(&g2).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(print(&g2), text);
        assert_eq!(g2.name, g.name);
        assert_eq!(g2.symbols(), g.symbols());
        let names = |g: &Graph| g.inputs().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(&g2), names(&g));
        let outs = |g: &Graph| g.outputs().iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(outs(&g2), outs(&g));
        // Same ops, attributes, types and labels; the inputs' ops compare too.
        let (a, b) = (shape_of(&g), shape_of(&g2));
        let a: Vec<_> = a.into_iter().filter(|x| !matches!(x.0, Op::Input { .. })).collect();
        let b: Vec<_> = b.into_iter().filter(|x| !matches!(x.0, Op::Input { .. })).collect();
        assert_eq!(a, b);
        // Spot checks of the spelling.
        for want in [
            "sym past in [0, 4096]",
            "func @every.attr(",
            "%\"rope/cos\": f32[1, 1, seq, 16] @\"rotary.cos\"",
            "%0: f32[1, 1, seq, 16]",
            "weight name=\"we\\\"ird\\n\\\\name\" : f32[64, 32]",
            "= add_rms_norm %x, %",
            "eps=1e-6 : f32[batch, seq, 64], f32[batch, seq, 64] @\"layers.0.add_norm\"",
            "fill shape=[batch, past + seq] value=-0.0 dtype=bf16 : bf16[batch, past + seq]",
            "trilu %",
            "upper=false k=(past + 1)",
            "upper=true k=-1",
            "range start=past end=(past + seq) step=1 dtype=i64 : i64[seq]",
            "starts=[0] ends=[seq - 1] steps=[1]",
            "scale=0.25 causal=true window=128 : f32[batch, 4, seq, 16]",
            "causal=false softcap=30.0 :",
            "act=\"silu\"",
            "value=dense<[1.0, -0.5, 65500.0, 6.1e-5] : f16[2, 2]>",
            "value=dense<[-128, 0, 127] : i8[3]> : i8[3]",
            "value=dense<[true] : bool[]> : bool[]",
            "value=dense<0.1 : f64[2, 3]>",
            "\"odd name/1\"=%x",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Inputs named `0` and `w0`/`w1`-like weights do not collide with generated names.
        assert!(!text.contains("%0 ="), "{text}");
    }

    /// A tiny deterministic generator (no dependency needed for this).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 ^ (self.0 >> 29)
        }
    }

    fn constant_graph(values: Vec<Tensor>) -> Graph {
        let mut g = Graph::new("consts");
        for (i, v) in values.into_iter().enumerate() {
            let k = g.add(Op::Constant { value: v }, &[]).unwrap();
            g.set_output(&format!("k{i}"), k);
        }
        g
    }

    #[test]
    fn literals_round_trip_bit_exactly() {
        let mut r = Lcg(7);
        let mut f32s: Vec<f32> = (0..2000).map(|_| f32::from_bits(r.next() as u32)).collect();
        f32s.extend([0.0, -0.0, f32::MIN_POSITIVE, 1e-45, f32::MAX, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        let mut f64s: Vec<f64> = (0..2000).map(|_| f64::from_bits(r.next())).collect();
        f64s.extend([0.0, -0.0, 5e-324, f64::MAX, f64::INFINITY, f64::NAN, 0.1, 1.0 / 3.0]);
        let ints: Vec<i64> = vec![i64::MIN, -1, 0, 1, i64::MAX];
        let n32 = f32s.len();
        let n64 = f64s.len();
        let g = constant_graph(vec![
            Tensor::from_f32(F32, vec![n32], f32s.clone()).unwrap(),
            Tensor::from_f64(F64, vec![n64], f64s.clone()).unwrap(),
            Tensor::from_f32(BF16, vec![4], vec![1.0, 3.0e38, -7.5, 1e-30]).unwrap(),
            Tensor::from_i64(I64, vec![5], ints.clone()).unwrap(),
            Tensor::from_i64(I32, vec![2], vec![i32::MIN as i64, i32::MAX as i64]).unwrap(),
            Tensor::from_i64(U8, vec![2, 1], vec![0, 255]).unwrap(),
            Tensor::full(F32, vec![3, 0], 1.0),
        ]);
        let text = print(&g);
        let g2 = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        verify(&g2).unwrap();
        assert_eq!(print(&g2), text);
        let consts: Vec<Tensor> = g2
            .topo_order()
            .unwrap()
            .into_iter()
            .filter_map(|n| match &g2.node(n).op {
                Op::Constant { value } => Some(value.clone()),
                _ => None,
            })
            .collect();
        let Data::F32(back) = &consts[0].data else { panic!() };
        assert!(back.iter().zip(&f32s).all(|(a, b)| a.to_bits() == b.to_bits()));
        let Data::F64(back) = &consts[1].data else { panic!() };
        assert!(back.iter().zip(&f64s).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(consts[3].data, Data::I64(ints));
        assert_eq!(consts[6].shape, vec![3, 0]);
    }

    fn err(src: &str) -> String {
        match parse(src) {
            Ok(_) => panic!("parsed:\n{src}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parse_errors_say_where_what_and_found() {
        let cases = [
            (
                "func @f(%x: f32[4]) -> (y) {\n  %0 = neg %y : f32[4]\n  return y=%0\n}\n",
                "2:12: use of undefined value `%y`",
            ),
            (
                "func @f(%x: f32[4]) {\n  %0 = negg %x : f32[4]\n  return y=%0\n}\n",
                "2:8: unknown op `negg`",
            ),
            (
                "func @f(%x: f32[4]) {\n  %0 = neg %x : f33[4]\n  return y=%0\n}\n",
                "2:17: expected a dtype (f32, f16, bf16, f64, i64, i32, i8, u8, bool), found `f33`",
            ),
            (
                "func @f(%x: f32[seq +]) {\n  return y=%x\n}\n",
                "1:17: cannot parse dim `seq +`",
            ),
            (
                "func @f(%x: f32[4]) {\n  %0 = neg %x\n  return y=%0\n}\n",
                "3:3: expected `,` and another operand, an attribute (`name=value`) or `:` and the result types, found `return`",
            ),
            (
                "func @f(%x: f32[4]) {\n  %0 = cast %x to=f12 : f32[4]\n  return y=%0\n}\n",
                "2:16: op `cast`: attribute `to`: unknown dtype `f12`",
            ),
            (
                "func @f(%x: f32[4]) {\n  %0 = neg %x axis=1 : f32[4]\n  return y=%0\n}\n",
                "2:15: op `neg` has no attribute `axis` (its attributes: none)",
            ),
            (
                "func @f(%x: f32[4]) {\n  %x = neg %x : f32[4]\n  return y=%x\n}\n",
                "2:3: value `%x` is already defined at line 1",
            ),
            (
                "func @f(%x: f32[4]) -> (y) {\n  return z=%x\n}\n",
                "2:3: return gives outputs (z) but the signature declares (y)",
            ),
            (
                "func @f(%x: f32[4]) {\n  %0 = weight name=\"abc : f32[4]\n  return y=%0\n}\n",
                "2:20: unterminated string",
            ),
            (
                "func @f() {\n  %0 = constant value=dense<[1, 2, 3] : i8[2]> : i8[2]\n  return y=%0\n}\n",
                "2:23: tensor literal: 3 elements do not fill i8[2] (2 elements)",
            ),
            (
                "func @f() {\n  %0 = constant value=dense<[1, 300] : u8[2]> : u8[2]\n  return y=%0\n}\n",
                "2:33: bad number `300`: out of range for u8",
            ),
            (
                "sym seq in [1, 8]\nsym seq in [1, 9]\nfunc @f() {\n  return\n}\n",
                "2:5: symbol `seq` is declared twice",
            ),
            ("# smelt-ir 2\nfunc @f() {\n  return\n}\n", "1:1: unsupported text format version `2`"),
            ("func @f() {\n  return\n}\n}\n", "4:1: expected end of input (one function per file), found `}`"),
            ("func @f() {\n  %0 = neg $\n", "2:12: unexpected character `$`"),
            (
                "func @f(%x: f32[99999999999*99999999999]) {\n  return y=%x\n}\n",
                "1:17: dim `99999999999*99999999999` is too large",
            ),
            ("func @f(%x: f32[4294967296, 4294967296]) {\n  return y=%x\n}\n", "1:17: the shape's dims are too large"),
        ];
        for (src, want) in cases {
            let got = err(src);
            assert!(got.contains(want), "for\n{src}\nwant {want:?}\ngot  {got:?}");
        }
    }

    #[test]
    fn truncated_and_damaged_inputs_fail_cleanly() {
        let text = print(&sample());
        let end = text.rfind('}').unwrap() + 1;
        let boundaries: Vec<usize> = (0..text.len()).filter(|i| text.is_char_boundary(*i)).collect();
        for &i in &boundaries {
            let r = parse(&text[..i]);
            if i < end {
                assert!(r.is_err(), "prefix of {i} bytes parsed:\n{}", &text[..i]);
            }
        }
        // Deleting any single character must never panic (it may still parse).
        for &i in boundaries.iter().step_by(3) {
            let len = text[i..].chars().next().map_or(0, char::len_utf8);
            let damaged = format!("{}{}", &text[..i], &text[i + len..]);
            if let Ok(g) = parse(&damaged) {
                let _ = verify(&g);
                let _ = print(&g);
            }
        }
    }

    #[test]
    fn long_signatures_wrap_and_read_back() {
        let mut g = Graph::new("wide");
        let mut last = None;
        for i in 0..12 {
            let v = g.add_input(&format!("past_key_values.{i}.key"), TensorType::fixed(F32, &[2, 16]));
            last = Some(v);
            g.set_output(&format!("present.{i}.key"), v);
        }
        let y = g.add(Op::Neg {}, &[last.unwrap()]).unwrap();
        g.set_output("logits", y);
        let text = print(&g);
        assert!(text.contains("func @wide(\n    %past_key_values.0.key: f32[2, 16],\n"), "{text}");
        assert!(text.contains("  return\n    present.0.key=%past_key_values.0.key,\n"), "{text}");
        let g2 = parse(&text).unwrap();
        assert_eq!(print(&g2), text);
    }

    #[test]
    fn broken_graphs_still_print() {
        let mut g = Graph::new("broken");
        let x = g.add_input("x", TensorType::fixed(F32, &[4]));
        let y = g.add(Op::Neg {}, &[x]).unwrap();
        g.add_unchecked(Op::Neg {}, &[y], vec![], None);
        g.set_output("y", y);
        let n = g.value(y).def;
        g.remove_node(n);
        let text = print(&g);
        assert!(text.contains("() = neg %!v1 : ()"), "{text}");
        assert!(text.contains("return y=%!v1"), "{text}");
        assert!(verify(&g).is_err());
    }

    #[test]
    fn large_graphs_round_trip() {
        // About the size of a 30-layer model: 30 blocks of 100 nodes.
        let mut g = Graph::new("deep");
        g.declare_symbol("seq", 1, 4096);
        let mut x = g.add_input("x", t(F32, vec![s("seq"), c(64)]));
        for layer in 0..30 {
            let w = g.add_weight(&format!("model.layers.{layer}.weight"), TensorType::fixed(F32, &[64, 64]));
            for i in 0..99 {
                x = match i % 3 {
                    0 => g.add_labeled(Op::MatMul {}, &[x, w], Some(&format!("layers.{layer}.mm{i}"))).unwrap(),
                    1 => g.add(Op::Tanh {}, &[x]).unwrap(),
                    _ => g.add(Op::Add {}, &[x, x]).unwrap(),
                };
            }
        }
        g.set_output("y", x);
        let start = std::time::Instant::now();
        let text = print(&g);
        let printed = start.elapsed();
        let g2 = parse(&text).unwrap();
        let parsed = start.elapsed() - printed;
        verify(&g2).unwrap();
        assert_eq!(print(&g2), text);
        assert_eq!(g2.node_count(), g.node_count());
        eprintln!("{} nodes: print {printed:?}, parse {parsed:?}", g.node_count());
    }

    #[test]
    fn ops_markdown_lists_every_op() {
        let md = ops_markdown();
        for o in OPS {
            assert!(md.contains(&format!("| `{}` |", o.name)), "{}", o.name);
        }
    }
}
