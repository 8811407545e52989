//! Storage: the durable log (`log`), the guest-backed state machine (`sm`), their snapshot
//! files (`snapfile`) and the small state files they share (`files`).

pub mod covered;
pub mod durable;
pub mod files;
pub mod log;
pub mod sm;
pub mod snapfile;

pub use durable::Durable;
pub use log::{LogStore, SharedLog};
pub use sm::{GuestSpec, StateMachine};
