//! The one declared table of what lotrace observes: the stages of a packet's path
//! ([`StageKind`], one per kernel hook plus those derived from them) and the hook points that
//! serve them ([`plan::PLAN`]: which programs, how they attach, in which order they are tried).
//! The loader and `doctor` attach from the plan, the tracker and the sinks name stages from
//! here, the dashboard's steps group these stages, and unit tests check the README's hook table
//! and stage names against both.
pub mod plan;
mod stage;
mod steps;

pub use plan::{Attach, Candidate, Dir, HookPoint, PLAN};
pub use stage::StageKind;
pub use steps::{STEPS, Step};
