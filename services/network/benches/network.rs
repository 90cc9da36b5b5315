//! The network benchmark (written below in this file's final form).
fn main() {}
