//! Runtime: artifact format, loading and execution.
