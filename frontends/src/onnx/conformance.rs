//! The ONNX operator conformance runner: runs backend-test cases
//! (`<case>/model.onnx`, `<case>/test_data_set_N/input_K.pb`, `output_K.pb`)
//! through the importer and the reference interpreter and compares the
//! outputs.
//!
//! Rules (from `shared/conformance/README.md`):
//! - a case is *in scope* when every node of its graph has an op type of the
//!   transformer set [`TRANSFORMER_OPS`]; the pass count is over those;
//! - a case passes when, for every data set, each output matches the
//!   expected tensor in shape, ONNX element type and value: floats within
//!   `|got - want| <= atol + rtol * |want|` (rtol 1e-3, atol 1e-7), NaN
//!   matching NaN and infinities matching themselves; integers and bools
//!   exactly.
//!
//! Inputs are bound to the graph inputs by position (`input_K` is the K-th
//! graph input that is not an initialiser), outputs likewise. A model whose
//! shape operands are graph inputs (a reshape target fed as `input_1`) cannot
//! be imported generically; such a case is imported again with its integer
//! inputs as constants, once per data set, and marked `specialised`.
//! Each case runs isolated (a panic becomes a failure with its message), and
//! cases run on all cores.

use super::import::dtypes::{self, DataType};
use super::import::{import_model, ImportOptions, OnnxImport};
use super::proto::TensorProto;
use super::OnnxModel;
use prost::Message;
use serde::Serialize;
use smelt_ir::{Data, Tensor};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The transformer operator set of the conformance README.
pub const TRANSFORMER_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "Attention",
    "Cast",
    "CastLike",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Cos",
    "CumSum",
    "Div",
    "Dropout",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gelu",
    "Gemm",
    "Greater",
    "GreaterOrEqual",
    "HardSwish",
    "Identity",
    "IsInf",
    "IsNaN",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "MatMul",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "Pow",
    "RMSNormalization",
    "Range",
    "Reciprocal",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "RotaryEmbedding",
    "Round",
    "ScatterElements",
    "ScatterND",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Slice",
    "Softmax",
    "Softplus",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Swish",
    "Tanh",
    "Tile",
    "TopK",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
];

/// Relative tolerance of float comparisons.
pub const RTOL: f64 = 1e-3;
/// Absolute tolerance of float comparisons.
pub const ATOL: f64 = 1e-7;

/// The outcome of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub name: String,
    /// Every node's op type is in [`TRANSFORMER_OPS`].
    pub in_scope: bool,
    /// The distinct op types of the graph, sorted.
    pub ops: Vec<String>,
    pub passed: bool,
    /// Why it failed (the first problem found).
    pub reason: Option<String>,
    /// Imported with its integer inputs as constants (see the module docs).
    pub specialised: bool,
}

/// One row of the per-op table: the in-scope cases whose graph uses the op.
#[derive(Debug, Clone, Serialize)]
pub struct OpRow {
    pub op: String,
    pub cases: usize,
    pub passed: usize,
}

/// The results of a conformance run.
#[derive(Debug, Clone, Serialize)]
pub struct ConformanceReport {
    pub dir: PathBuf,
    /// Every case, sorted by name.
    pub cases: Vec<CaseResult>,
}

impl ConformanceReport {
    pub fn in_scope(&self) -> usize {
        self.cases.iter().filter(|c| c.in_scope).count()
    }

    /// In-scope cases that pass.
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.in_scope && c.passed).count()
    }

    /// In-scope cases that fail.
    pub fn failed(&self) -> usize {
        self.in_scope() - self.passed()
    }

    /// In-scope cases that fail, by name.
    pub fn failures(&self) -> Vec<&CaseResult> {
        self.cases.iter().filter(|c| c.in_scope && !c.passed).collect()
    }

    /// Per op type: how many in-scope cases use it and how many of those pass.
    pub fn per_op(&self) -> Vec<OpRow> {
        let mut rows: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for c in self.cases.iter().filter(|c| c.in_scope) {
            for op in &c.ops {
                let r = rows.entry(op).or_default();
                r.0 += 1;
                r.1 += usize::from(c.passed);
            }
        }
        rows.into_iter().map(|(op, (cases, passed))| OpRow { op: op.to_string(), cases, passed }).collect()
    }

    /// The report as JSON: summary counts, the per-op table and every case.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Json<'a> {
            dir: &'a Path,
            in_scope: usize,
            passed: usize,
            failed: usize,
            ops: Vec<OpRow>,
            cases: &'a [CaseResult],
        }
        let j = Json {
            dir: &self.dir,
            in_scope: self.in_scope(),
            passed: self.passed(),
            failed: self.failed(),
            ops: self.per_op(),
            cases: &self.cases,
        };
        serde_json::to_string_pretty(&j).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The failing in-scope cases as Markdown: grouped by cause (each with
    /// why it fails), every case with the first problem found.
    pub fn failures_markdown(&self) -> String {
        let mut s = String::from("# ONNX conformance: failing in-scope cases\n\n");
        s.push_str(&format!(
            "{} passed, {} failed of {} in-scope cases on the reference interpreter. Generated by the \
             conformance test; re-bless with `SMELT_BLESS_CONFORMANCE=1 cargo test -p smelt-frontends \
             --test onnx_conformance`.\n",
            self.passed(),
            self.failed(),
            self.in_scope()
        ));
        let mut groups: BTreeMap<&'static str, Vec<&CaseResult>> = BTreeMap::new();
        for c in self.failures() {
            groups.entry(cause(c)).or_default().push(c);
        }
        for (cause, cases) in groups {
            s.push_str(&format!("\n## {cause} ({})\n\n", cases.len()));
            for c in cases {
                let reason = c.reason.as_deref().unwrap_or("unknown").replace('\n', " ");
                s.push_str(&format!("- `{}`: {reason}\n", c.name));
            }
        }
        s
    }
}

/// A one-line explanation of why a failing case fails, for grouping.
fn cause(c: &CaseResult) -> &'static str {
    let r = c.reason.as_deref().unwrap_or("");
    let narrow = ["bf16", "bfloat16", "fp16", "float16"].iter().any(|t| c.name.contains(t));
    if r.contains("out of tolerance") && narrow {
        "Narrow-float rounding order: the reference (numpy with ml_dtypes) rounds every intermediate to \
         bf16/f16, down to each step of a matmul's accumulation; smelt accumulates in f32/f64 and rounds \
         each op's result once, so results differ by about one bf16/f16 ulp, more than rtol 1e-3 allows"
    } else if r.contains("FLOAT8E8M0") {
        "FLOAT8E8M0 (exponent-only MX scale type) has no carrier in smelt"
    } else if r.contains("STRING") {
        "String tensors are not supported"
    } else if r.contains("reduction") {
        "Scatter reductions (add/mul/max/min) are not lowered"
    } else if r.contains("random mask") {
        "Training-mode Dropout draws a random mask (numpy's generator), which cannot be reproduced"
    } else {
        "Other"
    }
}

impl fmt::Display for ConformanceReport {
    /// The per-op table, then `N passed, M failed` over the in-scope cases.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = self.per_op();
        let w = rows.iter().map(|r| r.op.len()).max().unwrap_or(2).max(2);
        writeln!(f, "{:<w$}  {:>5}  {:>6}  {:>6}", "op", "cases", "passed", "failed")?;
        for r in &rows {
            writeln!(f, "{:<w$}  {:>5}  {:>6}  {:>6}", r.op, r.cases, r.passed, r.cases - r.passed)?;
        }
        write!(f, "{} passed, {} failed", self.passed(), self.failed())
    }
}

/// Runs every case folder under `dir` (folders holding a `model.onnx`).
pub fn run_dir(dir: &Path) -> ConformanceReport {
    let mut case_dirs: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("model.onnx").is_file()).collect(),
        Err(_) => Vec::new(),
    };
    case_dirs.sort();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<CaseResult>> = Mutex::new(Vec::with_capacity(case_dirs.len()));
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    std::thread::scope(|s| {
        for _ in 0..workers.min(case_dirs.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(d) = case_dirs.get(i) else { break };
                let r = run_case(d);
                results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            });
        }
    });
    let mut cases = results.into_inner().unwrap_or_else(|e| e.into_inner());
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    ConformanceReport { dir: dir.to_path_buf(), cases }
}

/// Runs one case folder; never panics (a panic inside becomes the reason).
pub fn run_case(dir: &Path) -> CaseResult {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let model = match OnnxModel::open(dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => {
            return CaseResult {
                name,
                in_scope: false,
                ops: vec![],
                passed: false,
                reason: Some(format!("cannot read the model: {e}")),
                specialised: false,
            }
        }
    };
    let mut ops: Vec<String> = model.graph().node.iter().map(|n| n.op_type().to_string()).collect();
    ops.sort();
    ops.dedup();
    let in_scope = ops.iter().all(|o| TRANSFORMER_OPS.contains(&o.as_str()));
    let mut specialised = false;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_case(dir, &model, &mut specialised)))
        .unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("panicked: {msg}"))
        });
    // Paths in messages are shown relative to the folder of all cases.
    let parent = dir.parent().map(|p| format!("{}/", p.display())).unwrap_or_default();
    let reason = outcome.err().map(|r| r.replace(&parent, ""));
    CaseResult { name, in_scope, ops, passed: reason.is_none(), reason, specialised }
}

/// A tensor read from a `.pb` file, in its carrier dtype.
struct PbTensor {
    tensor: Tensor,
    ety: DataType,
}

fn read_pb(path: &Path) -> Result<PbTensor, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let proto = TensorProto::decode(bytes.as_slice()).map_err(|e| format!("{}: {e}", path.display()))?;
    let (tensor, ety) = dtypes::decode_standalone(path, &proto).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(PbTensor { tensor, ety })
}

/// The numbered `.pb` files `prefix_0.pb`, `prefix_1.pb`, ... in a data set.
fn numbered(dir: &Path, prefix: &str) -> Result<Vec<PbTensor>, String> {
    let mut out = Vec::new();
    for k in 0.. {
        let p = dir.join(format!("{prefix}_{k}.pb"));
        if !p.is_file() {
            break;
        }
        out.push(read_pb(&p)?);
    }
    Ok(out)
}

fn check_case(dir: &Path, model: &OnnxModel, specialised: &mut bool) -> Result<(), String> {
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_")))
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err("no test_data_set_* folders".into());
    }
    let generic = import_model(model, &ImportOptions::default());
    let names: Vec<String> = model.graph_inputs().iter().map(|i| i.name().to_string()).collect();
    for set in &sets {
        let set_name = set.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let inputs = numbered(set, "input")?;
        let expected = numbered(set, "output")?;
        if inputs.len() > names.len() {
            return Err(format!("{set_name}: {} input files for {} graph inputs", inputs.len(), names.len()));
        }
        let specialised_import;
        let imp: &OnnxImport = match &generic {
            Ok(i) => i,
            Err(e) if e.needs_constant_inputs() => {
                *specialised = true;
                let mut opts = ImportOptions::default();
                // Integer inputs (shapes, axes, repeats) and small vectors
                // (a Range's bounds, a dropout flag) are what shape
                // operands are made of.
                for (n, t) in names.iter().zip(&inputs) {
                    if t.tensor.dtype.is_int() || (t.tensor.shape.len() <= 1 && t.tensor.numel() <= 16) {
                        opts.constant_inputs.insert(n.clone(), t.tensor.clone());
                    }
                }
                specialised_import = import_model(model, &opts).map_err(|e| format!("import: {e}"))?;
                &specialised_import
            }
            Err(e) => return Err(format!("import: {e}")),
        };
        smelt_ir::verify::verify(&imp.graph).map_err(|e| format!("the imported graph does not verify: {e}"))?;
        let mut feed: BTreeMap<String, Tensor> = BTreeMap::new();
        for spec in &imp.inputs {
            let k = names
                .iter()
                .position(|n| *n == spec.name)
                .ok_or_else(|| format!("graph input `{}` has no position", spec.name))?;
            let t = inputs.get(k).ok_or_else(|| format!("{set_name}: no input_{k}.pb for `{}`", spec.name))?;
            if t.ety != spec.onnx_type {
                return Err(format!(
                    "{set_name}: input `{}` is {}, the graph declares {}",
                    spec.name,
                    t.ety.as_str_name(),
                    spec.onnx_type.as_str_name()
                ));
            }
            feed.insert(spec.name.clone(), t.tensor.clone());
        }
        let got =
            smelt_ir::interp::run(&imp.graph, &imp.weights, &feed).map_err(|e| format!("{set_name}: run: {e}"))?;
        if expected.len() != imp.outputs.len() {
            return Err(format!(
                "{set_name}: {} expected outputs for {} graph outputs",
                expected.len(),
                imp.outputs.len()
            ));
        }
        for (k, (spec, want)) in imp.outputs.iter().zip(&expected).enumerate() {
            let g =
                got.get(&spec.name).ok_or_else(|| format!("{set_name}: output `{}` was not computed", spec.name))?;
            compare(g, spec.onnx_type, want).map_err(|e| format!("{set_name}: output {k} `{}`: {e}", spec.name))?;
        }
    }
    Ok(())
}

/// Compares one output with its expected tensor (see the module docs).
fn compare(got: &Tensor, got_type: DataType, want: &PbTensor) -> Result<(), String> {
    compare_tensors(got, got_type, &want.tensor, want.ety)
}

/// Compares values under the conformance rule.
pub fn compare_tensors(got: &Tensor, got_type: DataType, want: &Tensor, want_type: DataType) -> Result<(), String> {
    if got_type != want_type || got.dtype != want.dtype {
        return Err(format!(
            "element type {} ({}), expected {} ({})",
            got_type.as_str_name(),
            got.dtype,
            want_type.as_str_name(),
            want.dtype
        ));
    }
    if got.shape != want.shape {
        return Err(format!("shape {:?}, expected {:?}", got.shape, want.shape));
    }
    match (&got.data, &want.data) {
        (Data::I64(a), Data::I64(b)) => {
            if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
                return Err(format!(
                    "{} of {} values differ; first at index {i}: {} vs expected {}",
                    (0..a.len()).filter(|&i| a[i] != b[i]).count(),
                    a.len(),
                    a[i],
                    b[i]
                ));
            }
        }
        (Data::Bool(a), Data::Bool(b)) => {
            if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
                return Err(format!("values differ; first at index {i}: {} vs expected {}", a[i], b[i]));
            }
        }
        _ => {
            let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
            let bad = |x: f64, y: f64| {
                if x.is_nan() || y.is_nan() {
                    return x.is_nan() != y.is_nan();
                }
                if x.is_infinite() || y.is_infinite() {
                    return x != y;
                }
                (x - y).abs() > ATOL + RTOL * y.abs()
            };
            let fails: Vec<usize> = (0..a.len()).filter(|&i| bad(a[i], b[i])).collect();
            if let Some(&i) = fails.first() {
                let worst =
                    fails
                        .iter()
                        .map(|&j| (a[j] - b[j]).abs())
                        .fold(0.0f64, |m, d| if d.is_nan() { m } else { m.max(d) });
                return Err(format!(
                    "{} of {} values out of tolerance (max |diff| {worst:.3e}); first at index {i}: {} vs expected {}",
                    fails.len(),
                    a.len(),
                    a[i],
                    b[i]
                ));
            }
        }
    }
    Ok(())
}
