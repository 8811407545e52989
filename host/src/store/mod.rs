//! Storage: the durable log (`log`) and the guest-backed state machine (`sm`).

pub mod covered;
pub mod durable;
pub mod log;
pub mod sm;
pub mod snapfile;

pub use durable::Durable;
pub use log::{LogStore, SharedLog};
pub use sm::{GuestSpec, StateMachine};
