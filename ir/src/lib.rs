//! smelt IR.
