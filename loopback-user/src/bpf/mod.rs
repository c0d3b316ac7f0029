//! Kernel side plumbing: the embedded object, BTF, the hook plan, sessions and doctor.
pub mod btf;
pub mod classic_tc;
pub mod doctor;
pub mod object;
pub mod session;
pub mod switch;
