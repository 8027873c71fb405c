//! Optimisation passes over the smelt IR (the pipeline lands with the fusion work).
