//! Scheduling: turns a fused, verified graph into the launch plan of a
//! native artifact: the distinct kernels, every buffer the forward call
//! touches, the ordered launches and the constant data (weights and folded
//! constants) laid out for memory mapping.
//!
//! What it assumes and guarantees:
//! - the graph verifies and its nodes are in a valid topological order;
//! - nodes whose operands are all constants and whose shapes are concrete are
//!   evaluated here with the reference interpreter (weight transposes, rope
//!   tables), so no kernel runs on constants alone;
//! - identical kernels (same name and body) are emitted once and shared by
//!   every launch that needs them, e.g. across layers;
//! - a matmul or gated MLP whose weight operands are 2-D constants `[K, N]`
//!   (in practice `transpose` of a checkpoint's `[N, K]` weight) reads the
//!   weights as `[N, K]`, rows contiguous along K, which is what a decode
//!   GEMV streams best; identical constants (a tied embedding and its
//!   transposed-back head) are stored once;
//! - every launch argument's `needs` equals the element count of the buffer
//!   bound to it (checked symbolically here, re-checked numerically by the
//!   runtime), so a kernel never reads or writes past a buffer.

use std::collections::{BTreeMap, HashMap};

use smelt_ir::{interp, Data, Dim, Graph, NodeId, Op, Tensor, ValueId};
use smelt_runtime::plan::{Buffer, Elem, Launch, NativePlan, Storage};

use crate::kir::{BinOp, Expr, Kernel, Scalar};
use crate::select::{self, elem_of, Instance, SelectError, Selected};

/// Alignment of every constant in the weights file, in bytes.
pub const WEIGHT_ALIGN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Every node no kernel family handles, all at once (not one per compile).
    #[error("no CPU kernel for {} node(s):\n{}", .0.len(), .0.iter().map(|(n, e)| format!("  {n}: {e}")).collect::<Vec<_>>().join("\n"))]
    Unsupported(Vec<(String, SelectError)>),
    #[error("node {node}: weight `{name}` has no data")]
    MissingWeight { node: String, name: String },
    #[error("node {node}: folding a constant subgraph failed: {message}")]
    Fold { node: String, message: String },
    #[error("node {node}: kernel `{kernel}` declares {what}, but the value bound to it has {found} elements (a template bug)")]
    Contract { node: String, kernel: String, what: String, found: String },
    #[error("graph: {0}")]
    Graph(String),
}

/// The result of scheduling.
pub struct Schedule {
    /// Distinct kernels, in first-use order; `plan.kernels[i]` describes `kernels[i]`.
    pub kernels: Vec<Kernel>,
    /// The plan, with `library` and `weights` file names left empty for the
    /// artifact writer to fill.
    pub plan: NativePlan,
    /// The constant data the plan's `Storage::Weight` offsets point into.
    pub weights: Vec<u8>,
    /// Nodes folded at compile time.
    pub folded: usize,
}

/// What a value is while scheduling.
enum Slot {
    /// A compile-time constant not yet placed in the weights file.
    Const(Tensor),
    /// A plan buffer.
    Buf(usize),
}

struct Scheduler<'g> {
    graph: &'g Graph,
    slots: HashMap<ValueId, Slot>,
    buffers: Vec<Buffer>,
    /// Buffer index of each placed constant value, so it is stored once.
    placed: HashMap<ValueId, usize>,
    /// Offset of each distinct constant's bytes in the weights file.
    stored: HashMap<(usize, u64), Vec<u64>>,
    weights: Vec<u8>,
    kernels: Vec<Kernel>,
    kernel_index: HashMap<String, usize>,
    launches: Vec<Launch>,
    folded: usize,
    unsupported: Vec<(String, SelectError)>,
    options: ScheduleOptions,
}

/// What the kernels run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// Host kernels (Cranelift / LLVM), run by the CPU thread team.
    #[default]
    Cpu,
    /// NVIDIA GPU kernels (KIR with launch geometry, lowered to PTX).
    Gpu,
}

/// Choices the scheduler leaves to its caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScheduleOptions {
    /// Which kernel families to select from.
    pub device: Device,
    /// Weight matmuls use the packed-panel kernels (`select::weight_matmul`),
    /// which is what the Cranelift lowering runs fastest; otherwise the
    /// `[N, K]` kernels, which LLVM widens to 256-bit vectors.
    pub packed_weights: bool,
}

/// Schedules `graph` whose weights are in `weights` (by weight name).
pub fn schedule(
    graph: &Graph,
    weights: &BTreeMap<String, Tensor>,
    options: ScheduleOptions,
) -> Result<Schedule, ScheduleError> {
    let order = graph.topo_order().map_err(|e| ScheduleError::Graph(e.to_string()))?;
    let mut s = Scheduler {
        graph,
        slots: HashMap::new(),
        buffers: vec![],
        placed: HashMap::new(),
        stored: HashMap::new(),
        weights: vec![],
        kernels: vec![],
        kernel_index: HashMap::new(),
        launches: vec![],
        folded: 0,
        unsupported: vec![],
        options,
    };
    let mut inputs = vec![];
    for n in order {
        let node = graph.node(n);
        match &node.op {
            Op::Input { name } => {
                let v = node.outputs[0];
                let name = name.clone();
                let b = s.new_buffer(v, Storage::Input { name: name.clone() });
                inputs.push((name, b));
                s.slots.insert(v, Slot::Buf(b));
            }
            Op::Weight { name } => {
                let t = weights
                    .get(name)
                    .cloned()
                    .ok_or_else(|| ScheduleError::MissingWeight { node: describe(graph, n), name: name.clone() })?;
                s.slots.insert(node.outputs[0], Slot::Const(t));
            }
            Op::Constant { value } => {
                s.slots.insert(node.outputs[0], Slot::Const(value.clone()));
            }
            _ => s.node(n)?,
        }
    }
    if !s.unsupported.is_empty() {
        return Err(ScheduleError::Unsupported(s.unsupported));
    }
    let mut outputs = vec![];
    for (name, v) in graph.outputs() {
        let b = s.buffer_of(*v);
        outputs.push((name.clone(), b));
    }
    let symbols = graph.symbols().iter().map(|(k, b)| (k.clone(), b.min, b.max)).collect();
    let plan = NativePlan {
        library: String::new(),
        weights: String::new(),
        kernels: s.kernels.iter().map(crate::aot::kernel_entry).collect(),
        // Filled by whoever links the library (it knows the target).
        arch: String::new(),
        cpu_features: vec![],
        ptx: vec![],
        buffers: s.buffers,
        launches: s.launches,
        symbols,
        inputs,
        outputs,
    };
    Ok(Schedule { kernels: s.kernels, plan, weights: s.weights, folded: s.folded })
}

impl Scheduler<'_> {
    fn node(&mut self, n: NodeId) -> Result<(), ScheduleError> {
        let g = self.graph;
        let node = g.node(n);
        let all_const = node.inputs.iter().all(|v| matches!(self.slots.get(v), Some(Slot::Const(_))));
        let concrete = node.outputs.iter().all(|v| g.ty(*v).shape.iter().all(Dim::is_const));
        if all_const && concrete && !node.inputs.is_empty() {
            return self.fold(n);
        }
        if let Some(done) = self.weight_stationary(n)? {
            return Ok(done);
        }
        let in_tys: Vec<_> = node.inputs.iter().map(|v| g.ty(*v).clone()).collect();
        let out_tys: Vec<_> = node.outputs.iter().map(|v| g.ty(*v).clone()).collect();
        let selected = match self.select(&node.op, &in_tys, &out_tys) {
            Ok(s) => s,
            Err(e) => {
                // Keep going with placeholder results, so the error lists
                // every unsupported node, not only the first.
                self.unsupported.push((describe(g, n), e));
                for v in &node.outputs {
                    let b = self.new_buffer(*v, Storage::Arena);
                    self.slots.insert(*v, Slot::Buf(b));
                }
                return Ok(());
            }
        };
        match selected {
            Selected::Alias { offset } => {
                let of = self.buffer_of(node.inputs[0]);
                let v = node.outputs[0];
                let b = self.new_buffer(v, Storage::Alias { of, offset: offset.to_string() });
                self.slots.insert(v, Slot::Buf(b));
            }
            Selected::Kernel(inst) => {
                let args = node.inputs.iter().map(|v| self.buffer_of(*v)).collect();
                self.launch(n, inst, args)?
            }
        }
        Ok(())
    }

    /// The kernel for one node on the scheduler's device.
    fn select(
        &self,
        op: &Op,
        inputs: &[smelt_ir::TensorType],
        outputs: &[smelt_ir::TensorType],
    ) -> Result<Selected, SelectError> {
        match self.options.device {
            Device::Cpu => select::select(op, inputs, outputs),
            Device::Gpu => Err(SelectError::unsupported(op, inputs, "GPU kernel selection is not wired in yet")),
        }
    }

    /// A matmul or gated MLP whose weights are 2-D f32 constants `[K, N]`
    /// runs the kernel that reads them as `[N, K]`; `None` when the node is
    /// not one.
    fn weight_stationary(&mut self, n: NodeId) -> Result<Option<()>, ScheduleError> {
        let g = self.graph;
        let node = g.node(n);
        let weights: &[ValueId] = match &node.op {
            Op::MatMul {} => &node.inputs[1..],
            Op::GatedMlp { .. } => &node.inputs[1..],
            _ => return Ok(None),
        };
        let mut nk = vec![];
        for w in weights {
            match self.slots.get(w) {
                Some(Slot::Const(t)) if t.shape.len() == 2 && matches!(t.data, Data::F32(_)) => nk.push(transpose2(t)),
                _ => return Ok(None),
            }
        }
        let x_ty = g.ty(node.inputs[0]).clone();
        if self.options.packed_weights {
            let (n_, k_) = (nk[0].shape[0], nk[0].shape[1]);
            let wk = match &node.op {
                Op::MatMul {} => select::weight_matmul(&x_ty, n_, k_),
                Op::GatedMlp { act } => select::weight_gated_mlp(&x_ty, n_, k_, act),
                _ => unreachable!("matched above"),
            };
            if let Ok(wk) = wk {
                let mut args = vec![self.buffer_of(node.inputs[0])];
                for ((w, t), pack) in weights.iter().zip(&nk).zip(&wk.packs) {
                    let packed = pack.apply(&t.to_f32_vec(), n_, k_);
                    let len = packed.len();
                    let t = Tensor::from_f32(t.dtype, vec![len], packed).expect("length matches");
                    args.push(self.place_const(&format!("%{}ᵀ packed", w.index()), &t));
                }
                self.launch(n, wk.instance, args)?;
                return Ok(Some(()));
            }
        }
        let nk_ty = |t: &Tensor| smelt_ir::TensorType::new(t.dtype, t.shape.iter().map(|&d| Dim::from(d)).collect());
        let inst = match &node.op {
            Op::MatMul {} => select::matmul_weight_nk(&x_ty, &nk_ty(&nk[0])),
            Op::GatedMlp { act } => select::gated_mlp_weight_nk(&x_ty, &nk_ty(&nk[0]), &nk_ty(&nk[1]), act),
            _ => unreachable!("matched above"),
        };
        // A shape the weight kernels do not take (e.g. a 1-D activation)
        // falls back to the general kernel.
        let Ok(inst) = inst else { return Ok(None) };
        let mut args = vec![self.buffer_of(node.inputs[0])];
        for (w, t) in weights.iter().zip(nk) {
            args.push(self.place_const(&format!("%{}ᵀ", w.index()), &t));
        }
        self.launch(n, inst, args)?;
        Ok(Some(()))
    }

    /// Evaluates a node whose operands are all constants.
    fn fold(&mut self, n: NodeId) -> Result<(), ScheduleError> {
        let node = self.graph.node(n);
        let operands: Vec<&Tensor> = node
            .inputs
            .iter()
            .map(|v| match &self.slots[v] {
                Slot::Const(t) => t,
                Slot::Buf(_) => unreachable!("fold is only called with constant operands"),
            })
            .collect();
        let results = interp::eval_op(&node.op, &operands, &BTreeMap::new())
            .map_err(|e| ScheduleError::Fold { node: describe(self.graph, n), message: e.to_string() })?;
        for (v, t) in node.outputs.iter().zip(results) {
            self.slots.insert(*v, Slot::Const(t));
        }
        self.folded += 1;
        Ok(())
    }

    /// Adds the launch of `inst` for node `n` on operand buffers `args`,
    /// creating the result buffers.
    fn launch(&mut self, n: NodeId, inst: Instance, mut args: Vec<usize>) -> Result<(), ScheduleError> {
        let g = self.graph;
        let node = g.node(n);
        for v in &node.outputs {
            let b = self.new_buffer(*v, Storage::Arena);
            self.slots.insert(*v, Slot::Buf(b));
            args.push(b);
        }
        let k = &inst.kernel;
        let decls: Vec<_> = k.global_buffers().map(|(_, d)| d.clone()).collect();
        let contract = |what: String, found: String| ScheduleError::Contract {
            node: describe(g, n),
            kernel: k.name.clone(),
            what,
            found,
        };
        if decls.len() != args.len() || inst.scalars.len() != k.scalars.len() {
            return Err(contract(
                format!("{} buffers and {} scalars", decls.len(), k.scalars.len()),
                format!("{} operands and results and {} scalar values", args.len(), inst.scalars.len()),
            ));
        }
        let mut needs = vec![];
        for (d, &b) in decls.iter().zip(&args) {
            let need = len_dim(k, &d.len, &inst.scalars)
                .ok_or_else(|| contract(format!("a length for `{}` that is not a polynomial", d.name), "?".into()))?;
            let have = Dim::product(self.buffer_shape(b).iter());
            if need != have || plan_elem(d.elem) != self.buffers[b].elem {
                return Err(contract(
                    format!("`{}`: {:?}[{need}]", d.name, d.elem),
                    format!("{:?}[{have}]", self.buffers[b].elem),
                ));
            }
            needs.push(need.to_string());
        }
        let grid = match &k.gpu {
            None => None,
            Some(g) => {
                let dim = |e| {
                    len_dim(k, e, &inst.scalars)
                        .map(|d| d.to_string())
                        .ok_or_else(|| contract("a grid size that is not a polynomial".into(), "?".into()))
                };
                Some([dim(&g.grid[0])?, dim(&g.grid[1])?, dim(&g.grid[2])?])
            }
        };
        let kernel = self.intern(inst.kernel);
        self.launches.push(Launch {
            grid,
            kernel,
            args,
            needs,
            scalars: inst.scalars.iter().map(|d| d.to_string()).collect(),
            node: describe(g, n),
        });
        Ok(())
    }

    /// The kernel's index, adding it if no identical kernel exists; kernels
    /// with equal names but different bodies get distinct names.
    fn intern(&mut self, mut k: Kernel) -> usize {
        let text = k.to_string();
        if let Some(&i) = self.kernel_index.get(&text) {
            return i;
        }
        let base = k.name.clone();
        let mut suffix = 2;
        while self.kernels.iter().any(|o| o.name == k.name) {
            k.name = format!("{base}_{suffix}");
            suffix += 1;
        }
        self.kernels.push(k);
        self.kernel_index.insert(text, self.kernels.len() - 1);
        self.kernels.len() - 1
    }

    fn new_buffer(&mut self, v: ValueId, storage: Storage) -> usize {
        let ty = self.graph.ty(v);
        self.buffers.push(Buffer {
            name: format!("%{}", v.index()),
            elem: plan_elem(elem_of(ty.dtype)),
            shape: ty.shape.iter().map(|d| d.to_string()).collect(),
            storage,
        });
        self.buffers.len() - 1
    }

    /// Stores a constant's bytes (once per distinct content) and returns
    /// the file offset.
    fn store(&mut self, bytes: &[u8]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        let key = (bytes.len(), h.finish());
        if let Some(offsets) = self.stored.get(&key) {
            for &o in offsets {
                if &self.weights[o as usize..o as usize + bytes.len()] == bytes {
                    return o;
                }
            }
        }
        let pad = self.weights.len().next_multiple_of(WEIGHT_ALIGN) - self.weights.len();
        self.weights.extend(std::iter::repeat_n(0u8, pad));
        let offset = self.weights.len() as u64;
        self.weights.extend_from_slice(bytes);
        self.stored.entry(key).or_default().push(offset);
        offset
    }

    /// A buffer holding a constant that is no graph value (a re-laid-out weight).
    fn place_const(&mut self, name: &str, t: &Tensor) -> usize {
        let offset = self.store(&const_bytes(t));
        self.buffers.push(Buffer {
            name: name.to_string(),
            elem: plan_elem(elem_of(t.dtype)),
            shape: t.shape.iter().map(|d| d.to_string()).collect(),
            storage: Storage::Weight { offset },
        });
        self.buffers.len() - 1
    }

    fn buffer_shape(&self, b: usize) -> Vec<Dim> {
        self.buffers[b].shape.iter().map(|s| s.parse().expect("shapes are printed dims")).collect()
    }

    /// The buffer holding `v`, placing a constant in the weights file the
    /// first time a launch needs it.
    fn buffer_of(&mut self, v: ValueId) -> usize {
        if let Some(&b) = self.placed.get(&v) {
            return b;
        }
        match self.slots.get(&v) {
            Some(Slot::Buf(b)) => *b,
            Some(Slot::Const(t)) => {
                let bytes = const_bytes(t);
                let offset = self.store(&bytes);
                let b = self.new_buffer(v, Storage::Weight { offset });
                self.placed.insert(v, b);
                b
            }
            None => unreachable!("operands are scheduled before their users (topological order)"),
        }
    }
}

/// The transpose of a 2-D f32 constant.
fn transpose2(t: &Tensor) -> Tensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let src = t.to_f32_vec();
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = src[i * c + j];
        }
    }
    Tensor::from_f32(t.dtype, vec![c, r], out).expect("same element count")
}

/// A constant in the element type kernels read (floats as f32).
fn const_bytes(t: &Tensor) -> Vec<u8> {
    match &t.data {
        Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::F64(v) => v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
        Data::I64(v) if elem_of(t.dtype) == Scalar::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Data::Bool(v) => v.iter().map(|b| *b as u8).collect(),
    }
}

fn plan_elem(s: Scalar) -> Elem {
    match s {
        Scalar::F32 => Elem::F32,
        Scalar::I32 => Elem::I32,
        Scalar::I64 => Elem::I64,
        Scalar::Bool => Elem::Bool,
        Scalar::BF16 => Elem::BF16,
        Scalar::F16 => Elem::F16,
    }
}

/// A KIR length expression as a dim, with the instance's scalar dims
/// substituted for the kernel's parameters; `None` when it is not a
/// polynomial (division by a non-constant, a load).
pub fn len_dim(k: &Kernel, e: &Expr, scalars: &[Dim]) -> Option<Dim> {
    Some(match e {
        Expr::Int(x, _) => Dim::c(*x),
        Expr::Var(v) => scalars.get(k.scalars.iter().position(|s| s == v)?)?.clone(),
        Expr::Cast(_, a) => len_dim(k, a, scalars)?,
        Expr::Bin(op, a, b) => {
            let (a, b) = (len_dim(k, a, scalars)?, len_dim(k, b, scalars)?);
            match op {
                BinOp::Add => a + b,
                BinOp::Sub => a - b,
                BinOp::Mul => a * b,
                BinOp::Div => a.floor_div(b.as_const().filter(|&c| c > 0)?),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// `%12 = rope @"layer 0 self_attn"`, for messages and profiles.
fn describe(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    let outs: Vec<String> = node.outputs.iter().map(|v| format!("%{}", v.index())).collect();
    let mut s = format!("{} = {}", outs.join(", "), node.op.name());
    if let Some(l) = &node.label {
        s.push_str(&format!(" @\"{l}\""));
    }
    if let Some(line) = node.line {
        s.push_str(&format!(" (line {line})"));
    }
    s
}
