//! The conformance cases, grouped by what they are about. Every case is re-exported at the crate
//! root, and listed once in `__with_cases!` (which [`conformance_suite!`](crate::conformance_suite)
//! and [`CASES`](crate::CASES) expand).

mod delivery;
mod fanout;
mod layers;
mod lifecycle;
mod redelivery;
mod typed;
mod validation;

pub use delivery::*;
pub use fanout::*;
pub use layers::*;
pub use lifecycle::*;
pub use redelivery::*;
pub use typed::*;
pub use validation::*;
