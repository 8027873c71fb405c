//! Stage `dce`: dead code elimination. Every node no graph output depends
//! on is removed (inputs stay: they are the signature).

use smelt_ir::Graph;

pub fn run(g: &mut Graph) -> usize {
    g.remove_dead()
}
